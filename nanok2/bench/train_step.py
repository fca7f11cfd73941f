"""`nanok2 bench train-step`: one MuonClip training step of agent-tiny, with each way of computing attention.

The step is the recipe's (`nanok2/agent_recipe.py`): forward, cross-entropy, backward, QK-Clip's max
logit, Muon/AdamW update, on random tokens. Only the attention kernel of every MLA layer changes:

- `reference`: the scores materialised as [B, H, T, T], masked, softmaxed in fp32 (model.reference_attention);
- `sdpa`: PyTorch's scaled_dot_product_attention as is (model.sdpa_attention). MLA's values are narrower than
  its queries and keys (v 32 against q/k 48 in agent-tiny, 128 against 192 in K2), so PyTorch's CPU flash
  kernel does not take them and SDPA runs its math path;
- `padded-sdpa`: values zero-padded to the q/k head dim so the fused kernel runs (model.padded_sdpa_attention,
  what training uses).

and one more, the trainer's loss path on top of `padded-sdpa`:

- `padded-sdpa+scored`: logits only where the loss weight is not 0 (train.weighted_loss). The others
  compute them at every position and weigh the cross-entropy. Each window trains a random `--trained-share`
  of its positions in every variant: by default 0.34, SFT's share in agent-tiny (its assistant turns and
  tool results; the system prompt, tool specs, user turns and padding are not trained). Pre-training trains
  every position (`--trained-share 1`), where scoring changes nothing.

Each shape is timed best-of-`--repeat` with the variants interleaved, and reported with its ratio to
`reference`. The training path computes QK-Clip's max logit apart (model.max_attention_logit) in every variant.
"""
from __future__ import annotations

from nanok2.bench.report import emit, machine, table


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"nanok2 bench train-step: --shapes takes BATCHxSEQ_LEN, like 2x2048 (got {text!r})") from None
    if batch < 1 or seq < 2:
        raise SystemExit(f"nanok2 bench train-step: shape {text!r} needs batch >= 1 and seq_len >= 2")
    return batch, seq


def run(args) -> int:
    import contextlib
    import time

    import torch
    import torch.nn.functional as F

    from nanok2 import model as model_lib
    from nanok2.agent_recipe import AGENT_TINY_MODEL
    from nanok2.config import ModelArgs
    from nanok2.optim import MuonClip
    from nanok2.train import weighted_loss

    if not 0 < args.trained_share <= 1:
        raise SystemExit(f"nanok2 bench train-step: --trained-share {args.trained_share} must be in (0, 1]")
    torch.set_num_threads(args.threads)
    # variant -> (attention kernel, logits only at trained positions); timed and shown in this order
    variants = {"reference": (model_lib.reference_attention, False), "sdpa": (model_lib.sdpa_attention, False),
                "padded-sdpa": (model_lib.padded_sdpa_attention, False),
                "padded-sdpa+scored": (model_lib.padded_sdpa_attention, True)}
    shapes = [_shape(s) for s in args.shapes]
    cfg = {**AGENT_TINY_MODEL, "vocab_size": args.vocab}
    net = model_lib.build_model(ModelArgs.from_dict(cfg), seed=0).train()
    optimizer = MuonClip.for_model(net, lr=1e-4, qk_clip_tau=100.0)
    attention = [m for m in net.modules() if isinstance(m, model_lib.MLA)]

    def step(ids: torch.Tensor, weights: torch.Tensor, scored: bool) -> None:
        x, y = ids[:, :-1], ids[:, 1:]
        if scored:
            loss = weighted_loss(net, x, y, weights, contextlib.nullcontext())
        else:
            loss = (F.cross_entropy(net(x).flatten(0, 1), y.flatten(), reduction="none") * weights.flatten()).sum()
        (loss / weights.sum()).backward()
        optimizer.observe_logits()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows, result = [], {"bench": "train-step", "threads": args.threads, "trained_share": args.trained_share,
                        **machine()}
    for batch, seq in shapes:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab, (batch, seq + 1), generator=gen)
        weights = (torch.rand(batch, seq, generator=gen) < args.trained_share).float()
        best = {v: float("inf") for v in variants}
        for round_ in range(args.repeat + 1):             # round 0 warms up
            for v, (kernel, scored) in variants.items():
                for m in attention:
                    m.attention_kernel = kernel
                t = time.perf_counter()
                step(ids, weights, scored)
                if round_:
                    best[v] = min(best[v], time.perf_counter() - t)
        for v in variants:
            tokens_per_s = batch * seq / best[v]
            rows.append([f"{batch}x{seq}", v, f"{best[v]:.3f}", f"{tokens_per_s:.0f}",
                         f"{best['reference'] / best[v]:.2f}x"])
            result[f"s_{v.replace('-', '_').replace('+', '_')}_{batch}x{seq}"] = round(best[v], 4)
        result[f"speedup_padded_sdpa_{batch}x{seq}"] = round(best["reference"] / best["padded-sdpa"], 3)
        result[f"speedup_scored_{batch}x{seq}"] = round(best["padded-sdpa"] / best["padded-sdpa+scored"], 3)
    emit(table(["batch x seq", "attention", "step s", "tok/s", "vs reference"], rows), result)
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-step", help="agent-tiny training step time: materialised attention vs SDPA vs "
                                          "SDPA with values padded (the fused kernel), and logits only "
                                          "where the loss is")
    p.add_argument("--shapes", nargs="+", default=["4x512", "2x2048"],
                   help="BATCHxSEQ_LEN per row (default: pre-training's last phase and SFT's step)")
    p.add_argument("--vocab", type=int, default=3328)
    p.add_argument("--trained-share", type=float, default=0.34,
                   help="share of positions with a loss weight (default 0.34: agent-tiny's SFT; pre-training 1)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds per variant (best of)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=run)
