"""Training data on disk: token shards read memory-mapped, their manifest, and `nanok2 data tokenize`.

A dataset is a directory: `shard_00000.bin`, … hold token ids back to back (uint16 when the vocabulary
fits, else uint32), SFT datasets add `shard_00000.mask.bin` (uint8: each token's loss weight, 0 where it is
not trained), and `manifest.json` records the kind, the vocabulary size, the largest id, and a fingerprint of the
tokenizer. The manifest is written last and atomically, so a directory without one is incomplete.

The trainer reads fixed windows of seq_len+1 tokens. Their order is a permutation seeded per epoch,
so "where the run is" is a single number, the count of sequences consumed: that is what makes resume
exact and lets every rank of a distributed run pick its own rows of the same global batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanok2.errors import NanoK2Error

FORMAT = "nanok2-tokens"
MANIFEST = "manifest.json"
OPEN_WINDOWS = 64   # aligned packing: windows kept open for first-fit (more pack tighter, hold more memory)


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 (first 16 hex digits) of a tokenizer's `tiktoken.model`: equal files, equal ids."""
    path = Path(tokenizer_dir)
    path = path / "tiktoken.model" if path.is_dir() else path
    if not path.exists():
        raise NanoK2Error(f"no tokenizer at {tokenizer_dir} (expected tiktoken.model)")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- writing

