"""Training checkpoints: written atomically, last N kept, the latest complete one found for `--resume`.

A checkpoint is a folder `checkpoints/step_000100/` holding
- the model in Hugging Face format (`config.json`, `model.safetensors`: `load_model` and transformers read it),
- `state.pt`: step, data position, RNG state, world size, the TrainConfig;
- `optim.rank{r}.pt`: each rank's optimizer state (its own shards under FSDP2).
Everything is written into `checkpoints/.tmp-step_000100/` first and renamed when complete, so a run
killed at any moment (`kill -9`) leaves either the whole checkpoint or none of it.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from nanok2.checkpoint import checkpoint_files, copy_tensors, save_model
from nanok2.config import ModelArgs
from nanok2.errors import CheckpointError, ConfigError

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on every rank (FSDP2 shards are all-gathered; call on all ranks)."""
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
            for name, t in model.state_dict().items()}


def plain_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded Transformer holding `state`, without copying it (for save_model)."""
    from nanok2.model import Transformer

    with torch.device("meta"):
        shadow = Transformer(model.args)
    shadow.load_state_dict(state, assign=True)
    return shadow


def save_weights(model: torch.nn.Module, folder: Path, rank: int, tokenizer_dir: str | None = None) -> None:
    """The model alone, in HF format, into `folder` (replaced atomically). Call on all ranks.

    With `tokenizer_dir`, its `tiktoken.model` and `tokenizer_config.json` go along, so the folder is a
    complete checkpoint for `nanok2 generate` / `chat` / `quantize`.
    """
    state = full_state_dict(model)
    if rank == 0:
        tmp = folder.with_name(".tmp-" + folder.name)
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(plain_model(model, state), tmp)
        for name in ("tiktoken.model", "tokenizer_config.json") if tokenizer_dir else ():
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        old = folder.with_name(".old-" + folder.name)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def save_checkpoint(out: Path, step: int, model, optimizer, train_state: dict, rank: int, world: int,
                    keep_last: int) -> Path:
    """Write checkpoint `step` under out/checkpoints atomically; prune to the last `keep_last`. All ranks call."""
    root = out / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}"
    state = full_state_dict(model)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(optimizer.state_dict(), tmp / f"optim.rank{rank}.pt")
    if rank == 0:
        save_model(plain_model(model, state), tmp)
        torch.save({**train_state, "step": step, "world_size": world}, tmp / "state.pt")
    _barrier()
    if rank == 0:
        os.replace(tmp, final)
        done = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder (temporary folders of an interrupted save are ignored)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").exists())
    return done[-1] if done else None


def check_same_model(path: Path, args: ModelArgs) -> None:
    """Raise CheckpointError naming each field where the checkpoint's config.json differs from `args`."""
    try:
        theirs = ModelArgs.from_hf_config(path).to_hf_config()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    ours = args.to_hf_config()
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs run {ours.get(k)!r}"
            for k in sorted(set(theirs) | set(ours)) if k != "torch_dtype" and theirs.get(k) != ours.get(k)]
    if diff:
        raise CheckpointError(f"{path} was written for a different model config ({'; '.join(diff[:6])}"
                              f"{'; …' if len(diff) > 6 else ''}); use a matching preset/model.* overrides "
                              "or another out directory. Nothing was written.")


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy an HF checkpoint folder's weights into an (unsharded) model after checking its config."""
    check_same_model(path, model.args)
    copy_tensors(model, checkpoint_files(path))


def load_train_state(path: Path, rank: int, world: int) -> tuple[dict, dict]:
    """(state.pt contents, this rank's optimizer state dict) of a checkpoint folder."""
    state = torch.load(path / "state.pt", weights_only=False)
    if state["world_size"] != world:
        raise CheckpointError(f"{path} was written by {state['world_size']} rank(s); resume it with the same "
                              f"number (this run has {world}): the optimizer state is sharded per rank")
    optim = torch.load(path / f"optim.rank{rank}.pt", weights_only=False)
    return state, optim
