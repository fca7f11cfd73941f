"""The K2 transformer in plain PyTorch: RMSNorm, interleaved rope with YaRN, MLA, dense MLP, MoE blocks.

Module and parameter names are transformers' DeepseekV3 names (`model.layers.{i}.self_attn.q_a_proj`, …),
so a state dict maps onto a Hugging Face checkpoint by name; only the routed experts are stored
stacked here (see moe.py) and split per expert by checkpoint.py.

The attention here is the *naive* MLA path: the latent is expanded into per-head keys and values.
The engine's decode path (engine.py) runs the *absorbed* form on the cached latent; this one is its
reference. Shapes in comments: B batch, T tokens, H heads, r = kv_lora_rank, dn/dr/dv head dims.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanok2.config import ModelArgs, yarn_mscale
from nanok2.moe import MLP, MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, as transformers and DeepSeek-V3 do, then scale in the input dtype
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------- rope + YaRN (pure functions)

def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dr/2] of the rotary key, and the factor cos/sin are multiplied by.

    Without scaling: theta^(-2i/dr). With YaRN: low frequencies (long wavelengths) are interpolated by
    `factor`, high ones kept, blended linearly over the dims between the beta_fast / beta_slow
    correction points; cos/sin carry mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    # always on the CPU (also when the model is built on the meta device); rope() moves it
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs = args.rope_scaling
    if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
        return freq, 1.0
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(n_rotations: float) -> float:
        # the dim whose wavelength completes n_rotations over the original context
        return dim * math.log(orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                   # 1 = extrapolate (keep), 0 = interpolate
    inv_freq = (freq / factor) * (1 - keep) + freq * keep
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, factor: float = 1.0):
    """positions [B, T] -> cos, sin [B, T, dr/2] (fp32)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos() * factor, angles.sin() * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), … as DeepSeek-V3 does. x [B, T, (H,) dr]."""
    if x.dim() == 4:  # [B, T, H, dr]: broadcast over heads
        cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(x.dtype)


# ---------------------------------------------------------------- attention

# The q and kv latent norms use eps 1e-6 whatever `rms_norm_eps` says: DeepSeek-V3's reference code and
# transformers build them with the RMSNorm default (vLLM passes rms_norm_eps; for K2 the two differ in the
# 5th significant digit). nanok2 follows transformers, its reference for logits.
LATENT_NORM_EPS = 1e-6


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with the scores materialised: the slow reference of the kernels below.

    q [B, H, Tq, d], k [B, H, Tk, d], v [B, H, Tk, dv]; mask [B or 1, 1, Tq, Tk] boolean (True = attend) or
    None for causal with the queries the last Tq of the Tk positions. Returns [B, H, Tq, dv] in v's dtype.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().mT) * scale                                        # [B, H, Tq, Tk]
    if mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)[None, None]
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v


def sdpa_attention(q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`reference_attention` by PyTorch's SDPA; mask=None only for Tq == Tk (causal) or one query (every key).
    With v narrower than q/k (MLA's dv < dn+dr) SDPA cannot use its fused CPU kernel and runs its math path."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def padded_sdpa_attention(q, k, v, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`sdpa_attention` with v zero-padded to the q/k head dim, so SDPA takes its fused (flash) kernel: a whole
    agent-tiny training step of 2 x 2,048 tokens on 2 CPU threads took 1.35 s against 2.09 s with plain SDPA
    (`nanok2 bench train-step`). The padded output columns are zeros and are dropped. Where v is the wider
    (v_head_dim > qk_nope + qk_rope), q and k get the zero columns instead: they add nothing to q·kᵀ."""
    dq, dv = q.shape[-1], v.shape[-1]
    if dv > dq:
        return sdpa_attention(F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq)), v, scale, mask)
    return sdpa_attention(q, k, F.pad(v, (0, dq - dv)), scale, mask)[..., :dv]


@torch.no_grad()
def max_attention_logit(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                        chunk: int = 512) -> torch.Tensor:
    """Each head's largest pre-softmax logit over the pairs that attend (QK-Clip's S_max), in fp32.

    q [B, H, Tq, d], k [B, H, Tk, d]; mask [B or 1, 1, Tq, Tk] boolean (True = attend) or None for causal
    with the queries the last Tq of the Tk positions. Returns [H], detached. Causal attention is read in
    blocks of `chunk` queries against only the keys they can see: about half the products of q·kᵀ and
    never the whole [B, H, Tq, Tk] at once.
    """
    q, k = q.float(), k.float()
    if mask is not None:
        return (q @ k.mT).masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3)) * scale
    Tq, Tk = q.shape[2], k.shape[2]
    offset = Tk - Tq
    best = torch.full((q.shape[1],), float("-inf"), device=q.device)
    for start in range(0, Tq, chunk):
        end = min(start + chunk, Tq)
        seen = end + offset                                                # keys 0 .. seen-1
        scores = q[:, :, start:end] @ k[:, :, :seen].mT                   # [B, H, end-start, seen]
        rows = torch.arange(start, end, device=q.device)[:, None] + offset
        scores.masked_fill_(torch.arange(seen, device=q.device)[None, :] > rows, float("-inf"))
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
    return best * scale


