"""`nanok2 bench quant`: decode tok/s with fp32, bf16 and INT4 weights on the same model, side by side.

Why K2's model card says "about 2x": at batch 1 a decode step reads every active weight once, and in K2
the routed experts are about two thirds of those bytes; storing them in 4 bits instead of 16 bounds the
gain at 1 / (1/3 + 2/3 · 1/4) = 2x. INT4 on every linear layer but router, embeddings and lm_head moves
the bound towards 4x. The `bench` preset keeps K2's proportion (`nanok2 info --preset bench`), so its
ratios mean what K2's mean. Each variant is measured with the engine (`bench.decode.measure_decode`),
in interleaved rounds (the median of them), so a busy machine slows all of them alike.
"""
from __future__ import annotations

import copy
import os

import torch

from nanok2.bench.report import emit, machine, peak_rss_bytes, table


def weight_bytes(model) -> int:
    """Bytes of the stored weights (the checkpoint form; INT4 = packed nibbles + bf16 scales)."""
    return sum(t.nbytes for t in model.state_dict().values())


def decode_bytes_per_token(model) -> int:
    """Weight bytes read per generated token at batch 1: every dense weight, one embedding row, top-k experts."""
    from nanok2.bench.decode import step_bytes
    from nanok2.moe import MoE

    n_moe = sum(isinstance(m, MoE) for m in model.modules())
    return step_bytes(model, 1, [model.args.num_experts_per_tok] * n_moe, 0, 0)


def quantized_bytes(model) -> tuple[int, int]:
    """(bf16 bytes, INT4 bytes) of the weights that were quantized: packed nibbles + bf16 scales vs 2 per weight."""
    from nanok2.int4_linear import Int4Linear

    mods = [m for m in model.modules() if isinstance(m, Int4Linear)]
    return (sum(2 * m.in_features * m.out_features for m in mods),
            sum(m.weight_packed.nbytes + m.weight_scale.nbytes for m in mods))


def run(args) -> int:
    from nanok2.bench.decode import measure_decode, median_by_speed
    from nanok2.checkpoint import load_model
    from nanok2.config import ModelArgs
    from nanok2.errors import NanoK2Error
    from nanok2.model import build_model
    from nanok2.quant import quantize_model

    if bool(args.preset) == bool(args.model):
        raise NanoK2Error("give exactly one of --preset NAME or --model PATH")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.preset:
        fp32 = build_model(ModelArgs.from_preset(args.preset), dtype=torch.float32).eval()
    else:
        fp32 = load_model(args.model, dtype="float32").eval()
        if getattr(fp32, "quantization_config", None):
            raise NanoK2Error(f"{args.model} is already quantized: give the float checkpoint")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    variants = {"fp32": fp32, "bf16": bf16,
                "int4_experts": quantize_model(copy.deepcopy(bf16), "experts", args.group_size),
                "int4_all_linear": quantize_model(copy.deepcopy(bf16), "linear", args.group_size)}
    if args.skip_fp32:
        del variants["fp32"]
    rounds = {name: [] for name in variants}
    for _ in range(args.rounds):                     # interleaved: a load spike hits every variant alike
        for name, model in variants.items():
            rounds[name].append(measure_decode(model, 1, args.prompt_len, args.new_tokens))
    # the median round, not the best: a faster variant's measurements are shorter, and the fastest of a few
    # short windows catches the machine's fast moments more than the fastest of long ones
    median = {name: median_by_speed(rs)["decode_tok_s"] for name, rs in rounds.items()}

    base = variants["bf16"]
    rows, result = [], dict(bench="quant", model=args.model or args.preset, group_size=args.group_size,
                            threads=torch.get_num_threads(), load_avg=round(os.getloadavg()[0], 2), **machine())
    for name, model in variants.items():
        wb, tb = weight_bytes(model), decode_bytes_per_token(model)
        tok_s = median[name]
        rows.append([name, f"{tok_s:.2f}", f"{tok_s / median['bf16']:.2f}x", f"{wb / 2**20:.1f}",
                     f"{weight_bytes(base) / wb:.2f}x", f"{tb / 2**20:.1f}", f"{decode_bytes_per_token(base) / tb:.2f}x",
                     f"{tb * tok_s / 1e9:.2f}"])
        result.update({f"decode_tok_s_{name}": round(tok_s, 2), f"weight_bytes_{name}": wb,
                       f"bytes_per_token_{name}": tb})
    result["decode_tok_s_int4"] = result["decode_tok_s_int4_experts"]
    result["speedup_int4_vs_bf16"] = round(median["int4_experts"] / median["bf16"], 3)
    result["speedup_int4_all_linear_vs_bf16"] = round(median["int4_all_linear"] / median["bf16"], 3)
    result["bound_int4_vs_bf16"] = round(decode_bytes_per_token(base) / result["bytes_per_token_int4_experts"], 3)
    result["bound_int4_all_linear_vs_bf16"] = round(decode_bytes_per_token(base)
                                                    / result["bytes_per_token_int4_all_linear"], 3)
    for name in ("int4_experts", "int4_all_linear"):
        b16, b4 = quantized_bytes(variants[name])
        result[f"quantized_weights_smaller_{name}"] = round(b16 / b4, 3)
    result["weights_smaller_int4_experts"] = round(weight_bytes(base) / result["weight_bytes_int4_experts"], 3)
    result["weights_smaller_int4_all_linear"] = round(weight_bytes(base) / result["weight_bytes_int4_all_linear"], 3)
    result["peak_rss_bytes"] = peak_rss_bytes()
    text = table(["weights", "decode tok/s", "vs bf16", "weights MiB", "smaller", "MiB/token", "bound vs bf16",
                  "GB/s"], rows)
    text += (f"\nbatch 1, {args.new_tokens} new tokens after a {args.prompt_len}-token prompt, median of {args.rounds} "
             f"interleaved rounds; {result['threads']} threads, load average {result['load_avg']} on "
             f"{result['cpus']} CPUs. 'bound' = bf16 bytes per token / these bytes per token; the quantized weights "
             f"themselves are {result['quantized_weights_smaller_int4_experts']:.2f}x smaller than in bf16.")
    emit(text, result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("quant", help="decode tok/s with fp32, bf16, INT4 experts, INT4 all linear weights")
    p.add_argument("--preset", help="a named preset with random weights (bench keeps K2's byte proportions)")
    p.add_argument("--model", help="a float checkpoint folder")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds (median of)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-fp32", action="store_true", help="leave out the fp32 row (saves memory and time)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run)
