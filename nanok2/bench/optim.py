"""`nanok2 bench optim`: MuonClip vs AdamW on the same small K2 model and data, side by side.

1. Token efficiency. Each optimizer trains the same ~1M-parameter MLA + MoE model from the same
   initialisation on the same data, at the best learning rate of a small sweep (constant after a short
   warm-up). The figure is `steps_ratio_muonclip_vs_adamw`: the steps MuonClip needs to reach AdamW's
   final loss, divided by AdamW's steps (Moonlight reports about 0.5 at scale).
2. QK-Clip. MuonClip at an aggressive learning rate, with and without clipping: the largest attention
   logit seen in any forward of the run, against τ (smaller than K2's 100: a small model's logits are
   smaller), and the final loss of both.

The data is a synthetic language: a random second-order Markov chain over 128 tokens where each pair of
previous tokens allows a few next tokens with Zipf-like weights, so the loss has a known floor (the
chain's entropy rate) and the model must attend to the previous two tokens to reach it. Every run goes
through the trainer (`nanok2.train.train`), the same code path as `nanok2 train`.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nanok2.bench.report import emit, table

VOCAB = 128
MODEL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
             first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)


def markov_tokens(n: int, vocab: int = VOCAB, branching: int = 4, seed: int = 0) -> tuple[np.ndarray, float]:
    """n tokens of a random order-2 Markov chain, and its entropy rate in nats/token (the loss floor)."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, vocab, size=(vocab, vocab, branching))          # allowed next tokens per context
    w = 1.0 / np.arange(1, branching + 1)
    w = w / w.sum()                                                       # Zipf weights, same for every context
    choice = rng.choice(branching, size=n, p=w)
    out = np.empty(n, dtype=np.int64)
    out[:2] = rng.integers(0, vocab, size=2)
    for t in range(2, n):
        out[t] = nxt[out[t - 2], out[t - 1], choice[t]]
    entropy = float(-(w * np.log(w)).sum())    # an upper bound when two branches name the same token
    return out, entropy


def smooth(losses: list[float], window: int = 10) -> np.ndarray:
    """Trailing mean, so one lucky batch does not count as reaching a loss."""
    x = np.asarray(losses)
    c = np.cumsum(np.insert(x, 0, 0.0))
    return np.array([(c[i + 1] - c[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(x))])


def steps_to_reach(losses: list[float], target: float) -> int | None:
    hit = np.nonzero(smooth(losses) <= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def run_one(data: str, out: str, optimizer: str, lr: float, steps: int, tau: float | None, seed: int = 0) -> list[dict]:
    from nanok2.recipes import TrainConfig
    from nanok2.train import train

    cfg = TrainConfig(preset="tiny", model=dict(MODEL), data=data, out=out, seq_len=64, batch_size=16, steps=steps,
                      optimizer=optimizer, lr=lr, schedule="constant", warmup=10, weight_decay=0.1, grad_clip=1.0,
                      qk_clip_tau=tau, eval_sequences=8, eval_every=0, ckpt_every=0, progress=False, seed=seed)
    return train(cfg)


def run(args) -> int:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokens, floor = markov_tokens(args.steps * 16 * 65 + 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        from nanok2.data import ShardWriter
        data = str(Path(tmp) / "data")
        w = ShardWriter(data, VOCAB)
        w.add(tokens)
        w.close()
        runs: dict[tuple[str, float], list[dict]] = {}
        for opt, lrs in (("adamw", args.adamw_lrs), ("muonclip", args.muon_lrs)):
            for lr in lrs:
                runs[opt, lr] = run_one(data, f"{tmp}/{opt}-{lr}", opt, lr, args.steps, tau=None)
        final = {k: float(smooth([r["loss"] for r in v])[-1]) for k, v in runs.items()}
        best_adam = min(args.adamw_lrs, key=lambda lr: final["adamw", lr])
        best_muon = min(args.muon_lrs, key=lambda lr: final["muonclip", lr])
        target = final["adamw", best_adam]
        reach = steps_to_reach([r["loss"] for r in runs["muonclip", best_muon]], target)
        ratio = reach / args.steps if reach else math.inf

        clip_lr = args.clip_lr
        unclipped = run_one(data, f"{tmp}/noclip", "muonclip", clip_lr, args.clip_steps, tau=None)
        clipped = run_one(data, f"{tmp}/clip", "muonclip", clip_lr, args.clip_steps, tau=args.tau)

    rows = [[opt, lr, f"{final[opt, lr]:.4f}", "best" if lr == (best_adam if opt == "adamw" else best_muon) else ""]
            for opt, lr in runs]
    max_clip = max(r["max_logit"] for r in clipped)
    max_noclip = max(r["max_logit"] for r in unclipped)
    loss_clip = float(smooth([r["loss"] for r in clipped])[-1])
    loss_noclip = float(smooth([r["loss"] for r in unclipped])[-1])
    text = "\n".join([
        f"MuonClip vs AdamW: {args.steps} steps of 16x64 tokens, order-2 Markov data over {VOCAB} tokens "
        f"(loss floor <= {floor:.3f} nats)",
        table(["optimizer", "lr", "final loss (10-step mean)", ""], rows),
        f"MuonClip (lr {best_muon}) reaches AdamW's final loss {target:.4f} (lr {best_adam}) at step {reach} "
        f"of {args.steps}: ratio {ratio:.2f}",
        "",
        f"QK-Clip at lr {clip_lr}, {args.clip_steps} steps, tau = {args.tau}:",
        table(["run", "max attention logit", "final loss"],
              [["without QK-Clip", f"{max_noclip:.1f}", f"{loss_noclip:.4f}"],
               ["with QK-Clip", f"{max_clip:.1f}", f"{loss_clip:.4f}"]]),
    ])
    result = {"bench": "optim", "steps": args.steps, "loss_floor": round(floor, 4),
              "adamw_lr": best_adam, "muonclip_lr": best_muon,
              "adamw_final_loss": round(target, 4), "muonclip_final_loss": round(final["muonclip", best_muon], 4),
              "muonclip_steps_to_adamw_final": reach, "steps_ratio_muonclip_vs_adamw": round(ratio, 3),
              "tau": args.tau, "clip_lr": clip_lr, "max_logit_with_clip": round(max_clip, 2),
              "max_logit_without_clip": round(max_noclip, 2), "final_loss_with_clip": round(loss_clip, 4),
              "final_loss_without_clip": round(loss_noclip, 4), "seconds": round(time.perf_counter() - started, 1)}
    emit(text, result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("optim", help="MuonClip vs AdamW: steps to the same loss; max logit with/without QK-Clip")
    p.add_argument("--steps", type=int, default=150, help="steps per run of the learning-rate sweep")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    p.add_argument("--clip-lr", type=float, default=0.1, help="the aggressive learning rate of the QK-Clip runs")
    p.add_argument("--clip-steps", type=int, default=100)
    p.add_argument("--tau", type=float, default=30.0, help="QK-Clip threshold (K2: 100)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run)
