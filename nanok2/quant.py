"""INT4 the way K2-Thinking ships it: symmetric group-wise weights in compressed-tensors' `pack-quantized` format.

K2-Thinking stores its routed experts in INT4 (k2-facts.md §4): each weight W [out, in] becomes
`weight_packed` int32 [out, in/8] (q + 8, eight nibbles per int32 along the input dimension, element j
of each run of 8 in bits 4j..4j+3), `weight_scale` bf16 [out, in/g] and `weight_shape` int64 [2], with
W ≈ q · scale[:, k // g], q in [-8, 7], g = 32. Everything else stays bf16.

This file holds the maths as pure functions (quantize, dequantize, pack, unpack, fake-quant with a
straight-through estimator), the transforms applied to a built model (`quantize_model` swaps modules
for nanok2.int4_linear's INT4 ones; `enable_qat` / `disable_qat` switch quantization-aware training on
the targeted weights), and the checkpoint side: K2's `quantization_config`, `save_quantized`, and
`load_quantized`, which `checkpoint.load_model` calls for any folder whose config.json has one.

Targets: "experts" is K2's choice (routed experts only); "linear" also quantizes attention, shared
experts and the dense MLP. The router (`mlp.gate`), embeddings and lm_head are never quantized.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanok2.errors import CheckpointError, NanoK2Error
from nanok2.moe import Experts, grouped_experts

BITS = 4
QMIN, QMAX = -8, 7
GROUP_SIZE = 32
TARGETS = ("experts", "linear")

# K2-Thinking's own ignore list. The router and the embeddings are not nn.Linear in transformers, so the
# "Linear" target never reaches them; lm_head is listed.
K2_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
LINEAR_IGNORE = ["lm_head", "model.embed_tokens", "re:.*mlp\\.gate$"]


# ---------------------------------------------------------------- the maths (pure functions)

def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise NanoK2Error(f"{name}: group_size must be a positive even int, got {group_size!r}")
    if in_features % group_size:
        raise NanoK2Error(f"{name}: group_size {group_size} does not divide the input dimension {in_features}")


def quantize_groupwise(w: torch.Tensor, group_size: int = GROUP_SIZE, bits: int = BITS,
                       name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 [..., out, in] in [-8, 7], scale bf16 [..., out, in/g]).

    Symmetric min-max per group of `group_size` inputs, as compressed-tensors' "minmax" observer:
    scale = max|w| / 7.5 (the 16 levels span [-8, 7]), rounded to bf16 *before* q is computed, so
    dequantize(q, scale) is exactly what a checkpoint with bf16 scales reproduces.
    """
    if bits != BITS:
        raise NanoK2Error(f"{name}: unsupported bit width {bits}; nanok2 quantizes to INT4 (bits=4) only")
    check_group_size(w.shape[-1], group_size, name)
    wg = w.detach().float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    scale = (wg.abs().amax(dim=-1) / ((QMAX - QMIN) / 2)).to(torch.bfloat16)
    scale = torch.where(scale == 0, torch.finfo(torch.bfloat16).eps, scale)      # all-zero group: q = 0 anyway
    q = torch.round(wg / scale.float()[..., None]).clamp(QMIN, QMAX).to(torch.int8)
    return q.reshape(w.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., out, in] (int), scale [..., out, in/g] -> q · scale per group, computed in fp32, returned in `dtype`."""
    groups = scale.shape[-1]
    qg = q.float().reshape(*q.shape[:-1], groups, q.shape[-1] // groups)
    return (qg * scale.float()[..., None]).reshape(q.shape).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int8 [..., in] in [-8, 7] -> int32 [..., in/8]: compressed-tensors' pack_to_int32(q, 4).

    Stored value q + 8; element j of each run of 8 in bits 4j..4j+3. Built byte by byte (two nibbles,
    low first) and reinterpreted as little-endian int32, which is that bit order.
    """
    if q.shape[-1] % 8:
        raise NanoK2Error(f"pack_int4: the packed dimension ({q.shape[-1]}) must be a multiple of 8")
    nib = (q.to(torch.int16) + 8).to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    byte = nib[..., 0] | (nib[..., 1] << 4)                          # [..., in/2] uint8
    if sys.byteorder != "little":
        byte = byte.reshape(*q.shape[:-1], -1, 4).flip(-1)
    return byte.contiguous().view(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // 8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., in/8] -> int8 [..., in] in [-8, 7] (the inverse of pack_int4)."""
    if packed.dtype != torch.int32:
        raise NanoK2Error(f"unpack_int4 expects int32 packed weights, got {packed.dtype}")
    byte = packed.contiguous().view(torch.uint8).reshape(*packed.shape[:-1], packed.shape[-1] * 4)
    if sys.byteorder != "little":
        byte = byte.reshape(*packed.shape[:-1], -1, 4).flip(-1).reshape(*packed.shape[:-1], -1)
    nib = torch.stack([byte & 0xF, byte >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    return (nib.to(torch.int8) - 8)


def fake_quant(w: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """dequantize(quantize(w)) in the forward, identity in the backward (straight-through estimator)."""
    q, scale = quantize_groupwise(w, group_size)
    return w + (dequantize(q, scale, w.dtype) - w).detach()


# ---------------------------------------------------------------- transforms of a built model

def _targeted(model: nn.Module, targets: str):
    """(name, module) pairs to quantize: every moe.Experts; with "linear" also every nn.Linear but lm_head."""
    if targets not in TARGETS:
        raise NanoK2Error(f"unknown quantization targets {targets!r}; use one of {', '.join(TARGETS)}")
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            out.append((name, m))
        elif targets == "linear" and isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head":
            out.append((name, m))
    return out


def _check_targets(mods, group_size: int) -> None:
    for name, m in mods:
        if isinstance(m, Experts):
            check_group_size(m.gate_up_proj.shape[-1], group_size, f"{name}.0.gate_proj.weight")
            check_group_size(m.down_proj.shape[-1], group_size, f"{name}.0.down_proj.weight")
        else:
            check_group_size(m.in_features, group_size, f"{name}.weight")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, targets: str = "experts", group_size: int = GROUP_SIZE) -> nn.Module:
    """Post-training quantization in place: routed experts (and with "linear" every other linear layer but
    lm_head) become INT4 modules. Returns the model, in eval mode, ready for the CPU kernel."""
    from nanok2.int4_linear import Int4Experts, Int4Linear, prepare_int4

    mods = _targeted(model, targets)
    _check_targets(mods, group_size)
    for name, m in mods:
        if isinstance(m, Experts):
            new = Int4Experts.from_experts(m, group_size, prefix=name)
        else:
            new = Int4Linear.from_weight(m.weight, group_size, m.bias, name=f"{name}.weight")
        _replace(model, name, new)
    model.quantization_config = quantization_config(targets, group_size)
    return prepare_int4(model).eval()


# ---------------------------------------------------------------- quantization-aware training

class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward sees fake_quant(weight); the class is swapped in place by enable_qat."""
    qat_group_size = GROUP_SIZE

    def forward(self, x):
        return F.linear(x, fake_quant(self.weight, self.qat_group_size), self.bias)


class FakeQuantExperts(Experts):
    """moe.Experts whose stacked weights are fake-quantized once per forward (not once per expert)."""
    qat_group_size = GROUP_SIZE

    def forward(self, x, idx, w):
        self._fq = (fake_quant(self.gate_up_proj, self.qat_group_size), fake_quant(self.down_proj, self.qat_group_size))
        try:
            return grouped_experts(self, x, idx, w)
        finally:
            self._fq = None

    def expert(self, e, x):
        fq = getattr(self, "_fq", None)
        gate_up, down = fq if fq is not None else (fake_quant(self.gate_up_proj, self.qat_group_size),
                                                   fake_quant(self.down_proj, self.qat_group_size))
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down[e])


_QAT_CLASSES = {Experts: FakeQuantExperts, nn.Linear: FakeQuantLinear}


def enable_qat(model: nn.Module, targets: str = "experts", group_size: int = GROUP_SIZE) -> int:
    """Quantization-aware training on: the targeted weights are fake-quantized (INT4, STE) in every forward.

    The modules keep their identity, parameters and names (their class is swapped in place), so an
    optimizer built before or after keeps working and checkpoints are unchanged; `quantize_model` of the
    trained model then reproduces the fake-quant forward exactly. Returns the number of modules switched.
    """
    mods = _targeted(model, targets)
    _check_targets(mods, group_size)
    for _, m in mods:
        fq = _QAT_CLASSES[Experts if isinstance(m, Experts) else nn.Linear]
        if type(m) is not fq:
            m._qat_original_class = type(m)    # e.g. a kernel subclass the engine swapped in: restored by disable_qat
            m.__class__ = fq
        m.qat_group_size = group_size
    return len(mods)


def disable_qat(model: nn.Module) -> int:
    """Quantization-aware training off: fake-quantized modules get their class from before enable_qat back."""
    n = 0
    for m in model.modules():
        if type(m) in _QAT_CLASSES.values():
            m.__class__ = m.__dict__.pop("_qat_original_class")
            m.__dict__.pop("qat_group_size", None)
            m.__dict__.pop("_fq", None)
            n += 1
    return n


# ---------------------------------------------------------------- compressed-tensors config and checkpoints

def quantization_config(targets: str = "experts", group_size: int = GROUP_SIZE) -> dict:
    """K2-Thinking's `quantization_config` (the same keys), for routed experts or all linear layers."""
    if targets not in TARGETS:
        raise NanoK2Error(f"unknown quantization targets {targets!r}; use one of {', '.join(TARGETS)}")
    weights = {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "dynamic": False, "observer": "minmax", "observer_kwargs": {}, "actorder": None,
               "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "output_activations": None, "weights": weights}},
            "ignore": list(K2_IGNORE if targets == "experts" else LINEAR_IGNORE),
            "kv_cache_scheme": None}


def save_quantized(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write a quantized model as K2-Thinking's files: config.json with `quantization_config`, safetensors
    with `weight_packed` / `weight_scale` / `weight_shape` for each INT4 weight, bf16 for the rest."""
    from nanok2.checkpoint import _write_atomic, save_model

    qc = getattr(model, "quantization_config", None)
    if not qc:
        raise NanoK2Error("save_quantized: the model has no INT4 weights (run quantize_model first)")
    path = save_model(model, path, max_shard_size=max_shard_size)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qc
    _write_atomic(path / "config.json", json.dumps(cfg, indent=2) + "\n")
    return path


def _match(name: str, pattern: str) -> bool:
    """compressed-tensors' rule: "re:<regex>" matches from the start of the name, anything else exactly."""
    return re.match(pattern[3:], name) is not None if pattern.startswith("re:") else name == pattern


def _schemes(qc: dict, where: str) -> tuple[list[tuple[list[str], int]], list[str]]:
    """Validate a quantization_config; -> ([(targets, group_size) per config group], ignore)."""
    def bad(msg):
        raise CheckpointError(f"{where}: quantization_config {msg}")

    if qc.get("quant_method") != "compressed-tensors":
        bad(f"quant_method {qc.get('quant_method')!r} is not supported (nanok2 reads 'compressed-tensors')")
    if qc.get("format") != "pack-quantized":
        bad(f"format {qc.get('format')!r} is not supported (nanok2 reads 'pack-quantized' INT4)")
    if qc.get("quantization_status", "compressed") != "compressed":
        bad(f"quantization_status {qc.get('quantization_status')!r}: only compressed checkpoints can be read")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        bad("has no config_groups")
    schemes = []
    for gname, g in groups.items():
        w = g.get("weights") or {}
        key = f"config_groups.{gname}.weights"
        if w.get("num_bits") != BITS:
            bad(f"{key}.num_bits={w.get('num_bits')!r}: unsupported bit width, nanok2 reads INT4 (num_bits 4) only")
        if w.get("type", "int") != "int":
            bad(f"{key}.type={w.get('type')!r}: only integer weights are supported")
        if w.get("symmetric") is not True:
            bad(f"{key}.symmetric={w.get('symmetric')!r}: only symmetric INT4 (no zero point) is supported")
        if w.get("strategy") != "group":
            bad(f"{key}.strategy={w.get('strategy')!r}: only the 'group' strategy is supported")
        gs = w.get("group_size")
        if not isinstance(gs, int) or gs <= 0:
            bad(f"{key}.group_size={gs!r} must be a positive int")
        if w.get("actorder") not in (None, "static"):
            bad(f"{key}.actorder={w.get('actorder')!r}: activation reordering (g_idx) is not supported")
        if g.get("input_activations") or g.get("output_activations"):
            bad(f"config_groups.{gname}: activation quantization is not supported (weight-only INT4)")
        schemes.append((list(g.get("targets") or []), gs))
    return schemes, list(qc.get("ignore") or [])


def _group_size_of(name: str, schemes, ignore) -> int | None:
    """The group size a quantized module uses, or None when the config leaves it unquantized."""
    if any(_match(name, p) for p in ignore):
        return None
    for targets, gs in schemes:
        if "Linear" in targets or any(_match(name, t) for t in targets):
            return gs
    return None


def load_quantized(model: nn.Module, path: str | Path, files: dict[str, Path], quant_config: dict,
                   strict: bool = True) -> nn.Module:
    """Fill an allocated float model from a compressed-tensors INT4 checkpoint (called by load_model).

    The modules the config quantizes are swapped for INT4 ones, every tensor is copied (INT4 buffers
    included) with checkpoint.copy_tensors, the weights are packed for the CPU kernel, and the model is
    returned in eval mode. Errors name the tensor: a missing `weight_scale`, a group size that does not
    divide the input dimension, a packed tensor that is not int32, a `weight_shape` that disagrees.
    """
    from nanok2.checkpoint import _open, copy_tensors
    from nanok2.int4_linear import Int4Experts, Int4Linear, int4_modules, prepare_int4

    path = Path(path)
    schemes, ignore = _schemes(quant_config, str(path / "config.json"))

    def check(name: str, in_features: int, gs: int) -> None:
        if in_features % gs:
            raise CheckpointError(f"{path}: {name}.weight_packed: group_size {gs} does not divide the input "
                                  f"dimension {in_features}")

    for name, m in list(model.named_modules()):
        if isinstance(m, Experts):
            E, two_i, D = m.gate_up_proj.shape
            projs = [f"{name}.{e}.{p}" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")]
            sizes = {_group_size_of(p, schemes, ignore) for p in projs}
            if len(sizes) > 1:
                raise CheckpointError(f"{path}: the experts of {name} are quantized differently "
                                      f"(group sizes {sorted(map(str, sizes))}); nanok2 needs one scheme per layer")
            gs = sizes.pop()
            if gs is not None:
                check(f"{name}.0.gate_proj", D, gs)
                check(f"{name}.0.down_proj", two_i // 2, gs)
                _replace(model, name, Int4Experts(E, D, two_i // 2, gs, device=m.gate_up_proj.device))
        elif isinstance(m, nn.Linear):
            gs = _group_size_of(name, schemes, ignore)
            if gs is not None:
                check(name, m.in_features, gs)
                new = Int4Linear(m.in_features, m.out_features, gs, bias=m.bias is not None, device=m.weight.device)
                if m.bias is not None:
                    new.bias.data = new.bias.data.to(m.bias.dtype)
                _replace(model, name, new)

    quantized = [n for n, m in model.named_modules() if isinstance(m, Int4Linear)]
    if not quantized:
        raise CheckpointError(f"{path}: quantization_config quantizes none of the model's linear layers")
    for name in quantized:
        packed, scale = f"{name}.weight_packed", f"{name}.weight_scale"
        if packed not in files:
            if f"{name}.weight" in files:
                raise CheckpointError(f"{path}: quantization_config says {name} is INT4, but the checkpoint holds "
                                      f"a float {name}.weight and no {packed}")
            continue   # copy_tensors reports it as missing (or skips it when strict=False)
        if scale not in files:
            raise CheckpointError(f"{path}: INT4 weight {packed} has no {scale}: the checkpoint is incomplete "
                                  "(the scales are needed to dequantize it)")
        dtype = _open(files[packed]).get_slice(packed).get_dtype()
        if dtype != "I32":
            raise CheckpointError(f"{files[packed]}: {packed} has dtype {dtype}; pack-quantized weights are int32")

    copy_tensors(model, files, strict=strict)
    for name, m in int4_modules(model):
        if isinstance(m, Int4Linear):
            shape = tuple(m.weight_shape.tolist())
            if shape != (m.out_features, m.in_features):
                raise CheckpointError(f"{path}: {name}.weight_shape is {shape} but the config expects "
                                      f"{(m.out_features, m.in_features)}: config.json and the weights disagree")
    model.quantization_config = quant_config
    return prepare_int4(model).eval()


def copy_extra_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy a checkpoint folder's non-weight files (tokenizer, chat template, …) next to the quantized weights."""
    import shutil

    src, dst = Path(src), Path(dst)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


__all__ = ["BITS", "GROUP_SIZE", "TARGETS", "quantize_groupwise", "dequantize", "pack_int4", "unpack_int4",
           "fake_quant", "quantize_model", "enable_qat", "disable_qat", "quantization_config", "save_quantized",
           "load_quantized", "copy_extra_files"]
