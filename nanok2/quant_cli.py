"""`nanok2 quantize`: a float checkpoint in, K2-Thinking's INT4 checkpoint (compressed-tensors pack-quantized) out."""
from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    import torch

    from nanok2.checkpoint import load_model
    from nanok2.errors import NanoK2Error
    from nanok2.info import human
    from nanok2.quant import copy_extra_files, quantize_model, save_quantized

    src, out = Path(args.model), Path(args.out)
    if src.resolve() == out.resolve():
        raise NanoK2Error("--out must differ from --model (the float weights would be overwritten)")
    model = load_model(src, dtype="bfloat16")
    if getattr(model, "quantization_config", None):
        raise NanoK2Error(f"{src} is already quantized (its config.json has a quantization_config)")
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with torch.no_grad():
        quantize_model(model, targets=args.targets, group_size=args.group_size)
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    save_quantized(model, out, max_shard_size=args.max_shard_size)
    extra = copy_extra_files(src, out)
    print(f"quantized {src} -> {out}: INT4 {args.targets} (group {args.group_size}), "
          f"weights {human(before, 'B')} -> {human(after, 'B')} ({before / after:.2f}x smaller)"
          + (f"; copied {', '.join(extra)}" if extra else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("quantize", help="write an INT4 checkpoint as K2-Thinking ships (compressed-tensors)")
    p.add_argument("--model", required=True, help="input checkpoint folder (float weights)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--group-size", type=int, default=32, help="inputs per scale (K2: 32)")
    p.add_argument("--targets", choices=["experts", "linear"], default="experts",
                   help="experts: routed experts only (K2); linear: every linear layer but router/embeddings/lm_head")
    p.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=run)