class MLA(nn.Module):
    """Multi-head latent attention. Keys and values come from one normed latent of r numbers per token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, dn, dr, dv = args.num_attention_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.n_heads, self.dn, self.dr, self.dv = H, dn, dr, dv
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(args.hidden_size, H * (dn + dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, args.kv_lora_rank + dr, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, H * (dn + dv), bias=False)
        self.o_proj = nn.Linear(H * dv, args.hidden_size, bias=args.attention_bias)
        self.softmax_scale = args.softmax_scale
        # QK-Clip reads each head's largest pre-softmax logit from the last forward when this is on
        self.track_max_logit = False
        self.max_logit: torch.Tensor | None = None   # [H], fp32, detached
        # softmax attention on expanded heads; `nanok2 bench train-step` swaps in the others to compare
        self.attention_kernel = padded_sdpa_attention

    def queries(self, x, cos, sin):
        """x [B, T, D] -> q_nope [B, T, H, dn], q_rope [B, T, H, dr] (rotated)."""
        B, T, _ = x.shape
        if self.args.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.dn + self.dr)
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latents(self, x, cos, sin):
        """x [B, T, D] -> the cached part: c_kv [B, T, r] (normed), k_rope [B, T, dr] (rotated)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.args.kv_lora_rank, self.dr], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin)

    def attend(self, q_nope, q_rope, c_kv, k_rope, mask: torch.Tensor | None) -> torch.Tensor:
        """Naive MLA: expand the latent into per-head keys/values, then softmax attention.

        q_* [B, Tq, H, *], c_kv [B, Tk, r], k_rope [B, Tk, dr]; mask [B or 1, 1, Tq, Tk] boolean (True = attend)
        or None for plain causal with Tq == Tk. Returns [B, Tq, H*dv].
        """
        B, Tq, H, _ = q_nope.shape
        Tk = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, Tk, H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)                         # [B, H, Tq, dn+dr]
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, Tk, H, self.dr)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)                                                           # [B, H, Tk, dv]
        if self.track_max_logit:
            # QK-Clip's statistic, read apart from the differentiable path so training keeps a fused kernel
            self.max_logit = max_attention_logit(q, k, self.softmax_scale, mask)
        out = self.attention_kernel(q, k, v, self.softmax_scale, mask)                  # [B, H, Tq, dv]
        return out.transpose(1, 2).reshape(B, Tq, H * self.dv)

    def forward(self, x, cos, sin, mask=None):
        q_nope, q_rope = self.queries(x, cos, sin)
        c_kv, k_rope = self.latents(x, cos, sin)
        return self.o_proj(self.attend(q_nope, q_rope, c_kv, k_rope, mask))


# ---------------------------------------------------------------- blocks

class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args) if args.is_moe_layer(layer_idx) else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in checkpoint names: embeddings, blocks, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """K2 causal LM. `model(input_ids[B, T]) -> logits[B, T, V]`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        # a plain attribute, not a buffer: `model.to(bfloat16)` must not round the frequencies
        self.inv_freq, self.rope_factor = rope_inv_freq(args)

    def tie_weights(self) -> None:
        """Share lm_head with the embeddings when the config says so (again after `to_empty`, which unties)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor):
        """positions [B, T] -> cos, sin [B, T, dr/2] in fp32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return rope_cos_sin(self.inv_freq, positions, self.rope_factor)

    def hidden_states(self, input_ids, positions=None, mask=None):
        """input_ids [B, T] -> final-normed hidden states [B, T, D]."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, mask=None, scored=None):
        """`scored` (bool [B, T]): logits only at those positions -> [N, V], in row-major order. Training
        uses it to skip the lm_head and softmax where the loss weight is 0 (two thirds of SFT's tokens: the
        system prompt, the tool specs, the user turns and the padding)."""
        h = self.hidden_states(input_ids, positions, mask)
        return self.lm_head(h if scored is None else h[scored])

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> "Transformer":
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases and router bias."""
        std = self.args.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        return self


def build_model(args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> Transformer:
    """A freshly initialised model. On the meta device nothing is allocated (for counting the 1T preset)."""
    with torch.device(device):
        model = Transformer(args)
    if str(device) != "meta":
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        model.init_weights(g)
    return model.to(dtype) if dtype != torch.float32 else model
