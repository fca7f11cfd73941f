"""`nanok2 cost`: what training a model on N tokens costs in FLOPs, GPU-hours and dollars, formula shown.

FLOPs per trained token = 6 · N_matmul + 6 · L · H · (d_qk + d_v) · ctx / 2
- N_matmul: the parameters a token multiplies with: every active parameter (8 of 384 routed experts,
  the shared expert, attention, dense MLP, router, lm_head) except the input embedding table, which is
  a lookup. 6 = 2 (multiply-add) × 3 (forward + two backward matmuls).
- attention scores and the weighted sum of values: per layer and head 2·d_qk + 2·d_v FLOPs per
  (query, key) pair forward, ×3 with backward; a causal query sees ctx/2 keys on average.
The trainer's MFU uses the same count (`train_flops_per_token`).
"""
from __future__ import annotations

from nanok2.config import ModelArgs

# dense bf16 tensor-core peaks (no sparsity), FLOP/s
GPU_PEAK_FLOPS = {"h800": 989e12, "h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12}


def matmul_params(args: ModelArgs) -> int:
    """Active parameters per token minus the input embedding table (a lookup, no FLOPs)."""
    from nanok2.info import model_stats

    s = model_stats(args)
    return s.active_params - (0 if args.tie_word_embeddings else s.params_by_component["embeddings"])


def train_flops_per_token(args: ModelArgs, ctx: int, n_matmul: int | None = None) -> float:
    n = matmul_params(args) if n_matmul is None else n_matmul
    attention = 6 * args.num_hidden_layers * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) * ctx / 2
    return 6 * n + attention


def training_cost(args: ModelArgs, tokens: float, ctx: int, peak_flops: float, mfu: float, usd_per_gpu_hour: float) -> dict:
    n = matmul_params(args)
    per_token = train_flops_per_token(args, ctx, n)
    flops = per_token * tokens
    gpu_hours = flops / (peak_flops * mfu) / 3600
    return {"matmul_params": n, "flops_per_token": per_token, "attention_share": 1 - 6 * n / per_token,
            "flops": flops, "gpu_hours": gpu_hours, "usd": gpu_hours * usd_per_gpu_hour}


def run(args) -> int:
    from nanok2.errors import NanoK2Error

    margs = ModelArgs.from_preset(args.preset)
    gpu = args.gpu.lower()
    if gpu not in GPU_PEAK_FLOPS:
        raise NanoK2Error(f"unknown GPU {args.gpu!r}; known: {', '.join(GPU_PEAK_FLOPS)}")
    peak = GPU_PEAK_FLOPS[gpu]
    c = training_cost(margs, args.tokens, args.ctx, peak, args.mfu, args.usd_per_gpu_hour)
    L, H, dqk, dv = margs.num_hidden_layers, margs.num_attention_heads, margs.qk_head_dim, margs.v_head_dim
    print(f"training cost of {args.preset} on {args.tokens:.3g} tokens at context {args.ctx}\n"
          f"  FLOPs/token = 6·N_matmul + 6·L·H·(d_qk+d_v)·ctx/2\n"
          f"              = 6·{c['matmul_params']:,} + 6·{L}·{H}·({dqk}+{dv})·{args.ctx}/2"
          f" = {c['flops_per_token']:.4g}  (attention {c['attention_share']:.1%})\n"
          f"  N_matmul    = active parameters per token without the input embedding table\n"
          f"  FLOPs       = FLOPs/token · tokens = {c['flops']:.4g}\n"
          f"  GPU-hours   = FLOPs / ({gpu} {peak / 1e12:.0f} TFLOP/s dense bf16 · MFU {args.mfu}) / 3600"
          f" = {c['gpu_hours']:,.0f}\n"
          f"  cost        = GPU-hours · {args.usd_per_gpu_hour} USD = {c['usd'] / 1e6:.2f} M USD\n"
          f"  assumptions: one pass over the tokens at one context length; no failed runs, ablations,\n"
          f"  long-context or post-training stages (the reported ~4.6 M USD is the same kind of figure).")
    return 0


def register(sub) -> None:
    p = sub.add_parser("cost", help="training FLOPs, GPU-hours and dollars for a preset and a token count")
    p.add_argument("--preset", default="kimi-k2-thinking")
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 15.5e12")
    p.add_argument("--ctx", type=int, default=4096, help="training context length (K2: 4k for the bulk)")
    p.add_argument("--gpu", default="h800", help=f"one of {', '.join(GPU_PEAK_FLOPS)}")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=2.0, help="rental price (default 2 USD)")
    p.set_defaults(func=run)