class ShardWriter:
    """Append documents (ids, and for SFT a loss mask), cut shards of about `shard_tokens`, then `close()`."""

    def __init__(self, out: str | Path, vocab_size: int, kind: str = "pretrain", tokenizer: str | None = None,
                 shard_tokens: int = 50_000_000, align: int | None = None, pad_id: int = 0, first_fit: bool = False):
        if kind not in ("pretrain", "sft"):
            raise NanoK2Error(f"unknown dataset kind {kind!r}; known: pretrain, sft")
        self.out = Path(out)
        if (self.out / MANIFEST).exists():
            raise NanoK2Error(f"{self.out} already holds a dataset; choose another --out (nothing was changed)")
        self.out.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.kind, self.tokenizer, self.shard_tokens = vocab_size, kind, tokenizer, shard_tokens
        self.dtype = np.uint16 if vocab_size <= 65536 else np.uint32
        self.shards: list[dict] = []
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._pending = 0
        self.documents = 0
        # align=seq_len: no document crosses a training window (a conversation is never cut from its
        # question). Documents fill windows in their order, or with first_fit into up to OPEN_WINDOWS open
        # windows, so short ones fill the gaps long ones leave; what stays empty is padded with pad_id
        # under a zero loss mask
        self.align, self.pad_id, self.padding = align, pad_id, 0
        self.open_windows = OPEN_WINDOWS if first_fit else 1
        self._open: list[list] = []   # open windows: [ids arrays, mask arrays (or None), tokens used]

    def add(self, ids, mask=None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise NanoK2Error(f"token id {int(ids.max())} outside the vocabulary 0..{self.vocab_size - 1}")
        if (mask is None) != (self.kind == "pretrain"):
            raise NanoK2Error(f"a {self.kind} dataset takes {'no mask' if self.kind == 'pretrain' else 'a loss mask'}")
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if mask.shape != ids.shape:
                raise NanoK2Error(f"loss mask has {mask.size} entries for {ids.size} ids")
        if self.align:
            if ids.size > self.align:
                raise NanoK2Error(f"document {self.documents} has {ids.size} tokens, more than a window "
                                  f"({self.align}); use a longer seq_len or shorter documents")
            self._place(ids, mask)
        else:
            self._append(ids, mask)
        self.documents += 1
        if self._pending >= self.shard_tokens:
            self._flush()

    def _place(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        """First fit: into the first open window with room, else a new one (closing the fullest when
        `open_windows` are open: with one, documents stay in order); a window exactly full is closed at once."""
        window = next((w for w in self._open if w[2] + ids.size <= self.align), None)
        if window is None:
            if len(self._open) >= self.open_windows:
                self._close_window(max(self._open, key=lambda w: w[2]))
            window = [[], [], 0]
            self._open.append(window)
        window[0].append(ids)
        window[1].append(mask)
        window[2] += ids.size
        if window[2] == self.align:
            self._close_window(window)

    def _close_window(self, window: list) -> None:
        self._open = [w for w in self._open if w is not window]   # by identity: windows hold arrays
        for ids, mask in zip(window[0], window[1]):
            self._append(ids, mask)
        if window[2] < self.align:
            self._pad(self.align - window[2])

    def _append(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        self._ids.append(ids.astype(self.dtype))
        if mask is not None:
            self._mask.append(mask)
        self._pending += ids.size

    def _pad(self, n: int) -> None:
        """n pad tokens, never trained on."""
        self._append(np.full(n, self.pad_id), np.zeros(n, dtype=np.uint8) if self.kind == "sft" else None)
        self.padding += n

    def _flush(self, last: bool = False) -> None:
        if last:
            for window in list(self._open):
                self._close_window(window)
        if not self._pending:
            return
        if self.align:  # close the last window: it spans align + 1 tokens (inputs and shifted targets)
            self._pad((-self._pending) % self.align + 1)
        name = f"shard_{len(self.shards):05d}"
        ids = np.concatenate(self._ids)
        _write_atomic_bytes(self.out / f"{name}.bin", ids.tobytes())
        entry = {"file": f"{name}.bin", "tokens": int(ids.size), "max_id": int(ids.max())}
        if self.kind == "sft":
            _write_atomic_bytes(self.out / f"{name}.mask.bin", np.concatenate(self._mask).tobytes())
            entry["mask"] = f"{name}.mask.bin"
        self.shards.append(entry)
        self._ids, self._mask, self._pending = [], [], 0

    def close(self) -> Path:
        self._flush(last=True)
        manifest = {"format": FORMAT, "version": 1, "kind": self.kind, "vocab_size": self.vocab_size,
                    "dtype": np.dtype(self.dtype).name, "tokenizer": self.tokenizer, "documents": self.documents,
                    "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}
        if self.align:
            manifest.update(align=self.align, padding=self.padding)
        _write_atomic_bytes(self.out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        return self.out


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------- reading

@dataclass
class Batch:
    inputs: torch.Tensor    # [B, T] int64
    targets: torch.Tensor   # [B, T] int64
    mask: torch.Tensor      # [B, T] float32, the target's loss weight (0: not trained, 1 as a rule)


class TokenDataset:
    """The windows of a dataset directory, memory-mapped. The last `eval_windows` (in file order) are held
    out for evaluation; training sequence g is window perm_{g // n}[g % n] of the rest (n of them).

    `holdout=(shard, offset)` (another length's `eval_start()`) instead drops every window that reaches that
    token: the same text stays held out when windows of several lengths are read (curriculum.py)."""

    def __init__(self, path: str | Path, seq_len: int, seed: int = 0, eval_windows: int = 0,
                 holdout: tuple[int, int] | None = None):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise NanoK2Error(f"no dataset at {self.path} (no {MANIFEST}; make one with `nanok2 data tokenize`)") from None
        if self.manifest.get("format") != FORMAT:
            raise NanoK2Error(f"{self.path / MANIFEST} is not a {FORMAT} manifest")
        self.kind = self.manifest["kind"]
        self.vocab_size = self.manifest["vocab_size"]
        self.seq_len, self.seed = seq_len, seed
        dtype = np.dtype(self.manifest["dtype"])
        self.ids, self.masks, windows = [], [], []
        for i, shard in enumerate(self.manifest["shards"]):
            f = self.path / shard["file"]
            if not f.exists() or f.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise NanoK2Error(f"{f} is missing or truncated (manifest says {shard['tokens']} tokens)")
            self.ids.append(np.memmap(f, dtype=dtype, mode="r"))
            self.masks.append(np.memmap(self.path / shard["mask"], dtype=np.uint8, mode="r") if "mask" in shard else None)
            n = (shard["tokens"] - 1) // seq_len
            windows += [(i, w * seq_len) for w in range(n)
                        if holdout is None or (i, w * seq_len + seq_len + 1) <= holdout]
        if len(windows) <= eval_windows:
            raise NanoK2Error(f"{self.path} holds {len(windows)} windows of {seq_len + 1} tokens; "
                              f"need more than the {eval_windows} held out for evaluation")
        self.eval_windows = windows[len(windows) - eval_windows:] if eval_windows else []
        self.train_windows = windows[:len(windows) - eval_windows]
        self._perm: tuple[int, np.ndarray] | None = None

    def eval_start(self) -> tuple[int, int] | None:
        """(shard, token offset) where the held-out windows begin; None when nothing is held out."""
        return self.eval_windows[0] if self.eval_windows else None

    def check_compatible(self, model_vocab: int, tokenizer: str | None = None) -> None:
        """Raise when the ids cannot be this model's (larger vocabulary) or come from another tokenizer."""
        max_id = max((s["max_id"] for s in self.manifest["shards"]), default=-1)
        if self.vocab_size > model_vocab or max_id >= model_vocab:
            raise NanoK2Error(f"{self.path}: tokens were made for a vocabulary of {self.vocab_size} (largest id "
                              f"{max_id}) but the model has vocab_size {model_vocab}: wrong tokenizer or model")
        have = self.manifest.get("tokenizer")
        if tokenizer is not None and have is not None and have != tokenizer:
            raise NanoK2Error(f"{self.path}: tokenized with tokenizer {have}, not {tokenizer}")

    def _window(self, shard: int, start: int) -> tuple[np.ndarray, np.ndarray | None]:
        end = start + self.seq_len + 1
        mask = self.masks[shard]
        return self.ids[shard][start:end], (mask[start:end] if mask is not None else None)

    def _train_window(self, g: int) -> tuple[int, int]:
        n = len(self.train_windows)
        epoch, pos = divmod(g, n)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = (epoch, rng.permutation(n))
        return self.train_windows[int(self._perm[1][pos])]

    def _stack(self, windows: list[tuple[int, int]]) -> Batch:
        ids = np.stack([self._window(*w)[0] for w in windows]).astype(np.int64)
        x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
        if self.kind == "sft":
            m = np.stack([self._window(*w)[1] for w in windows])[:, 1:]
            mask = torch.from_numpy(m.astype(np.float32))
        else:
            mask = torch.ones(y.shape, dtype=torch.float32)
        return Batch(x.contiguous(), y.contiguous(), mask)

    def train_batch(self, first: int, count: int) -> Batch:
        """Training sequences first .. first+count-1 (global numbering; epochs wrap around)."""
        return self._stack([self._train_window(g) for g in range(first, first + count)])

    def eval_batches(self, batch_size: int):
        for i in range(0, len(self.eval_windows), batch_size):
            yield self._stack(self.eval_windows[i:i + batch_size])


# ---------------------------------------------------------------- `nanok2 data tokenize`

def _documents(files: list[str], sft: bool):
    """Yield, per document, its text (pretraining) or its {"messages", "tools"} dict (SFT).

    Pretraining reads .txt files as one document each and .jsonl files as one {"text": …} per line, or a
    conversation {"messages", "tools"} per line, which is pre-trained on as the chat format renders it.
    """
    for name in files:
        path = Path(name)
        if not path.exists():
            raise NanoK2Error(f"no input file {path}")
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise NanoK2Error(f"{path}:{n}: not JSON: {e}") from None
                keys = ("messages",) if sft else ("text", "messages")
                if not isinstance(row, dict) or not any(k in row for k in keys):
                    raise NanoK2Error(f"{path}:{n}: expected an object with {' or '.join(map(repr, keys))}")
                yield row if sft or "text" not in row else row["text"]
        elif sft:
            raise NanoK2Error(f"{path}: SFT input must be JSONL conversations ({{\"messages\": [...], \"tools\": [...]}})")
        else:
            yield path.read_text(encoding="utf-8")


def tokenize_files(tokenizer_dir: str, files: list[str], out: str, sft: bool = False,
                   shard_tokens: int = 50_000_000, align: int | None = None, first_fit: bool = False,
                   sft_weights: tuple[int, int] = (1, 0)) -> dict:
    """Tokenize text (each document followed by [EOS]) or chat conversations (with their loss masks).

    An SFT row may carry `train_from` (agent_data.encode_example): only its assistant messages from that
    index on are trained. `sft_weights`: the loss weights of the assistant's turns and of tool results
    (the mask holds them; the trainer divides by their sum). `align=seq_len` keeps every document inside
    one training window.
    """
    from nanok2.agent_data import encode_example
    from nanok2.chat import render_ids
    from nanok2.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    eos = tok.id_of("[EOS]")
    writer = ShardWriter(out, tok.n_vocab, "sft" if sft else "pretrain", tokenizer_fingerprint(tokenizer_dir),
                         shard_tokens, align=align, pad_id=eos, first_fit=first_fit)
    for doc in _documents(files, sft):
        if sft:
            writer.add(*encode_example(doc, tok, sft_weights))
        elif isinstance(doc, dict):   # a conversation, every token of it trained
            writer.add(render_ids(doc["messages"], tok, doc.get("tools"))[0] + [eos])
        else:
            writer.add(tok.encode(doc) + [eos])
    writer.close()
    return json.loads((Path(out) / MANIFEST).read_text())


def _tokenize_command(args) -> int:
    m = tokenize_files(args.tokenizer, args.input, args.out, sft=args.sft, shard_tokens=args.shard_tokens,
                       align=args.align, first_fit=args.first_fit)
    print(f"{m['kind']}: {m['documents']} documents, {m['tokens']:,} tokens in {len(m['shards'])} shard(s), "
          f"vocab {m['vocab_size']}, tokenizer {m['tokenizer']} -> {args.out}")
    return 0


def register(subparsers) -> None:
    """`nanok2 data tokenize --tokenizer DIR --input FILES... --out DIR [--sft]`."""
    parser = subparsers.add_parser("data", help="make training data: token shards")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("tokenize", help="text (.txt, .jsonl {text}) or chat JSONL (--sft) -> token shards")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tiktoken.model")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--sft", action="store_true", help="input is JSONL conversations; write loss masks")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, metavar="N", help="tokens per shard")
    p.add_argument("--align", type=int, metavar="SEQ_LEN",
                   help="keep each document inside one training window of SEQ_LEN (padding the gaps)")
    p.add_argument("--first-fit", action="store_true",
                   help="with --align: pack documents first-fit instead of in order (less padding)")
    p.set_defaults(func=_tokenize_command)
