"""The trainer: recipes and overrides, kill -9 and exact resume, FSDP2 under torchrun = one process, bad input,
SFT with loss masks, `nanok2 cost`."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanok2.bench.optim import generated_text
from nanok2.checkpoint import load_model
from nanok2.cli import main
from nanok2.data import ShardWriter, TokenDataset
from nanok2.errors import CheckpointError, NanoK2Error
from nanok2.model import build_model
from nanok2.recipes import TrainConfig, apply_overrides, get_recipe
from nanok2.train import train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# a fast tiny run; lr high enough that the weights, the router bias and the momentum all matter
ARGS = ["preset=tiny", "model={}", "seq_len=32", "batch_size=4", "grad_accum=2", "warmup=2", "lr=3e-3",
        "eval_every=4", "eval_sequences=4", "bias_update_speed=1e-2", "seq_aux_alpha=1e-4", "progress=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pt"
    w = ShardWriter(path, 512)
    rng = np.random.default_rng(0)
    for _ in range(10):   # a little structure (a repeated bigram walk) so the loss moves
        start = rng.integers(0, 512)
        w.add((start + np.cumsum(rng.integers(1, 4, 800))) % 512)
    w.close()
    return str(path)


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "nanok2.cli", "train", "--recipe", "tiny-pretrain", *args],
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "each step logged once"
    return {r["step"]: r["loss"] for r in rows}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_recipes_and_overrides():
    cfg = apply_overrides(get_recipe("tiny-pretrain").stages[0],
                          ["steps=7", "lr=1e-4", "qk_clip_tau=none", "betas=[0.9,0.99]", "model.hidden_size=96"])
    assert (cfg.steps, cfg.lr, cfg.qk_clip_tau, cfg.betas, cfg.model["hidden_size"]) == (7, 1e-4, None, (0.9, 0.99), 96)
    assert cfg.model_args().hidden_size == 96
    with pytest.raises(NanoK2Error, match="known recipes: tiny-pretrain, tiny-sft"):
        get_recipe("huge")
    with pytest.raises(NanoK2Error, match="unknown training key 'stpes'.*steps"):
        apply_overrides(cfg, ["stpes=3"])
    with pytest.raises(NanoK2Error, match="unknown model key 'hiden_size'.*hidden_size"):
        apply_overrides(cfg, ["model.hiden_size=3"])
    with pytest.raises(NanoK2Error, match="steps: cannot read"):
        apply_overrides(cfg, ["steps=many"])
    assert main(["train", "--recipe", "huge"]) == 2


def test_kill9_then_resume_follows_the_uninterrupted_losses(dataset, tmp_path):
    steps = ["steps=16", "ckpt_every=4", "keep_last=2", f"data={dataset}"]
    reference = _cli([*ARGS, *steps, f"out={tmp_path / 'ref'}"])
    killed = _cli([*ARGS, *steps, f"out={tmp_path / 'run'}"])
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoints" / "step_000004").exists():
        assert killed.poll() is None, killed.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)            # kill -9: no cleanup, maybe mid-save of the next checkpoint
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    done_before = max(_losses(tmp_path / "run"))
    assert done_before < 16
    resumed = _cli([*ARGS, *steps, f"out={tmp_path / 'run'}", "--resume"])
    for p in (reference, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    ref, run = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert sorted(run) == list(range(1, 17)) == sorted(ref)
    assert run == ref          # bit for bit: same data position, weights, optimizer state, bias, RNG, schedule
    assert ref[16] < ref[1] - 0.5
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_000012", "step_000016"]                   # last 2 kept, no temporary folders left
    model = load_model(tmp_path / "run" / "checkpoints" / "step_000016")   # plain HF format
    final = load_model(tmp_path / "ref" / "final")
    for (n, a), (_, b) in zip(model.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), n
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0   # balancing moved the bias
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000

    # resuming with another model config is refused before anything is written
    before = _digest(tmp_path / "run")
    cfg = apply_overrides(get_recipe("tiny-pretrain").stages[0],
                          [*ARGS, *steps, f"out={tmp_path / 'run'}", "model.hidden_size=32", "steps=30"])
    with pytest.raises(CheckpointError, match="different model config.*hidden_size: checkpoint 64 vs run 32"):
        train(cfg, resume=True)
    with pytest.raises(NanoK2Error, match="already holds a run"):
        train(apply_overrides(cfg, ["model.hidden_size=64"]))
    assert _digest(tmp_path / "run") == before


def test_fsdp2_two_ranks_match_one_process(dataset, tmp_path):
    common = [*ARGS, "steps=5", "ckpt_every=5", "eval_every=5", f"data={dataset}", "lr=1e-2", "qk_clip_tau=0.05"]
    dist = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29731", "-m", "nanok2.cli", "train", "--recipe", "tiny-pretrain", *common,
                             f"out={tmp_path / 'fsdp'}"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    train(apply_overrides(get_recipe("tiny-pretrain").stages[0], [*common, f"out={tmp_path / 'one'}"]))
    _, err = dist.communicate(timeout=300)
    assert dist.returncode == 0, err[-4000:]
    rows = {}
    for name in ("fsdp", "one"):
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["fsdp"]) == len(rows["one"]) == 5
    for a, b in zip(rows["fsdp"], rows["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["max_logit"] == pytest.approx(b["max_logit"], rel=1e-3)
    assert rows["one"][-1]["eval_loss"] == pytest.approx(rows["fsdp"][-1]["eval_loss"], rel=1e-4)
    assert max(r["max_logit"] for r in rows["one"]) > 0.05         # QK-Clip had heads to clip on both sides
    a, b = load_model(tmp_path / "fsdp" / "final"), load_model(tmp_path / "one" / "final")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=n)


def test_bad_data_and_sft_with_masks(dataset, tmp_path):
    wide = tmp_path / "wide"
    w = ShardWriter(wide, 1000)
    w.add(np.arange(1000))
    w.close()
    base = get_recipe("tiny-pretrain").stages[0]
    cfg = apply_overrides(base, [*ARGS, f"data={wide}", f"out={tmp_path / 'x'}"])
    with pytest.raises(NanoK2Error, match="vocabulary of 1000.*vocab_size 512"):
        train(cfg)
    assert not (tmp_path / "x").exists()

    pre = apply_overrides(base, [*ARGS, "steps=2", "dtype=bf16", "schedule=cosine", f"data={dataset}",
                                 f"out={tmp_path / 'pre'}"])
    train(pre)
    # SFT: the loss counts only masked-in targets; a mask of zeros on half the data must not change the mean
    sft = tmp_path / "sft"
    w = ShardWriter(sft, 512, "sft")
    rng = np.random.default_rng(1)
    for _ in range(8):
        ids = rng.integers(0, 512, 200)
        w.add(ids, (np.arange(200) // 10) % 2)
    w.close()
    # step 1's loss is the mean cross-entropy over the masked-in targets of the global batch
    check = apply_overrides(get_recipe("tiny-sft").stages[0],
                            [*ARGS, "steps=1", "init_from=none", f"data={sft}", f"out={tmp_path / 'check'}"])
    first = train(check)[0]["loss"]
    model = build_model(check.model_args(), seed=check.seed)
    data = TokenDataset(sft, check.seq_len, seed=check.seed, eval_windows=check.eval_sequences)
    total = count = 0.0
    with torch.no_grad():
        for m in range(check.grad_accum):
            b = data.train_batch(m * check.batch_size, check.batch_size)
            ce = torch.nn.functional.cross_entropy(model(b.inputs).flatten(0, 1), b.targets.flatten(), reduction="none")
            total += float((ce * b.mask.flatten()).sum())
            count += float(b.mask.sum())
    assert 0 < count < check.grad_accum * check.batch_size * check.seq_len
    assert first == pytest.approx(total / count, rel=1e-5)

    cfg = apply_overrides(get_recipe("tiny-sft").stages[0],
                          [*ARGS, "steps=3", f"data={sft}", f"out={tmp_path / 'ft'}", f"init_from={tmp_path / 'pre' / 'final'}"])
    history = train(cfg)
    assert len(history) == 3 and all(np.isfinite(r["loss"]) for r in history)
    qat = train(apply_overrides(cfg, ["qat=int4", "steps=1", f"out={tmp_path / 'qat'}"]))   # K2: INT4 QAT in post-training
    assert np.isfinite(qat[0]["loss"])
    bad_init = apply_overrides(cfg, ["model.num_hidden_layers=2", f"out={tmp_path / 'ft2'}"])
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        train(bad_init)


def test_the_loss_scores_only_weighted_positions_and_matches_the_full_logits():
    """weighted_loss skips the lm_head where the weight is 0; its loss and every gradient equal the
    weighted cross-entropy over the full logits (SFT's integer weights, 0 included)."""
    import contextlib

    from nanok2.train import weighted_loss

    cfg = apply_overrides(get_recipe("tiny-sft").stages[0], ["preset=tiny", "model={}"])
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    weights = torch.randint(0, 3, (2, 16)).to(torch.uint8) * 2          # 0, 2 and 4
    weights[1] = 0                                                       # a row with nothing trained
    losses, grads = [], []
    for fast in (True, False):
        model = build_model(cfg.model_args(), seed=0)
        if fast:
            loss = weighted_loss(model, x, y, weights, contextlib.nullcontext())
            assert model(x, scored=weights > 0).shape == (int((weights > 0).sum()), model.lm_head.out_features)
        else:
            ce = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
            loss = (ce * weights.flatten()).sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] > 0 and torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_cost_command(capsys):
    assert main(["cost", "--preset", "kimi-k2-thinking", "--tokens", "15.5e12"]) == 0
    out = capsys.readouterr().out
    assert "6·N_matmul + 6·L·H·(d_qk+d_v)·ctx/2" in out and "989 TFLOP/s" in out
    usd = float(out.split("USD = ")[1].split(" M USD")[0])
    assert 1.5 < usd < 15          # the reported ~4.6 M USD, within the same order of magnitude


def test_expert_balance_improves_with_bias_updates_and_not_without(tmp_path):
    w = ShardWriter(tmp_path / "text", 128)                 # text: tokens far from uniform, so routing starts skewed
    w.add(generated_text(60 * 8 * 33 + 5000))
    w.close()
    balance = {}
    for speed in (1e-2, 0.0):
        cfg = TrainConfig(preset="tiny", model=dict(vocab_size=128), data=str(tmp_path / "text"), seq_len=32,
                          batch_size=8, steps=60, lr=3e-3, warmup=5, schedule="constant", eval_every=0, ckpt_every=0,
                          progress=False, bias_update_speed=speed, out=str(tmp_path / f"run{speed}"))
        b = [r["balance"] for r in train(cfg)]          # max/mean tokens per expert, averaged over MoE layers
        balance[speed] = (float(np.mean(b[:5])), float(np.mean(b[-10:])))
    (on_first, on_last), (off_first, off_last) = balance[1e-2], balance[0.0]
    assert on_last < 0.85 * on_first and on_last < off_last - 0.3, balance
    assert off_last > 0.95 * off_first, balance
