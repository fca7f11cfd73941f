"""`nanok2 info`: what a model is made of — total and active parameters, bytes, KV cache per token.

Counts come from a model built on the meta device (nothing allocated), so the 1T preset is counted
in about a second and the figures are the real module shapes, not a formula that could drift.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from nanok2.config import ModelArgs

COMPONENTS = ("embeddings", "attention", "norms", "dense_mlp", "router", "shared_experts", "routed_experts", "lm_head")


def component_of(name: str) -> str:
    if name.startswith("model.embed_tokens"):
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention" if not name.endswith("layernorm.weight") else "norms"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        return "dense_mlp"
    return "norms"


@dataclass
class ModelStats:
    total_params: int
    active_params: int
    params_by_component: dict[str, int]
    active_by_component: dict[str, int]
    bytes_bf16: int
    bytes_int4_experts: int          # K2-Thinking's layout: routed experts INT4 (group 32, bf16 scales)
    bytes_int4_all_linear: int       # every linear except router, embeddings and lm_head in INT4
    kv_cache_numbers_per_token_per_layer: int
    kv_cache_bytes_per_token: int    # all layers, bf16
    decode_bytes_per_token_bf16: int # weights read per generated token at batch 1 (one embedding row)
    routed_share_of_decode_bytes: float
    lm_head_share_of_decode_bytes: float
    # bandwidth bounds of INT4 decode at batch 1: bf16 bytes read per token over INT4 bytes read per token
    int4_experts_decode_bound: float
    int4_all_linear_decode_bound: float


def int4_bytes(n_params: int, group_size: int = 32) -> int:
    """4 bits per weight plus one bf16 scale per group."""
    return n_params // 2 + (n_params // group_size) * 2


def model_stats(args: ModelArgs) -> ModelStats:
    from nanok2.model import build_model

    model = build_model(args, device="meta")
    by_comp = dict.fromkeys(COMPONENTS, 0)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:          # tied lm_head counts once
            continue
        seen.add(id(p))
        by_comp[component_of(name)] += p.numel()
    total = sum(by_comp.values())
    active_by = dict(by_comp)
    if args.n_routed_experts:
        active_by["routed_experts"] = by_comp["routed_experts"] * args.num_experts_per_tok // args.n_routed_experts
    active = sum(active_by.values())

    linear_non_expert = by_comp["attention"] + by_comp["dense_mlp"] + by_comp["shared_experts"]
    bf16 = 2 * total
    int4_experts = bf16 - 2 * by_comp["routed_experts"] + int4_bytes(by_comp["routed_experts"])
    int4_all = int4_experts - 2 * linear_non_expert + int4_bytes(linear_non_expert)

    # decode at batch 1 reads every active weight once, but only one row of the embedding table
    emb_read = 0 if args.tie_word_embeddings else by_comp["embeddings"]
    decode_params = active - emb_read + args.hidden_size
    decode_bytes = 2 * decode_params
    routed_share = 2 * active_by["routed_experts"] / decode_bytes
    lm_head_share = 2 * active_by["lm_head"] / decode_bytes if not args.tie_word_embeddings else 0.0
    active_linear = active_by["attention"] + active_by["dense_mlp"] + active_by["shared_experts"]
    decode_int4_experts = decode_bytes - 2 * active_by["routed_experts"] + int4_bytes(active_by["routed_experts"])
    decode_int4_all = decode_int4_experts - 2 * active_linear + int4_bytes(active_linear)
    return ModelStats(
        total_params=total, active_params=active, params_by_component=by_comp, active_by_component=active_by,
        bytes_bf16=bf16, bytes_int4_experts=int4_experts, bytes_int4_all_linear=int4_all,
        kv_cache_numbers_per_token_per_layer=args.kv_cache_dim,
        kv_cache_bytes_per_token=2 * args.kv_cache_dim * args.num_hidden_layers,
        decode_bytes_per_token_bf16=decode_bytes, routed_share_of_decode_bytes=routed_share,
        lm_head_share_of_decode_bytes=lm_head_share,
        int4_experts_decode_bound=decode_bytes / decode_int4_experts,
        int4_all_linear_decode_bound=decode_bytes / decode_int4_all,
    )


def human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_stats(name: str, s: ModelStats, args: ModelArgs) -> str:
    lines = [f"{name}: {args.num_hidden_layers} layers ({args.first_k_dense_replace} dense), hidden {args.hidden_size}, "
             f"{args.n_routed_experts} experts (top-{args.num_experts_per_tok}, {args.n_shared_experts} shared), "
             f"vocab {args.vocab_size}",
             f"  total params   {s.total_params:>18,}  ({human(s.total_params)})",
             f"  active params  {s.active_params:>18,}  ({human(s.active_params)} per token)",
             "",
             f"  {'component':<16}{'total':>18}{'active':>18}"]
    for c in COMPONENTS:
        lines.append(f"  {c:<16}{s.params_by_component[c]:>18,}{s.active_by_component[c]:>18,}")
    lines += ["",
              f"  weights bf16                {human(s.bytes_bf16, 'B')}",
              f"  weights INT4 experts (K2)   {human(s.bytes_int4_experts, 'B')}",
              f"  weights INT4 all linear     {human(s.bytes_int4_all_linear, 'B')}",
              f"  decode bytes/token (bf16)   {human(s.decode_bytes_per_token_bf16, 'B')}  "
              f"(routed experts {100 * s.routed_share_of_decode_bytes:.1f}%, lm_head "
              f"{100 * s.lm_head_share_of_decode_bytes:.1f}%)",
              f"  INT4 decode bound (bytes)   {s.int4_experts_decode_bound:.2f}x experts, "
              f"{s.int4_all_linear_decode_bound:.2f}x all linear (vs bf16, batch 1)",
              f"  KV cache per token          {s.kv_cache_numbers_per_token_per_layer} numbers/layer, "
              f"{human(s.kv_cache_bytes_per_token, 'B')} in bf16 over {args.num_hidden_layers} layers "
              f"(plain MHA: {2 * args.num_attention_heads * args.qk_head_dim} numbers/layer, "
              f"{2 * args.num_attention_heads * args.qk_head_dim / args.kv_cache_dim:.1f}x more)"]
    return "\n".join(lines)


def run(args) -> int:
    from nanok2.errors import NanoK2Error

    if bool(args.preset) == bool(args.model):
        raise NanoK2Error("give exactly one of --preset NAME or --model PATH")
    if args.preset:
        margs, name = ModelArgs.from_preset(args.preset), args.preset
    else:
        from nanok2.errors import ConfigError
        try:
            margs, name = ModelArgs.from_hf_config(args.model), args.model
        except ConfigError as e:
            raise NanoK2Error(str(e)) from None
    stats = model_stats(margs)
    if args.json:
        print(json.dumps({"model": name, **stats.__dict__}))
    else:
        print(format_stats(name, stats, margs))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="parameters, bytes and KV cache of a preset or checkpoint")
    p.add_argument("--preset", help="a named preset (see nanok2.config.PRESETS)")
    p.add_argument("--model", help="a checkpoint folder with config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
