"""The batches of each training step, with an optional copying curriculum for pre-training.

A model as small as nanok2-agent-tiny, pre-trained for minutes on plain documents, never forms copy
(induction) heads, and an agent needs them to carry a docid or a name from a tool result into its next
call (issue #8; README "Agent model"). Two changes to the pre-training data make them form:

- **window schedule**: training starts on short windows, which lengthen over the run at the same tokens
  per step (`batch_size * seq_len`). Copying is found first where there are few places to look.
- **copy injection**: in every window, spans of `copy_span` tokens are copied forward, about one per
  `copy_every` tokens (at least one). The distance is drawn log-uniformly in [span, T - span], so short
  copies stay in the mix as the windows grow and the short-distance skill is not unlearned.

Every batch is a pure function of (seed, step): each phase of the schedule reads its own windows of the
dataset from its start, and the copies come from an RNG seeded by (seed, step, row). So resuming is exact
and N ranks, each taking its rows, see the same global batch as one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nanok2.data import Batch, TokenDataset
from nanok2.errors import NanoK2Error


@dataclass(frozen=True)
class Phase:
    seq_len: int
    batch_size: int      # sequences per micro-batch, all ranks together
    first_step: int      # the phase runs steps first_step .. last_step - 1
    last_step: int


def plan_phases(schedule: list, seq_len: int, batch_size: int, steps: int, world: int = 1) -> list[Phase]:
    """`schedule` = [[seq_len_1, until_step_1], ...], windows growing, each shorter than `seq_len`; after the
    last entry the run uses `seq_len`. Every phase keeps `batch_size * seq_len` tokens per micro-batch."""
    tokens = batch_size * seq_len
    phases, start = [], 0
    for entry in schedule:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) for v in entry)):
            raise NanoK2Error(f"window_schedule: expected [seq_len, until_step] pairs of integers, got {entry!r}")
        length, until = entry
        previous = phases[-1].seq_len if phases else 1
        if not previous < length < seq_len:
            raise NanoK2Error(f"window_schedule: window {length} must be longer than the one before ({previous}) "
                              f"and shorter than seq_len={seq_len}")
        if until <= start:
            raise NanoK2Error(f"window_schedule: phase [{length}, {until}] ends at or before step {start}")
        if tokens % length or (tokens // length) % world:
            raise NanoK2Error(f"window_schedule: {tokens} tokens per micro-batch (batch_size x seq_len) do not "
                              f"split into windows of {length} shared by {world} rank(s)")
        phases.append(Phase(length, tokens // length, start, until))
        start = until
    return [p for p in phases if p.first_step < steps] + [Phase(seq_len, batch_size, start, max(start, steps))]


def inject_copies(ids: np.ndarray, rng: np.random.Generator, every: int, span: tuple[int, int]) -> np.ndarray:
    """Copy spans forward inside one window `ids` [T] (in place, returned): max(1, T // every) copies, each
    of a length drawn in [span[0], span[1]], to a distance log-uniform in [length, T - length]."""
    size = len(ids)
    for _ in range(max(1, size // every)):
        length = int(rng.integers(span[0], span[1] + 1))
        if size < 2 * length:
            continue
        distance = int(math.exp(rng.uniform(math.log(length), math.log(size - length))))
        if distance + length > size:   # rounding at the top of the range
            continue
        src = int(rng.integers(0, size - distance - length + 1))
        ids[src + distance:src + distance + length] = ids[src:src + length]
    return ids


class StepBatches:
    """What the trainer reads: `batches(step, rank, world)` (this rank's micro-batches) and `eval_batches`.

    Without a schedule or copies this is the dataset's own order: step s reads training sequences
    s·grad_accum·batch_size onwards, as it always has.
    """

    def __init__(self, path, seq_len: int, batch_size: int, grad_accum: int, steps: int, seed: int = 0,
                 eval_windows: int = 0, window_schedule: list | None = None, copy_every: int = 0,
                 copy_span: tuple[int, int] = (4, 10), world: int = 1):
        self.final = TokenDataset(path, seq_len, seed=seed, eval_windows=eval_windows)
        if copy_every and self.final.kind != "pretrain":
            raise NanoK2Error(f"copy_every: copies are injected into pre-training text; {path} is a "
                              f"{self.final.kind} dataset")
        if copy_every < 0 or (copy_every and not (2 <= copy_span[0] <= copy_span[1])):
            raise NanoK2Error(f"copy_every={copy_every}, copy_span={list(copy_span)}: need copy_every >= 0 and "
                              "2 <= shortest span <= longest")
        self.phases = plan_phases(window_schedule or [], seq_len, batch_size, steps, world)
        holdout = self.final.eval_start()
        self.datasets = {p.seq_len: (self.final if p.seq_len == seq_len else
                                     TokenDataset(path, p.seq_len, seed=seed, holdout=holdout)) for p in self.phases}
        self.grad_accum, self.seed, self.copy_every, self.copy_span = grad_accum, seed, copy_every, tuple(copy_span)

    def check_compatible(self, model_vocab: int, tokenizer: str | None = None) -> None:
        self.final.check_compatible(model_vocab, tokenizer)

    def phase(self, step: int) -> Phase:
        return next((p for p in self.phases if step < p.last_step), self.phases[-1])

    def batches(self, step: int, rank: int = 0, world: int = 1) -> list[Batch]:
        p = self.phase(step)
        data, per_rank = self.datasets[p.seq_len], p.batch_size // world
        first = (step - p.first_step) * self.grad_accum * p.batch_size     # sequences this phase read before
        out = []
        for m in range(self.grad_accum):
            row0 = first + m * p.batch_size + rank * per_rank
            batch = data.train_batch(row0, per_rank)
            if self.copy_every:
                batch = self._with_copies(batch, step, m * p.batch_size + rank * per_rank)
            out.append(batch)
        return out

    def _with_copies(self, batch: Batch, step: int, row0: int) -> Batch:
        ids = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1).numpy()     # [B, T + 1], a new array
        for r in range(len(ids)):
            rng = np.random.Generator(np.random.PCG64([self.seed, step, row0 + r]))
            inject_copies(ids[r], rng, self.copy_every, self.copy_span)
        ids_t = torch.from_numpy(ids)
        return Batch(ids_t[:, :-1].contiguous(), ids_t[:, 1:].contiguous(), batch.mask)

    def eval_batches(self, batch_size: int):
        """The held-out windows of the final length, as they are (no copies)."""
        return self.final.eval_batches(batch_size)
