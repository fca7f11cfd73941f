"""`nanok2 eval quote`: does a model pick the sentence of a page that states the fact it opened it for?

The step where the small agent fails most (README, "Agent model"): after `I open it for the employer of X.`
and the page, the gold thinking goes on `The article says: "X worked for Y."`, and the model must pick,
among the page's sentences, the one of that fact. The probe measures that pick without running the agent,
teacher-forced on the gold multi-hop trajectories of a world: at each quote of the gold thinking, every
sentence of the page just read is scored as the quote (the log-probability of the text from the opening
quote mark to the closing one, in the exact prompt the agent would see), and the pick is right when the
gold sentence scores best. Deterministic for a world and its tasks.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from nanok2.errors import NanoK2Error
from nanok2.kv_cache import common_prefix

QUOTE_OPEN = 'The article says: "'
SENTENCE = re.compile(r"\S[^.]*\.(?=\s|$)")   # page sentences end with a full stop (numbers use commas)


@dataclass
class QuotePoint:
    prefix: str              # the rendered prompt and thinking up to and including the opening quote mark
    candidates: list[str]    # the sentences of the page just read
    gold: int                # index of the gold sentence among them


@dataclass
class QuoteProbe:
    right: int
    quotes: int
    tasks: int
    picks: list[int] = field(default_factory=list)   # per quote: 1 right, 0 wrong (for paired comparisons)

    @property
    def accuracy(self) -> float:
        return self.right / self.quotes if self.quotes else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def page_sentences(page: str) -> list[str]:
    """The sentences of an `open` result: its first line (`d0123 | Title`) and any `(more: …)` line left out."""
    lines = page.split("\n")[1:]
    return [s for line in lines if not line.startswith("(more") for s in SENTENCE.findall(line)]


def quote_points(messages: list[dict], tools: list[dict]) -> list[QuotePoint]:
    """Each quote of a gold trajectory's thinking whose sentence is on the page of the tool result before it."""
    from nanok2.chat import render

    points = []
    for i, m in enumerate(messages):
        thinking = m.get("reasoning_content") or ""
        at = thinking.find(QUOTE_OPEN)
        if m.get("role") != "assistant" or at < 0 or i == 0 or messages[i - 1].get("role") != "tool":
            continue
        gold = thinking[at + len(QUOTE_OPEN):].split('"', 1)[0]
        candidates = page_sentences(messages[i - 1].get("content") or "")
        if gold not in candidates:
            continue
        # the generation prompt ends at <|im_middle|>: the model writes <think> itself, as in training
        prefix = render(messages[:i], tools, add_generation_prompt=True) + "<think>" + thinking[:at + len(QUOTE_OPEN)]
        points.append(QuotePoint(prefix, candidates, candidates.index(gold)))
    return points


def score_candidates(logits_fn: Callable[[torch.Tensor], torch.Tensor], encode: Callable[[str], list[int]],
                     point: QuotePoint) -> list[float]:
    """Log-probability of each candidate and the closing quote mark after `point.prefix`.

    A BPE may merge the opening quote mark with a sentence's first letters, so every candidate is scored
    from the first token where any of them departs from the prefix alone: the same context for all.
    """
    bare = encode(point.prefix)
    full = [encode(point.prefix + c + '"') for c in point.candidates]
    start = max(1, min(common_prefix(bare, f) for f in full))
    length = max(len(f) for f in full)
    ids = torch.tensor([f + [0] * (length - len(f)) for f in full])         # [C, T], right-padded
    logp = torch.log_softmax(logits_fn(ids[:, :-1]).float(), dim=-1)         # [C, T-1, V]
    taken = logp.gather(-1, ids[:, 1:, None])[..., 0]                        # [C, T-1]: log p(ids[t+1])
    return [taken[c, start - 1:len(f) - 1].sum().item() for c, f in enumerate(full)]


def quote_probe(logits_fn, encode, trajectories: list[tuple[list[dict], list[dict]]]) -> QuoteProbe:
    """Run the probe over (messages, tools) gold trajectories."""
    picks = []
    for messages, tools in trajectories:
        for point in quote_points(messages, tools):
            scores = score_candidates(logits_fn, encode, point)
            picks.append(int(max(range(len(scores)), key=scores.__getitem__) == point.gold))
    return QuoteProbe(sum(picks), len(picks), len(trajectories), picks)


def run_eval_quote(args) -> int:
    from nanok2.checkpoint import load_model
    from nanok2.tokenizer import Tokenizer
    from nanok2.world import Toolbox, build_world, make_tasks
    from nanok2.world.tools import SCHEMAS

    if args.n < 1:
        raise NanoK2Error(f"--n {args.n}: probe at least one task")
    world = build_world(args.world, args.size)
    tasks = make_tasks(world, Toolbox(world.corpus), "multihop", args.hops, args.n, args.style)
    model = load_model(args.model, dtype="float32").eval()
    tokenizer = Tokenizer.load(args.model)
    with torch.no_grad():
        r = quote_probe(model, lambda text: tokenizer.encode(text, allowed_special="all"),
                        [(t.messages, SCHEMAS) for t in tasks])
    print(f"quote probe on {args.model}: {r.tasks} gold {args.hops}-hop trajectories of world {args.world}")
    print(f"  the gold sentence scores best in {r.right} of {r.quotes} quotes ({r.accuracy:.1%})")
    print(json.dumps({"eval": "quote", "model": str(args.model), "world": args.world, "hops": args.hops,
                      **r.to_json()}))
    return 0
