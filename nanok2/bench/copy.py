"""`nanok2 bench copy`: how fast does a small K2 learn to copy from its context? Side by side in one run.

An agent carries names and docids from tool results into its next call; a model learns that by forming
copy (induction) heads, and nanok2-agent-tiny has not formed them in its training budget (issue #8).
This bench measures the learning itself on the cleanest task there is: windows of random symbols in
which a span repeats at a random offset (so that no positional shortcut works), loss counted on the
copy's tokens 2..span. The chance level is ln(symbols): a model that has not learned to copy stays there;
one that copies goes towards 0.

Each variant trains from the same initialisation seed on the same batches with MuonClip, for the same
steps: the agent-tiny architecture, and the same with wider attention (4 heads, kv_lora 128, head dims
64), to see whether attention capacity is what holds copying back. `--model key=value` changes both.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanok2.bench.report import emit, table
from nanok2.errors import NanoK2Error

WIDE_ATTENTION = dict(num_attention_heads=4, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64,
                      v_head_dim=64)


def copy_batch(g: torch.Generator, batch: int, window: int, span: int, symbols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [batch, window] of random symbols with one span repeated later, and the loss mask [batch, window-1]
    that selects the predictions of the copy's tokens 2..span."""
    x = torch.randint(0, symbols, (batch, window), generator=g)
    mask = torch.zeros(batch, window - 1)
    for b in range(batch):
        p1 = int(torch.randint(0, window - 2 * span, (1,), generator=g))
        p2 = int(torch.randint(p1 + span, window - span + 1, (1,), generator=g))
        x[b, p2:p2 + span] = x[b, p1:p1 + span]
        mask[b, p2:p2 + span - 1] = 1
    return x, mask


def train_copy(model_kwargs: dict, steps: int, batch: int, window: int, span: int, symbols: int, lr: float,
               every: int, seed: int = 0) -> list[tuple[int, float]]:
    """[(step, mean copy loss over the last `every` steps)] for one architecture."""
    from nanok2.config import ModelArgs
    from nanok2.model import build_model
    from nanok2.optim import MuonClip

    torch.manual_seed(seed)
    model = build_model(ModelArgs.from_preset("tiny", **model_kwargs)).train()
    opt = MuonClip.for_model(model, lr=lr)
    g = torch.Generator().manual_seed(seed)
    curve, recent = [], []
    for step in range(1, steps + 1):
        x, mask = copy_batch(g, batch, window, span, symbols)
        ce = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
        loss = (ce * mask).sum() / mask.sum()
        loss.backward()
        opt.observe_logits()
        opt.step()
        opt.zero_grad()
        recent.append(loss.item())
        if step % every == 0 or step == steps:
            curve.append((step, sum(recent) / len(recent)))
            recent = []
    return curve


@dataclass
class _Architecture:
    model: dict          # ModelArgs overrides on the "tiny" preset (what recipes.apply_overrides edits)


def first_step_below(curve: list[tuple[int, float]], level: float) -> int | None:
    return next((s for s, v in curve if v <= level), None)


def run(args) -> int:
    from nanok2.agent_recipe import AGENT_TINY_MODEL
    from nanok2.recipes import apply_overrides

    if args.span < 2 or args.window < 2 * args.span + 1 or args.symbols < 2 or min(args.steps, args.every) < 1:
        raise NanoK2Error(f"bench copy: need --span >= 2, --window >= 2 * span + 1, --symbols >= 2 and --steps, "
                          f"--every >= 1 (got span {args.span}, window {args.window}, symbols {args.symbols}, "
                          f"steps {args.steps}, every {args.every})")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = {**AGENT_TINY_MODEL, "vocab_size": args.symbols}
    overrides = [f"model.{item}" for item in args.model or []]      # on both variants, last so they win
    variants = {name: apply_overrides(_Architecture(model), overrides, what="bench copy").model
                for name, model in (("agent-tiny", base), ("wide-attention", {**base, **WIDE_ATTENTION}))}
    chance = math.log(args.symbols)
    curves = {name: train_copy(kw, args.steps, args.batch, args.window, args.span, args.symbols, args.lr, args.every)
              for name, kw in variants.items()}
    half = {name: first_step_below(c, chance / 2) for name, c in curves.items()}
    steps_shown = [s for s, _ in curves["agent-tiny"]]
    rows = [[step] + [f"{dict(c)[step]:.3f}" for c in curves.values()] for step in steps_shown]
    text = "\n".join([
        f"copy loss (nats, mean over the last {args.every} steps): {args.symbols} symbols (chance {chance:.2f}), "
        f"windows of {args.window}, a span of {args.span} repeated at a random offset, batch {args.batch}, "
        f"MuonClip lr {args.lr}",
        table(["step", *curves], rows),
        "steps to half of chance: " + ", ".join(f"{n} {half[n] or f'not within {args.steps}'}" for n in curves),
    ])
    result = {"bench": "copy", "symbols": args.symbols, "window": args.window, "span": args.span,
              "batch": args.batch, "lr": args.lr, "steps": args.steps, "chance": round(chance, 3),
              **{f"final_copy_loss_{n.replace('-', '_')}": round(c[-1][1], 3) for n, c in curves.items()},
              **{f"steps_to_half_chance_{n.replace('-', '_')}": half[n] for n in curves},
              "seconds": round(time.perf_counter() - started, 1)}
    emit(text, result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("copy", help="how fast a small K2 learns to copy from context: agent-tiny vs wider attention")
    p.add_argument("--symbols", type=int, default=256, help="distinct random symbols (chance loss = ln of it)")
    p.add_argument("--window", type=int, default=24, help="tokens per training window")
    p.add_argument("--span", type=int, default=6, help="tokens of the repeated span")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--every", type=int, default=25, help="report the copy loss every N steps")
    p.add_argument("--model", nargs="*", metavar="KEY=VALUE", help="ModelArgs overrides for both variants")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run)
