"""The copying curriculum (curriculum.py): window phases at constant tokens per step, spans copied forward at
log-uniform distances, batches that are a function of the step (exact resume, ranks = one process), and the
held-out text staying held out at every window length."""
import json
import shutil

import numpy as np
import pytest
import torch

from nanok2.curriculum import StepBatches, inject_copies, plan_phases
from nanok2.data import ShardWriter, TokenDataset
from nanok2.errors import NanoK2Error
from nanok2.recipes import apply_overrides, get_recipe
from nanok2.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pt"
    w = ShardWriter(path, 512, shard_tokens=3000)      # several shards
    rng = np.random.default_rng(0)
    for _ in range(8):
        start = rng.integers(0, 512)
        w.add((start + np.cumsum(rng.integers(1, 4, 1000))) % 512)
    w.close()
    return str(path)


def test_phases_keep_tokens_per_step_and_reject_bad_schedules():
    phases = plan_phases([[16, 3], [32, 5]], seq_len=64, batch_size=4, steps=9)
    assert [(p.seq_len, p.batch_size, p.first_step, p.last_step) for p in phases] == \
        [(16, 16, 0, 3), (32, 8, 3, 5), (64, 4, 5, 9)]
    assert [p.seq_len for p in plan_phases([[16, 3], [32, 5]], 64, 4, steps=2)] == [16, 64]   # a short run
    for bad, match in (([[32, 3], [16, 5]], "longer than the one before"), ([[64, 3]], "shorter than seq_len"),
                       ([[16, 3], [32, 3]], "ends at or before step 3"), ([[48, 3]], "do not split"),
                       ([[16]], "pairs of integers"), ([["16", 3]], "pairs of integers")):
        with pytest.raises(NanoK2Error, match=match):
            plan_phases(bad, seq_len=64, batch_size=4, steps=9)
    with pytest.raises(NanoK2Error, match="shared by 2 rank"):      # 96 tokens: 3 windows of 32 for 2 ranks
        plan_phases([[32, 3]], seq_len=48, batch_size=2, steps=9, world=2)


def test_copies_repeat_spans_at_short_and_long_distances():
    distances, lengths = [], []
    for seed in range(400):
        ids = np.arange(256) + 1000                        # every token distinct: a copy is easy to find
        out = inject_copies(ids.copy(), np.random.Generator(np.random.PCG64([seed])), every=256, span=(4, 10))
        changed = np.flatnonzero(out != np.arange(256) + 1000)
        if not len(changed):
            continue
        start, length = changed[0], len(changed)
        src = out[start] - 1000
        assert 4 <= length <= 10 and np.array_equal(out[start:start + length], np.arange(src, src + length) + 1000)
        distances.append(start - src)
        lengths.append(length)
    assert len(distances) > 350
    distances = np.array(distances)
    # log-uniform in [span, 256 - span]: about as many copies under 16 tokens back as over 64
    assert distances.min() >= 4 and distances.max() <= 252
    assert 0.15 < (distances < 16).mean() < 0.45 and 0.15 < (distances > 64).mean() < 0.45
    assert set(lengths) == set(range(4, 11))
    a = inject_copies(np.arange(64), np.random.Generator(np.random.PCG64([7])), every=16, span=(4, 6))
    b = inject_copies(np.arange(64), np.random.Generator(np.random.PCG64([7])), every=16, span=(4, 6))
    assert np.array_equal(a, b) and not np.array_equal(a, np.arange(64))


def test_step_batches(dataset):
    # no curriculum: exactly the dataset's own order, as before
    plain = StepBatches(dataset, 32, 4, 2, steps=10, seed=3, eval_windows=4)
    ref = TokenDataset(dataset, 32, seed=3, eval_windows=4)
    b = plain.batches(5)
    assert torch.equal(b[1].inputs, ref.train_batch(5 * 8 + 4, 4).inputs)

    kw = dict(seq_len=64, batch_size=2, grad_accum=2, steps=12, seed=1, eval_windows=3,
              window_schedule=[[16, 4], [32, 8]], copy_every=16)
    data = StepBatches(dataset, **kw)
    shapes = [tuple(data.batches(s)[0].inputs.shape) for s in (0, 3, 4, 7, 8, 11)]
    assert shapes == [(8, 16)] * 2 + [(4, 32)] * 2 + [(2, 64)] * 2
    # a function of the step: a fresh reader gives the same batch; two ranks' rows make one process's
    again = StepBatches(dataset, **kw)
    for step in (2, 6, 9):
        one = data.batches(step)
        assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(one, again.batches(step)))
        ranks = [StepBatches(dataset, **kw, world=2).batches(step, rank=r, world=2) for r in (0, 1)]
        for m in range(2):
            assert torch.equal(torch.cat([ranks[0][m].inputs, ranks[1][m].inputs]), one[m].inputs)
            assert torch.equal(one[m].inputs[:, 1:], one[m].targets[:, :-1])      # targets stay the shifted ids
    # the copies change the text
    plain_short = StepBatches(dataset, **{**kw, "copy_every": 0})
    assert not torch.equal(data.batches(1)[0].inputs, plain_short.batches(1)[0].inputs)
    # no training window of any length reads into the held-out text (beyond the one token that the last
    # window's target shares with it, as without a curriculum)
    start = data.final.eval_start()
    assert start[0] > 0                                   # held out in the last of several shards
    for length, ds in data.datasets.items():
        assert all((shard, off + length) <= start for shard, off in ds.train_windows)
        assert len(ds.train_windows) > 0
    with pytest.raises(NanoK2Error, match="copy_span"):
        StepBatches(dataset, **{**kw, "copy_span": (1, 3)})


def test_copies_need_pretraining_text(tmp_path):
    w = ShardWriter(tmp_path / "sft", 512, "sft")
    w.add(np.arange(300), np.ones(300))
    w.close()
    with pytest.raises(NanoK2Error, match="pre-training text.*sft dataset"):
        StepBatches(tmp_path / "sft", 32, 2, 1, steps=4, copy_every=16)


def test_resume_across_a_phase_change_follows_the_uninterrupted_run(dataset, tmp_path):
    args = ["preset=tiny", "model={}", "seq_len=64", "batch_size=2", "grad_accum=1", "warmup=1", "lr=3e-3",
            "eval_every=3", "eval_sequences=2", "progress=false", "steps=6", "ckpt_every=2", "keep_last=5",
            "window_schedule=[[16,2],[32,4]]", "copy_every=16", f"data={dataset}"]
    base = get_recipe("tiny-pretrain").stages[0]
    ref = train(apply_overrides(base, [*args, f"out={tmp_path / 'ref'}"]))
    assert [r["seq_len"] for r in ref] == [16, 16, 32, 32, 64, 64]
    # as if killed after step 3: only the step-2 checkpoint survives (phase 16), then resume
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", run)
    for name in ("step_000004", "step_000006"):
        shutil.rmtree(run / "checkpoints" / name)
    shutil.rmtree(run / "final")
    resumed = train(apply_overrides(base, [*args, f"out={run}"]), resume=True)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref[2:]]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
