"""`nanok2 bench optim`: MuonClip vs AdamW on the same small K2 model and data, side by side.

1. Token efficiency. Each optimizer trains the same ~1M-parameter MLA + MoE model from the same
   initialisation on the same data (constant learning rate after a short warm-up). AdamW's learning rate
   is the one of a small sweep with the lowest final loss: that final loss is the target. MuonClip's is
   the one of its sweep that reaches the target in the fewest steps (the table shows every rate).
   The figure is `steps_ratio_muonclip_vs_adamw`: those steps divided by AdamW's steps (Moonlight
   reports about 0.5 at scale). Losses are 10-step trailing means of the training loss; the data is
   never repeated, so the training loss is a held-out loss.
2. QK-Clip. MuonClip at an aggressive learning rate, with and without clipping: the largest attention
   logit seen in any forward of the run and its mean over the last 20 steps, against τ (smaller than
   K2's 100: a small model's logits are smaller), and the final loss of both. The logits are read in
   the forward, before that step's clip (as K2 does), so the clipped run can read above τ by what one
   update and one new batch add; the clip itself caps the batch it saw exactly (tests/test_optim.py).

The data is generated text read as bytes: made-up words that follow each other by a word-bigram rule,
so the model has to learn spelling (attending to the bytes before) and which word comes next; it is
deterministic, offline and never repeats within a run. Every run goes through the trainer
(`nanok2.train.train`), the same code path as `nanok2 train`.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nanok2.bench.report import emit, table

VOCAB = 128   # bytes of ASCII text
MODEL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
             first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)


def generated_text(n: int, seed: int = 0, n_words: int = 300) -> np.ndarray:
    """n bytes (as token ids) of a made-up language: words of 1-3 syllables; each word is followed by one
    of its 3 usual successors (70%) or a Zipf-distributed word (30%); sentences end at random."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(n_words)]
    zipf = 1.0 / np.arange(1, n_words + 1)
    zipf /= zipf.sum()
    successors = rng.integers(0, n_words, size=(n_words, 3))
    pieces, size, w = [], 0, 0
    while size < n:
        w = int(successors[w, rng.integers(0, 3)]) if rng.random() < 0.7 else int(rng.choice(n_words, p=zipf))
        piece = words[w] + (". " if rng.random() < 0.1 else " ")
        pieces.append(piece)
        size += len(piece)
    return np.frombuffer("".join(pieces).encode("ascii")[:n], dtype=np.uint8).astype(np.int64)


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
    tokens = generated_text(max(args.steps, args.clip_steps) * 16 * 65 + 20_000)   # never repeated
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
        target = final["adamw", best_adam]
        reach = {lr: steps_to_reach([r["loss"] for r in runs["muonclip", lr]], target) for lr in args.muon_lrs}
        best_muon = min(args.muon_lrs, key=lambda lr: (reach[lr] or math.inf, final["muonclip", lr]))
        ratio = reach[best_muon] / args.steps if reach[best_muon] else math.inf

        clip_lr = args.clip_lr
        unclipped = run_one(data, f"{tmp}/noclip", "muonclip", clip_lr, args.clip_steps, tau=None)
        clipped = run_one(data, f"{tmp}/clip", "muonclip", clip_lr, args.clip_steps, tau=args.tau)

    rows = [[opt, lr, f"{final[opt, lr]:.4f}",
             reach[lr] if opt == "muonclip" else args.steps if lr == best_adam else "",
             "<- target" if (opt, lr) == ("adamw", best_adam) else "<- best" if (opt, lr) == ("muonclip", best_muon) else ""]
            for opt, lr in runs]
    max_clip = max(r["max_logit"] for r in clipped)
    max_noclip = max(r["max_logit"] for r in unclipped)
    late_clip = float(np.mean([r["max_logit"] for r in clipped[-20:]]))
    late_noclip = float(np.mean([r["max_logit"] for r in unclipped[-20:]]))
    # how much the max logit moves from one step's forward to the next (new batch, one update) where the
    # unclipped run is past tau: the margin by which a clip to tau can read above tau on the next forward
    past = [r["max_logit"] for r in unclipped if r["max_logit"] > args.tau]
    step_change = float(np.median(np.abs(np.diff(past)) / np.asarray(past[:-1]))) if len(past) > 2 else 0.0
    loss_clip = float(smooth([r["loss"] for r in clipped])[-1])
    loss_noclip = float(smooth([r["loss"] for r in unclipped])[-1])
    text = "\n".join([
        f"MuonClip vs AdamW: {args.steps} steps of 16x64 tokens of generated text (bytes)",
        table(["optimizer", "lr", "final loss (10-step mean)", "steps to AdamW's final loss", ""], rows),
        f"MuonClip (lr {best_muon}) reaches AdamW's final loss {target:.4f} (lr {best_adam}) at step "
        f"{reach[best_muon]} of {args.steps}: ratio {ratio:.2f}",
        "",
        f"QK-Clip at lr {clip_lr}, {args.clip_steps} steps, tau = {args.tau}:",
        table(["run", "max attention logit (all steps)", "mean of the last 20 steps", "final loss"],
              [["without QK-Clip", f"{max_noclip:.1f}", f"{late_noclip:.1f}", f"{loss_noclip:.4f}"],
               ["with QK-Clip", f"{max_clip:.1f}", f"{late_clip:.1f}", f"{loss_clip:.4f}"]]),
        "(logits are those of each step's forward, before that step's clip: a head clipped to tau on one batch "
        "can read above it on the next, after one more update; without the clip, past tau, the max logit moves "
        f"by a median {100 * step_change:.1f}% from one step to the next)",
    ])
    result = {"bench": "optim", "steps": args.steps,
              "adamw_lr": best_adam, "muonclip_lr": best_muon,
              "adamw_final_loss": round(target, 4), "muonclip_final_loss": round(final["muonclip", best_muon], 4),
              "muonclip_steps_to_adamw_final": reach[best_muon], "steps_ratio_muonclip_vs_adamw": round(ratio, 3),
              "tau": args.tau, "clip_lr": clip_lr, "max_logit_with_clip": round(max_clip, 2),
              "max_logit_without_clip": round(max_noclip, 2), "late_max_logit_with_clip": round(late_clip, 2),
              "late_max_logit_without_clip": round(late_noclip, 2),
              "max_logit_step_change": round(step_change, 4), "final_loss_with_clip": round(loss_clip, 4),
              "final_loss_without_clip": round(loss_noclip, 4), "seconds": round(time.perf_counter() - started, 1)}
    emit(text, result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("optim", help="MuonClip vs AdamW: steps to the same loss; max logit with/without QK-Clip")
    p.add_argument("--steps", type=int, default=120, help="steps per run of the learning-rate sweep")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[1e-2, 3e-2])
    p.add_argument("--clip-lr", type=float, default=0.02,
                   help="the aggressive learning rate of the QK-Clip runs (unclipped, the max logit passes 2x tau)")
    p.add_argument("--clip-steps", type=int, default=200)
    p.add_argument("--tau", type=float, default=20.0, help="QK-Clip threshold (K2: 100)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run)
