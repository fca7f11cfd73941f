"""`nanok2 train`: the training loop, one code path for a laptop process and `torchrun` with FSDP2.

One step = `grad_accum` micro-batches of `batch_size` sequences (all ranks together; each rank takes its
rows), the loss averaged over every trained token of the global batch, gradient clipping, the optimizer
(MuonClip with QK-Clip, or AdamW), then aux-loss-free balancing: each MoE layer's expert-selection bias
moves against its load. Under `torchrun --nproc_per_node N` the blocks are wrapped with `fully_shard`
(gloo on CPU, NCCL on GPUs); nothing else changes, so N ranks and one process give the same losses.

Metrics go to `metrics.jsonl` (one line per step) and a loss-curve PNG; checkpoints are atomic and
resumable exactly (train_state.py). MFU = train_flops_per_token (cost.py) · tokens / (seconds · peak),
peak = `peak_flops` per device (default: `default_peak_flops()`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanok2.checkpoint import parse_dtype
from nanok2.errors import NanoK2Error
from nanok2.recipes import PIPELINES, RECIPES, TrainConfig, apply_overrides, get_recipe

# 2 cores × ~2.5 GHz × 32 fp32 FLOP/cycle (two 256-bit FMA units): this project's CPU machines.
CPU_PEAK_FLOPS = 1.6e11
GPU_PEAK_FLOPS = 989e12   # H100/H800 dense bf16


def default_peak_flops(device: torch.device) -> float:
    return GPU_PEAK_FLOPS if device.type == "cuda" else CPU_PEAK_FLOPS


# ---------------------------------------------------------------- distributed setup

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; one process when it is absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def shard_model(model: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """FSDP2: each block, then the root (embeddings, final norm, lm_head), sharded on dim 0 over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------- the loop

def _prepare(cfg: TrainConfig, resume: bool, rank: int, world: int):
    """Everything that can reject the run, before anything is written: config, data, checkpoint."""
    from nanok2.curriculum import StepBatches
    from nanok2.data import tokenizer_fingerprint
    from nanok2.train_state import check_same_model, latest_checkpoint

    args = cfg.model_args()
    for name, value, known in (("optimizer", cfg.optimizer, ("muonclip", "adamw")),
                               ("schedule", cfg.schedule, ("constant", "wsd", "cosine")),
                               ("dtype", cfg.dtype, ("fp32", "bf16")), ("ns_dtype", cfg.ns_dtype, ("fp32", "bf16")),
                               ("qat", cfg.qat, (None, "int4"))):
        if value not in known:
            raise NanoK2Error(f"unknown {name} {value!r}; known: {', '.join(map(str, known))}")
    if cfg.batch_size % world:
        raise NanoK2Error(f"batch_size={cfg.batch_size} must be divisible by the {world} ranks")
    if cfg.data is None:
        raise NanoK2Error("no training data: set data=DIR (made by `nanok2 data tokenize`)")
    data = StepBatches(cfg.data, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.steps, seed=cfg.seed,
                       eval_windows=cfg.eval_sequences, window_schedule=cfg.window_schedule,
                       copy_every=cfg.copy_every, copy_span=tuple(cfg.copy_span), world=world)
    data.check_compatible(args.vocab_size, tokenizer_fingerprint(cfg.tokenizer) if cfg.tokenizer else None)
    out = Path(cfg.out)
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        check_same_model(ckpt, args)
    elif out.exists() and any(out.iterdir()):
        hint = "it has no complete checkpoint to resume from" if resume else "pass --resume to continue it"
        raise NanoK2Error(f"{out} already holds a run; {hint}, or choose another out=DIR (nothing was changed)")
    if cfg.init_from and ckpt is None:
        check_same_model(Path(cfg.init_from), args)
    return args, data, out, ckpt


