"""K2's feed-forward layers: the SwiGLU MLP and the mixture of experts: the sigmoid router ("noaux_tc"), routed experts run grouped by expert, shared experts.

Routing (k2-facts.md §2): sigmoid scores in fp32; the per-expert `e_score_correction_bias` changes which
experts are *selected*, never the weights; optional group-limited top-k; weights renormalised and scaled
by `routed_scaling_factor`. The shared expert is added unweighted.

The routed experts' weights are stacked, `gate_up_proj [E, 2I, D]` and `down_proj [E, D, I]`, so that the
grouped path can sort tokens by expert and run each expert that received tokens once, on its batch;
experts that received none cost nothing. `looped_experts` is the slow per-token reference.
checkpoint.py splits the stacks into transformers' per-expert tensors `experts.{e}.{gate,up,down}_proj`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanok2.config import ModelArgs


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] (fp32) -> (weights [N, k] fp32, expert indices [N, k]).

    Selection on sigmoid(logits) + bias; weights gathered from the unbiased scores.
    """
    scores = logits.sigmoid()
    biased = scores + bias
    if n_group > 1:
        N, E = biased.shape
        grouped = biased.view(N, n_group, E // n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)                       # [N, n_group]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        biased = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
    idx = biased.topk(top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, idx


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers' MLP and the shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """`mlp.gate`: weight [E, D] and the selection bias [E], both kept in fp32 whatever the model dtype."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts))

    def _apply(self, fn, recurse=True):
        # like transformers' _keep_in_fp32_modules_strict: a dtype cast of the model leaves the router in fp32
        super()._apply(fn, recurse)
        if self.weight.is_floating_point() and self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, indices [N, k], logits [N, E] fp32)."""
        a = self.args
        logits = F.linear(x.float(), self.weight)
        w, idx = route(logits, self.e_score_correction_bias, a.num_experts_per_tok, a.n_group, a.topk_group,
                       a.norm_topk_prob, a.routed_scaling_factor)
        return w, idx, logits


class Experts(nn.Module):
    """The routed experts, stacked. forward(x [N, D], idx [N, k], w [N, k]) -> [N, D]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, I = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.n_experts, self.inter = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))   # rows [0, I) gate, [I, 2I) up
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [n, D] -> [n, D]. Quantized experts override this one method."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return grouped_experts(self, x, idx, w)


def grouped_experts(experts: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Sort the N·k (token, expert) pairs by expert; run each expert once on its contiguous slice."""
    N, k = idx.shape
    flat = idx.reshape(-1)                                          # [N*k]
    order = flat.argsort(stable=True)
    token_of = order // k                                           # the token of each sorted pair
    counts = torch.bincount(flat, minlength=experts.n_experts).tolist()
    xs = x[token_of]                                                # [N*k, D], grouped by expert
    out = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(counts):
        if c:
            out[start:start + c] = experts.expert(e, xs[start:start + c])
            start += c
    out = out * w.reshape(-1)[order, None].to(out.dtype)
    y = torch.zeros_like(x)
    return y.index_add_(0, token_of, out)


def looped_experts(experts: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference: token by token, expert by expert. Slow on purpose; tests compare the grouped path to it."""
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            y[n] += (w[n, j].to(x.dtype) * experts.expert(e, x[n:n + 1]))[0]
    return y


class MoE(nn.Module):
    """`mlp` of an MoE layer: router (`gate`), routed `experts`, unweighted `shared_experts`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        self.experts = Experts(args)
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
                               if args.n_shared_experts > 0 else None)
        # expert loads of the last forward, for aux-loss-free balancing and the trainer's progress bar
        self.last_counts: torch.Tensor | None = None   # [E] tokens routed to each expert
        self.last_router_probs: torch.Tensor | None = None  # [B, T, E] sigmoid scores, when training
        self.last_topk: torch.Tensor | None = None          # [B, T, k] selected experts, when training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, idx, logits = self.gate(flat)
        self.last_counts = torch.bincount(idx.reshape(-1), minlength=self.experts.n_experts).detach()
        if self.training:
            self.last_router_probs = logits.sigmoid().view(*shape[:-1], -1)
            self.last_topk = idx.view(*shape[:-1], -1)
        y = self.experts(flat, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)
