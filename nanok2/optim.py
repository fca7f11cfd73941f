"""MuonClip, K2's optimizer, and the other training maths: Newton–Schulz, QK-Clip, expert-bias balancing, schedules.

K2 trains its 2-D hidden weights with Muon (momentum, then the update replaced by the nearest
semi-orthogonal matrix, found by five quintic Newton–Schulz steps) and everything else with AdamW;
QK-Clip then rescales the query/key weights of any attention head whose largest pre-softmax logit
went over τ, which is what kept K2's 15.5T-token run free of loss spikes (k2-facts.md §5).

The maths are pure functions (`newton_schulz5`, `muon_update`, `qk_clip_scales`, `qk_clip_row_scales`,
`update_expert_bias`, `sequence_balance_loss`, `lr_at`); `MuonClip` is the thin optimizer around them.

Under FSDP2 parameters and gradients are DTensors sharded on dim 0. Momentum and AdamW are elementwise
and run on the local shard; Newton–Schulz needs the whole matrix, so the momentum-corrected gradient is
gathered (`full_tensor`), orthogonalised on every rank alike, and each rank applies its own rows.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanok2.errors import NanoK2Error

# Quintic coefficients (a, b, c) of p(x) = a·x + b·x³ + c·x⁵, chosen (Keller Jordan) to push every
# singular value in (0, 1] quickly into a band around 1 rather than converge exactly to 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# After 5 steps every singular value σ ≥ 0.0016·‖G‖_F lands in this band (iterating the scalar polynomial;
# tests/test_optim.py checks matrices); smaller ones (near-null directions) stay below it.
NS_BAND = (0.68, 1.21)


# ---------------------------------------------------------------- Muon (pure functions)

def newton_schulz5(g: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """g [..., n, m] -> an approximately semi-orthogonal matrix of the same shape (U·Vᵀ with its
    singular values squeezed into NS_BAND), each matrix of a batch on its own, as fp32. The iteration runs
    in `dtype`: bf16 is what Muon's authors use (the band tolerates its rounding), 2.5x faster here.

    The matrix is first scaled by its Frobenius norm so every singular value is ≤ 1; when tall it is
    transposed so the Gram matrix X·Xᵀ is the smaller of the two.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT                                   # [..., n, n], n = the smaller side
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).float()


def momentum_direction(grad: torch.Tensor, momentum: torch.Tensor, beta: float = 0.95,
                       nesterov: bool = True) -> torch.Tensor:
    """M = β·M + G (in place, elementwise: fine on a shard); returns the Nesterov direction G + β·M (or M)."""
    momentum.mul_(beta).add_(grad)
    return grad.add(momentum, alpha=beta) if nesterov else momentum.clone()