def train(cfg: TrainConfig, resume: bool = False) -> list[dict]:
    """Run one stage; returns the metrics of the steps this call ran (rank 0's view)."""
    from nanok2.cost import train_flops_per_token
    from nanok2.model import build_model
    from nanok2.moe import MoE
    from nanok2.optim import MuonClip, lr_at, sequence_balance_loss
    from nanok2.train_state import (load_train_state, load_weights, save_checkpoint, save_weights)

    rank, world, device = setup_distributed()
    args, data, out, ckpt = _prepare(cfg, resume, rank, world)

    torch.manual_seed(cfg.seed)
    model = build_model(args, seed=cfg.seed)
    if ckpt is not None:
        load_weights(model, ckpt)
    elif cfg.init_from:
        load_weights(model, Path(cfg.init_from))
    if cfg.qat == "int4":
        try:
            from nanok2.quant import enable_qat
        except ImportError:
            raise NanoK2Error("qat=int4 needs nanok2.quant.enable_qat, which this install does not have") from None
        enable_qat(model, targets="experts", group_size=32)
    model.to(device).train()
    if world > 1:
        shard_model(model, world, device)
    optimizer = MuonClip.for_model(model, lr=cfg.lr, muon=cfg.optimizer == "muonclip", weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, betas=tuple(cfg.betas), qk_clip_tau=cfg.qk_clip_tau,
                                   ns_dtype=parse_dtype(cfg.ns_dtype))
    moes = [m for m in model.modules() if isinstance(m, MoE)]

    start = 0
    if ckpt is not None:
        state, optim_state = load_train_state(ckpt, rank, world)
        optimizer.load_state_dict(optim_state)
        start = state["step"]                      # the data of a step is a function of the step (curriculum.py)
        torch.set_rng_state(state["rng"][rank])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(out / "train_config.json", json.dumps(cfg.to_json(), indent=2) + "\n")
        _truncate_metrics(metrics_path, start)
    peak = cfg.peak_flops or default_peak_flops(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext())
    per_rank = cfg.batch_size // world
    history: list[dict] = []
    bar = _progress(cfg, start, rank)
    metrics_file = open(metrics_path, "a") if rank == 0 else None
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.steps, cfg.warmup, cfg.schedule, cfg.decay_frac, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = data.batches(step, rank, world)
            seq_len = data.phase(step).seq_len
            # the loss is a mean over the trained tokens of the whole global batch: every rank divides by
            # the same count; ×world because FSDP averages the ranks' gradients
            n_tokens = float(_all_reduce(torch.tensor([sum(float(b.mask.sum()) for b in batches)]))[0])
            loss_sum = torch.zeros(1)
            counts = [torch.zeros(args.n_routed_experts, dtype=torch.long) for _ in moes]
            for b in batches:
                x, y, mask = b.inputs.to(device), b.targets.to(device), b.mask.to(device)
                token_loss = weighted_loss(model, x, y, mask, autocast)
                loss = token_loss * (world / max(n_tokens, 1.0))
                if cfg.seq_aux_alpha > 0:
                    aux = sum(sequence_balance_loss(m.last_router_probs, m.last_topk, cfg.seq_aux_alpha) for m in moes)
                    loss = loss + aux / cfg.grad_accum        # a mean over micro-batches (and, by FSDP, ranks)
                loss.backward()
                loss_sum += token_loss.detach().float().cpu()
                optimizer.observe_logits()
                for c, m in zip(counts, moes):
                    c += m.last_counts.cpu()
            grad_norm = _clip(model, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            balance = balance_experts(moes, counts, cfg.bias_update_speed) if moes else float("nan")
            train_loss = float(_all_reduce(loss_sum)[0]) / max(n_tokens, 1.0)
            dt = time.perf_counter() - t0
            tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len          # the same in every phase
            flops_token = train_flops_per_token(args, seq_len)
            row = {"step": step + 1, "loss": train_loss, "lr": lr, "grad_norm": grad_norm, "seq_len": seq_len,
                   "max_logit": optimizer.last_max_logit, "balance": balance, "tok_per_s": tokens / dt,
                   "mfu": flops_token * tokens / (dt * peak * world)}
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                row["eval_loss"] = evaluate(model, data, per_rank, device, autocast)
            history.append(row)
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {train_loss:.3f} | {row['tok_per_s']:.0f} tok/s | mfu {row['mfu']:.1%} | "
                                    f"max logit {row['max_logit']:.1f} | load max/mean {balance:.2f}")
            if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(out, step + 1, model, optimizer,
                                {"rng": _all_rng_states(world), "config": cfg.to_json()},
                                rank, world, cfg.keep_last)
                if rank == 0:
                    plot_losses(metrics_path, out / "loss.png")
        save_weights(model, out / "final", rank, tokenizer_dir=cfg.tokenizer)
        if rank == 0:
            plot_losses(metrics_path, out / "loss.png")
    finally:
        if metrics_file:
            metrics_file.close()
        if bar is not None:
            bar.close()
    return history


