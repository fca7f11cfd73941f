"""`nanok2 eval copy`: does a model copy from its context? The skill an agent needs to carry a name or a
docid from a tool result into its next call, measured without running the agent.

The probe cuts windows of `length` tokens out of real text (documents joined in a random order), copies
a span of `span` tokens from the first half of each window to a random later place, and compares the
model's loss on the span's tokens 2..span at its first occurrence and at the copy:

- `first`: nats per token where the span is new text: what the model knows of the language;
- `repeat`: nats per token at the copy, where the same tokens sit earlier in the context, after an
  unrelated left context;
- `gain = first - repeat`: a model with copy (induction) heads continues the copy almost for free, so
  `repeat` falls far below `first`; one without them reads the copy as new text in a strange place,
  so `gain` is about zero or negative.

The offsets are random, so a positional shortcut (attend k tokens back) cannot pass it. The probe is
deterministic for a seed.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from nanok2.errors import NanoK2Error


@dataclass
class CopyProbe:
    first: float      # mean nats per token on the span where it is first seen
    repeat: float     # ... and on its copy
    windows: int
    span: int
    length: int

    @property
    def gain(self) -> float:
        return self.first - self.repeat

    def to_json(self) -> dict:
        return {**asdict(self), "gain": self.gain}


def probe_windows(token_lists: Sequence[list[int]], n: int, span: int, length: int,
                  seed: int = 0) -> list[tuple[list[int], int, int]]:
    """n windows (ids [length], first span start p1, copy start p2), each built from texts in a random order.

    p1 is in the first half; the copy starts at least `span` tokens after the first one ends, so the two
    never touch.
    """
    if span < 2 or length < 4 * span + 2:
        raise NanoK2Error(f"copy probe: need span >= 2 and length >= 4 * span + 2 (span {span}, length {length})")
    total = sum(len(t) for t in token_lists)
    if total < length:
        raise NanoK2Error(f"copy probe: the text has {total} tokens, fewer than one window of {length}")
    rng = random.Random(seed)
    order = list(range(len(token_lists)))
    windows = []
    for _ in range(n):
        rng.shuffle(order)
        ids: list[int] = []
        for i in order:
            ids.extend(token_lists[i])
            if len(ids) >= length:
                break
        ids = ids[:length]
        p1 = rng.randrange(0, length // 2 - span)
        p2 = rng.randrange(p1 + 2 * span, length - span + 1)
        ids[p2:p2 + span] = ids[p1:p1 + span]
        windows.append((ids, p1, p2))
    return windows


@torch.no_grad()
def copy_probe(logits_fn: Callable[[torch.Tensor], torch.Tensor], token_lists: Sequence[list[int]], n: int = 48,
               span: int = 8, length: int = 192, seed: int = 0, batch: int = 8) -> CopyProbe:
    """Run the probe. `logits_fn(ids [B, T]) -> logits [B, T, V]` (a model's forward)."""
    windows = probe_windows(token_lists, n, span, length, seed)
    first, repeat = [], []
    for b in range(0, n, batch):
        chunk = windows[b:b + batch]
        x = torch.tensor([ids for ids, _, _ in chunk])
        ce = F.cross_entropy(logits_fn(x[:, :-1]).float().transpose(1, 2), x[:, 1:], reduction="none")  # [B, T-1]
        for row, (_, p1, p2) in zip(ce, chunk):
            # ce[i] is the loss of token i + 1: the span's tokens 2..span are predicted at p .. p + span - 2
            first.append(row[p1:p1 + span - 1].mean().item())
            repeat.append(row[p2:p2 + span - 1].mean().item())
    return CopyProbe(first=sum(first) / n, repeat=sum(repeat) / n, windows=n, span=span, length=length)


def model_probe(model: torch.nn.Module, tokenizer, texts: Sequence[str], **kw) -> CopyProbe:
    """The probe on a nanok2 model over texts (tokenized with `tokenizer`); leaves the model's mode as it was."""
    was_training = model.training
    model.eval()
    try:
        return copy_probe(model, [tokenizer.encode(t + "\n") for t in texts], **kw)
    finally:
        model.train(was_training)


def world_texts(seed: int, size: int) -> list[str]:
    """The documents of a generated world, as text."""
    from nanok2.world import build_world

    return [f"{d.title}\n{d.text}" for d in build_world(seed, size).corpus.docs]


def read_texts(path) -> list[str]:
    """A .txt file (one text per non-empty line) or a .jsonl file of {"text": ...} records."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise NanoK2Error(f"--text {path}: cannot read it ({e})") from None
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        try:
            texts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NanoK2Error(f"--text {path}, line {n}: expected a JSON object with a 'text' field") from None
    return texts


def run_eval_copy(args) -> int:
    from nanok2.checkpoint import load_model
    from nanok2.tokenizer import Tokenizer

    texts = read_texts(args.text) if args.text else world_texts(args.world, args.size)
    model = load_model(args.model, dtype="float32")
    tokenizer = Tokenizer.load(args.model)
    r = model_probe(model, tokenizer, texts, n=args.n, span=args.span, length=args.length, seed=args.seed)
    print(f"copy probe on {args.model}: {r.windows} windows of {r.length} tokens, a span of {r.span} copied")
    print(f"  nats per token where the span is new   {r.first:7.3f}")
    print(f"  nats per token on its copy            {r.repeat:7.3f}")
    print(f"  gain (copying)                        {r.gain:7.3f}")
    print(json.dumps({"eval": "copy", "model": str(args.model), **r.to_json()}))
    return 0

