"""`nanok2 bench moe-scaling`: decode cost must not grow with the number of experts at fixed top-k.

The same MoE layer stack is built with 8, 64 and 256 routed experts of identical size and top-k, so
the active parameters per token are the same; a forward of a few tokens is timed for each, side by
side. With experts run grouped (only those that received tokens execute), 256 vs 8 should cost about
the same; a dense "run every expert" implementation would cost 32x.
"""
from __future__ import annotations

from nanok2.bench.report import emit, table, timed
from nanok2.config import ModelArgs


def run(args) -> int:
    import torch

    from nanok2.model import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    base = dict(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=32, first_k_dense_replace=0, num_experts_per_tok=args.top_k, n_shared_experts=1,
                moe_intermediate_size=args.hidden, rope_scaling=None, bos_token_id=None, eos_token_id=None)
    rows, times = [], {}
    ids = torch.randint(0, 1024, (1, args.tokens))
    for n in args.experts:
        model = build_model(ModelArgs.from_dict({**base, "n_routed_experts": n})).eval()
        with torch.inference_mode():
            times[n] = timed(lambda: model(ids), repeat=args.repeat, warmup=2)  # noqa: B023 (called at once)
    first = args.experts[0]
    for n in args.experts:
        rows.append([n, args.top_k, f"{times[n] * 1e3:.2f}", f"{times[n] / times[first]:.2f}x"])
    result = {"bench": "moe-scaling", "tokens": args.tokens, "top_k": args.top_k,
              **{f"ms_{n}_experts": round(times[n] * 1e3, 3) for n in args.experts},
              "ratio_max_vs_min_experts": round(times[args.experts[-1]] / times[first], 3)}
    emit(table(["experts", "top-k", "forward ms", f"vs {first}"], rows), result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("moe-scaling", help="forward time for 8/64/256 experts at the same active size")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run)