@torch.no_grad()
def balance_experts(moes: list, counts: list[torch.Tensor], speed: float) -> float:
    """Sum this step's expert loads over the ranks, move each MoE layer's selection bias against its load
    (all ranks apply the same update), and return the mean over layers of max/mean tokens per expert."""
    from nanok2.optim import update_expert_bias

    load = _all_reduce(torch.stack(counts))                                    # [L_moe, E], the global batch
    if speed > 0:
        for m, c in zip(moes, load):
            bias = m.gate.e_score_correction_bias
            update_expert_bias(bias, c.to(bias.device), speed)
    return float((load.max(1).values.float() / load.float().mean(1)).mean())


def _all_rng_states(world: int) -> list[torch.Tensor]:
    """Every rank's torch RNG state (rank 0 saves them all)."""
    states = [torch.get_rng_state()] * world
    if world > 1:
        dist.all_gather_object(states, torch.get_rng_state())
    return states


def weighted_loss(model, inputs, targets, weights, autocast) -> torch.Tensor:
    """Sum over positions of weight x cross-entropy (inputs, targets, weights [B, T]), the model run under
    `autocast` and the loss in fp32; the logits are computed only where the weight is not 0."""
    scored = weights > 0
    with autocast:
        logits = model(inputs, scored=scored)                               # [N, V]
    ce = F.cross_entropy(logits.float(), targets[scored], reduction="none")
    return (ce * weights[scored]).sum()


@torch.no_grad()
def evaluate(model, data, per_rank: int, device, autocast) -> float:
    """Mean loss over the held-out windows (every rank runs the same batches; FSDP needs them in step)."""
    model.eval()
    total, count = 0.0, 0.0
    for b in data.eval_batches(per_rank):
        total += float(weighted_loss(model, b.inputs.to(device), b.targets.to(device), b.mask.to(device), autocast))
        count += float(b.mask.sum())
    model.train()
    return total / max(count, 1.0)


def _clip(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _progress(cfg: TrainConfig, start: int, rank: int):
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume from `step`, drop the lines a killed run logged after its last checkpoint (and a line
    it was killed in the middle of writing)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    _write_text_atomic(path, "".join(line + "\n" for line in keep))


def plot_losses(metrics: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


# ---------------------------------------------------------------- command line

def run(args) -> int:
    if args.list:
        for r in RECIPES.values():
            print(f"{r.name:<16} {r.description}")
        for name, description in PIPELINES.items():
            print(f"{name:<16} {description}")
        return 0
    if args.recipe in PIPELINES:
        from nanok2.agent_recipe import AgentTinyConfig, apply_overrides as pipeline_overrides, run_pipeline

        run_pipeline(pipeline_overrides(AgentTinyConfig(), args.overrides), resume=args.resume)
        return 0
    recipe = get_recipe(args.recipe)
    for i, stage in enumerate(recipe.stages):
        cfg = apply_overrides(stage, args.overrides)
        history = train(cfg, resume=args.resume)
        if history and int(os.environ.get("RANK", "0")) == 0:
            last = history[-1]
            print(f"stage {i + 1}/{len(recipe.stages)}: step {last['step']} loss {last['loss']:.4f}"
                  + (f" eval {last['eval_loss']:.4f}" if "eval_loss" in last else "") + f" -> {cfg.out}")
    if dist.is_available() and dist.is_initialized():
        # every rank done (rank 0 writes the final checkpoint and plot last) before any tears gloo down: in one
        # CI run on a loaded machine, rank 1 aborted in teardown ("terminate called without an active
        # exception") while rank 0 was still writing
        dist.barrier()
        dist.destroy_process_group()
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="pre-train or fine-tune from a named recipe (torchrun for FSDP2)")
    p.add_argument("--recipe", default="tiny-pretrain", help=f"one of {', '.join([*RECIPES, *PIPELINES])}")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out")
    p.add_argument("--list", action="store_true", help="list the recipes")
    p.add_argument("--qat", choices=["int4"], default=None, help="fake-quantize the routed experts to INT4 (QAT)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe fields, e.g. steps=100 "
                   "lr=1e-3 data=DIR out=DIR model.hidden_size=256")
    p.set_defaults(func=_run_with_qat)


def _run_with_qat(args) -> int:
    if args.qat:
        args.overrides = [*args.overrides, f"qat={args.qat}"]
    return run(args)