def orthogonalized(mats: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mats [..., n, m] -> NS5(mats) · 0.2·sqrt(max(n, m)): the update gets about the RMS of an AdamW
    update, so one learning rate serves both parameter kinds (Moonlight)."""
    n, m = mats.shape[-2:]
    return newton_schulz5(mats, dtype=dtype) * (0.2 * math.sqrt(max(n, m)))


def muon_update(grad: torch.Tensor, momentum: torch.Tensor, beta: float = 0.95, nesterov: bool = True) -> torch.Tensor:
    """One Muon update for a stack of matrices grad [..., n, m]; updates `momentum` in place."""
    return orthogonalized(momentum_direction(grad, momentum, beta, nesterov))


def as_matrices(t: torch.Tensor, name: str) -> torch.Tensor:
    """The view of a parameter (or its gradient) as the stack of matrices Muon orthogonalises one by one.

    A 2-D weight is one matrix. The stacked routed experts are one matrix per expert and projection:
    `gate_up_proj [E, 2I, D]` holds K2's separate gate and up matrices, so it becomes [2E, I, D];
    `down_proj [E, D, I]` stays [E, D, I].
    """
    if t.dim() == 2:
        return t
    if name.endswith("gate_up_proj"):
        E, two_i, D = t.shape
        return t.reshape(2 * E, two_i // 2, D)
    return t


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Hidden matrices get Muon; embeddings, lm_head, the router, norms and biases get AdamW."""
    if p.dim() < 2 or "embed_tokens" in name or name.startswith("lm_head") or ".mlp.gate." in name:
        return False
    return True


# ---------------------------------------------------------------- QK-Clip (pure functions)

def qk_clip_scales(max_logit: torch.Tensor, tau: float) -> torch.Tensor:
    """Each head's max pre-softmax logit S [H] -> γ = min(1, τ/S) [H] (1 for heads within τ)."""
    return (tau / max_logit.float().clamp_min(1e-30)).clamp(max=1.0)


def qk_clip_row_scales(gamma: torch.Tensor, dn: int, dr: int, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """γ [H] -> per-row factors for q_b_proj (or q_proj) [H·(dn+dr)] and kv_b_proj [H·(dn+dv)].

    K2's split for MLA: q_nope and k_nope rows by √γ (their product, the nope logit, scales by γ),
    q_rope rows by γ (the shared k_rope must stay untouched, so the query side takes all of γ), v rows by 1.
    """
    H = gamma.shape[0]
    root = gamma.sqrt()[:, None]
    q = torch.cat([root.expand(H, dn), gamma[:, None].expand(H, dr)], dim=1).reshape(-1)
    kv = torch.cat([root.expand(H, dn), torch.ones(H, dv, dtype=gamma.dtype, device=gamma.device)], dim=1).reshape(-1)
    return q, kv


@torch.no_grad()
def apply_qk_clip(attn, max_logit: torch.Tensor, tau: float) -> torch.Tensor:
    """Rescale one MLA module's query and key weights so that no head's max logit exceeds τ. Returns γ [H].

    Heads with S_h ≤ τ keep their weights bit for bit (their rows are multiplied by exactly 1.0).
    """
    gamma = qk_clip_scales(max_logit, tau)
    if bool((gamma < 1).any()):
        q_rows, kv_rows = qk_clip_row_scales(gamma, attn.dn, attn.dr, attn.dv)
        q_weight = attn.q_proj.weight if hasattr(attn, "q_proj") else attn.q_b_proj.weight
        _scale_rows_(q_weight, q_rows)
        _scale_rows_(attn.kv_b_proj.weight, kv_rows)
    return gamma


def _scale_rows_(weight: torch.Tensor, rows: torch.Tensor) -> None:
    """weight [R, C] (maybe a DTensor sharded on rows) *= rows[:, None], on this rank's rows."""
    rows = _local(_like_param(rows.to(weight.dtype), weight))
    _local(weight).mul_(rows[:, None])


# ---------------------------------------------------------------- balancing and schedules (pure functions)

def update_expert_bias(bias: torch.Tensor, counts: torch.Tensor, speed: float) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): bias_e += speed · sign(mean load − load_e), in place.

    counts [E]: tokens each expert received this step. Overloaded experts become less likely to be
    selected, underloaded ones more; the bias only changes selection, never the mixing weights.
    """
    load = counts.float()
    bias.add_(speed * torch.sign(load.mean() - load))
    return bias


def sequence_balance_loss(probs: torch.Tensor, topk: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, α·Σ_i f_i·P_i averaged over sequences.

    probs [B, T, E] sigmoid scores; topk [B, T, k] selected experts. Per sequence:
    f_i = E/(k·T) · #tokens that selected i, P_i = mean over tokens of the score of i normalised over experts.
    """
    B, T, E = probs.shape
    k = topk.shape[-1]
    picked = F.one_hot(topk, E).sum(2).float()                      # [B, T, E] 0/1
    f = picked.sum(1) * (E / (k * T))                               # [B, E], no gradient (counts)
    p = (probs / probs.sum(-1, keepdim=True)).mean(1)               # [B, E]
    return alpha * (f * p).sum(-1).mean()


def lr_at(step: int, base_lr: float, total: int, warmup: int, schedule: str, decay_frac: float = 0.2,
          min_ratio: float = 0.1) -> float:
    """Learning rate at `step` (0-based): linear warm-up over `warmup` steps, then
    constant, WSD (constant, then linear decay to min_ratio·lr over the last decay_frac of the run) or
    cosine (to min_ratio·lr at the last step; K2: 2e-4 → 2e-5)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "wsd":
        decay_steps = max(1, round(decay_frac * total))
        start = total - decay_steps
        if step < start:
            return base_lr
        frac = min(1.0, (step - start + 1) / decay_steps)
        return base_lr * (1 - frac * (1 - min_ratio))
    if schedule == "cosine":
        frac = min(1.0, (step - warmup) / max(1, total - warmup - 1))
        return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    raise NanoK2Error(f"unknown schedule {schedule!r}; known: constant, wsd, cosine")


# ---------------------------------------------------------------- DTensor helpers

def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor from this rank's shard `t` of the DTensor `like` (all-gather), or t itself."""
    if not hasattr(like, "device_mesh"):
        return t
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def _like_param(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The DTensor of `full` laid out as `like` (every rank holds `full`: no communication), or full itself."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


# ---------------------------------------------------------------- the optimizer

class MuonClip(torch.optim.Optimizer):
    """Muon on hidden matrices, AdamW on the rest, QK-Clip on MLA after each step.

    Build it with `MuonClip.for_model(model, ...)`, which splits the parameters by `is_muon_param`
    (`muon=False` puts every parameter under AdamW: the baseline) and registers the MLA modules.
    Call `observe_logits()` after every forward of a step (it keeps each head's running max); `step()`
    then updates the weights and, when `qk_clip_tau` is set, clips the heads above τ. The largest
    logit seen in the step is left in `last_max_logit` for logging.
    """

    def __init__(self, groups: list[dict], lr: float, weight_decay: float = 0.1, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, qk_clip_tau: float | None = None,
                 attention: list | None = None, ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps, muon=False)
        super().__init__(groups, defaults)
        self.qk_clip_tau = qk_clip_tau
        self.ns_dtype = ns_dtype                  # Newton–Schulz's working precision
        self.attention = list(attention or [])
        for attn in self.attention:
            attn.track_max_logit = True
        self._step_max: list[torch.Tensor | None] = [None] * len(self.attention)
        self.last_max_logit = float("nan")

    @classmethod
    def for_model(cls, model: torch.nn.Module, lr: float, muon: bool = True, **kw) -> "MuonClip":
        from nanok2.model import MLA

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        muon_params = [(n, p) for n, p in named if muon and is_muon_param(n, p)]
        adam_params = [(n, p) for n, p in named if not (muon and is_muon_param(n, p))]
        groups = [dict(params=[p for _, p in muon_params], names=[n for n, _ in muon_params], muon=True),
                  dict(params=[p for _, p in adam_params], names=[n for n, _ in adam_params], muon=False)]
        groups = [g for g in groups if g["params"]]
        attention = [m for m in model.modules() if isinstance(m, MLA)]
        return cls(groups, lr=lr, attention=attention, **kw)

    def observe_logits(self) -> None:
        """Fold each MLA module's `max_logit` of the last forward into this step's running max [H]."""
        for i, attn in enumerate(self.attention):
            if attn.max_logit is not None:
                prev = self._step_max[i]
                self._step_max[i] = attn.max_logit if prev is None else torch.maximum(prev, attn.max_logit)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for name, p in zip(group.get("names", [None] * len(group["params"])), group["params"]):
                if p.grad is None:
                    continue
                if group["muon"]:
                    self._muon_step(p, name or "", group)
                else:
                    self._adamw_step(p, group)
        self._qk_clip()
        return None

    def _muon_step(self, p, name: str, group: dict) -> None:
        grad = _local(p.grad)
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad, dtype=torch.float32)
        # momentum is elementwise: this rank's rows; Newton–Schulz needs the whole matrix (all-gather)
        direction = momentum_direction(grad.float(), state["momentum"], group["momentum"])
        full = _full(direction, p.grad)
        update = orthogonalized(as_matrices(full, name), self.ns_dtype).reshape(full.shape)
        update = _local(_like_param(update, p.grad))
        w = _local(p)
        w.mul_(1 - group["lr"] * group["weight_decay"])               # decoupled weight decay
        w.add_(update.to(w.dtype), alpha=-group["lr"])

    def _adamw_step(self, p, group: dict) -> None:
        grad = _local(p.grad).float()
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        b1, b2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        update = state["exp_avg"] / (1 - b1 ** t) / denom
        w = _local(p)
        w.mul_(1 - group["lr"] * group["weight_decay"])
        w.add_(update.to(w.dtype), alpha=-group["lr"])

    def _qk_clip(self) -> None:
        maxes = [m for m in self._step_max if m is not None]
        if not maxes:
            return
        stacked = torch.stack(maxes)                                   # [L, H]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX)             # the max over the global batch
        self.last_max_logit = float(stacked.max())
        if self.qk_clip_tau is not None:
            rows = iter(stacked)
            for attn, m in zip(self.attention, self._step_max):
                if m is not None:
                    apply_qk_clip(attn, next(rows), self.qk_clip_tau)
        self._step_max = [None] * len(self.attention)
