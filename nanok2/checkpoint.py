"""Hugging Face checkpoints in and out: safetensors (one file or sharded), transformers' DeepseekV3 names.

Names are the model's own state-dict names except the routed experts, which the model stacks
(`experts.gate_up_proj [E, 2I, D]`, `experts.down_proj [E, D, I]`) and the checkpoint stores one
tensor per expert and projection (`experts.{e}.gate_proj.weight`, …), as transformers, vLLM and SGLang do.

Loading builds the model on the meta device, allocates it once, then copies tensor by tensor from
memory-mapped files, so peak memory stays near the size of the weights. Every problem with the files
(missing, truncated, corrupt, wrong shape, missing or unexpected tensors) is a CheckpointError that
says which file and which tensor.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from nanok2.config import ModelArgs
from nanok2.errors import CheckpointError, ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or an int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise CheckpointError(f"cannot read size {size!r} (examples: 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


# ---------------------------------------------------------------- names

def hf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under checkpoint names (experts unstacked; tied lm_head omitted)."""
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}.{e}.up_proj.weight", t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def model_slot(params: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The model tensor (or view of a stacked expert tensor) a checkpoint name is copied into."""
    m = _EXPERT.match(name)
    if not m:
        return params.get(name)
    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down_proj":
        stack = params.get(f"{prefix}.down_proj")
        return stack[e] if stack is not None and e < stack.shape[0] else None
    stack = params.get(f"{prefix}.gate_up_proj")
    if stack is None or e >= stack.shape[0]:
        return None
    inter = stack.shape[1] // 2
    return stack[e, :inter] if proj == "gate_proj" else stack[e, inter:]


# ---------------------------------------------------------------- save

def save_model(model: torch.nn.Module, path: str | Path, max_shard_size: int | str = "5GB",
               dtype: str | torch.dtype | None = None, model_type: str | None = None) -> Path:
    """Write config.json and safetensors (sharded with an index when over max_shard_size) into `path`.

    Files are written under temporary names and renamed, so an interrupted save never leaves a file
    that looks complete. `dtype` casts floating tensors (the router stays fp32, as upstream keeps it).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype)
    limit = parse_size(max_shard_size)
    fp32_names = ("mlp.gate.weight", "e_score_correction_bias")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in hf_tensors(model):
        if dtype is not None and t.is_floating_point() and not name.endswith(fp32_names):
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous()
        size += nbytes
        total += nbytes

    # remove stale files of an earlier save into the same folder
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        if old.exists():
            old.unlink()
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for fname, shard in zip(names, shards):
        tmp = path / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_atomic(path / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    args: ModelArgs = model.args
    torch_dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[
        dtype or next(p for n, p in model.named_parameters() if "mlp.gate." not in n).dtype]
    _write_atomic(path / "config.json", json.dumps(args.to_hf_config(model_type, torch_dtype), indent=2) + "\n")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- load

def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it (one file or the shard index)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (expected config.json and *.safetensors)")
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index: {e}") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{index} lists {f.name}, which is missing from {path}")
        return files
    single = path / SINGLE_NAME
    if single.exists():
        return {name: single for name in _open(single).keys()}
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_NAME} or {INDEX_NAME})")
    return {name: f for f in found for name in _open(f).keys()}


def _open(file: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(f"{file} is not a readable safetensors file ({size} bytes): {e}. "
                              "It may be truncated or corrupt; re-copy or re-save it.") from None


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str = "cpu",
               strict: bool = True) -> torch.nn.Module:
    """Load a Hugging Face K2 / DeepSeek-V3 checkpoint folder into a nanok2 Transformer.

    dtype None keeps the checkpoint's dtype (`torch_dtype` in config.json, else the tensors').
    """
    from nanok2.model import Transformer

    path = Path(path)
    try:
        args = ModelArgs.from_hf_config(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    raw_config = json.loads((path / "config.json").read_text())
    files = checkpoint_files(path)
    if dtype is None:
        dtype = raw_config.get("torch_dtype") or raw_config.get("dtype")
        if dtype not in _DTYPES:
            dtype = None
    dtype = parse_dtype(dtype)
    if dtype is None:
        first = files and next(iter(files.items()))
        dtype = _open(first[1]).get_slice(first[0]).get_dtype() if first else "F32"
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)

    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()

    quant = raw_config.get("quantization_config")
    if quant:
        from nanok2 import quant as quant_mod   # compressed-tensors INT4 (issue 5)
        return quant_mod.load_quantized(model, path, files, quant, strict=strict)
    copy_tensors(model, files, strict=strict)
    return model.eval()


def copy_tensors(model: torch.nn.Module, files: dict[str, Path], strict: bool = True,
                 skip: set[str] | None = None) -> set[str]:
    """Copy each checkpoint tensor into its model slot, file by file (memory-mapped). Returns names copied.

    Raises CheckpointError listing missing and unexpected tensors, or naming a tensor whose shape differs.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    skip = skip or set()
    expected = {n for n, _ in hf_tensors(model)}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    unexpected, copied = [], set()
    for f, names in by_file.items():
        handle = _open(f)
        for name in names:
            if name in skip:
                continue
            slot = model_slot(params, name)
            if slot is None:
                # transformers writes empty [0, D] shared-expert tensors when n_shared_experts = 0
                if 0 not in handle.get_slice(name).get_shape():
                    unexpected.append(name)
                continue
            try:
                t = handle.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read tensor {name!r}: {e} (truncated or corrupt file?)") from None
            if tuple(t.shape) != tuple(slot.shape):
                raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(t.shape)} but the config expects "
                                      f"{tuple(slot.shape)}: config.json and the weights disagree")
            with torch.no_grad():
                slot.copy_(t)
            copied.add(name)
    missing = sorted(expected - copied - skip)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_preview(sorted(unexpected))}")
        raise CheckpointError("checkpoint does not match the model config; " + "; ".join(parts))
    return copied


def _preview(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")
