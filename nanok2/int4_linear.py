"""INT4 weights at run time: `Int4Linear` and `Int4Experts`, on CPU int4 kernels or the dequantized reference.

Each quantized weight is held in the checkpoint form, compressed-tensors' `pack-quantized`
(`weight_packed` int32 [out, in/8], `weight_scale` bf16 [out, in/g], `weight_shape` int64 [2]), which is the
module's state dict, so `save_model` writes K2-Thinking's tensor names unchanged. Three ways to multiply:

- "gemv" (decode, up to 16 rows): nanok2's AVX2 kernel below reads that form directly. Each run of 32
  nibbles is unpacked to int16 in registers and multiplied (`madd_epi16`) with the activations rounded to
  int16 (one scale per row: error ≤ max|x|/65534, finer than bf16), then scaled in fp32. At batch 1 a decode step
  is bound by the bytes it reads; this reads 0.56 bytes per weight instead of bf16's 2.
- "torch" (prefill, more rows): `_weight_int4pack_mm_for_cpu`, which computes x @ ((n - 8) · scale + zero)ᵀ
  for stored nibbles n, K2's layout with zero 0, so no value is re-quantized. Its packed form depends on
  the CPU (AVX2 vs AVX512) and lives in memory only, built at load time by `prepare_int4`; it wants bf16
  activations, out_features divisible by 16 and a group size of 32, 64, 128 or 256.
- "reference": dequantize, then `F.linear`. It runs whenever a kernel cannot (autograd, other devices,
  odd shapes) and when `set_int4_kernel(model, "reference")` asks; the tests compare the kernels to it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanok2.quant import dequantize, pack_int4, quantize_groupwise, unpack_int4

MAX_GEMV_ROWS = 16     # more rows (prefill): torch's int4 kernel
MAX_FUSED_TOKENS = 4   # up to this many tokens, a whole MoE layer's experts run in one int4_moe call
KERNEL_MODES = ("auto", "gemv", "torch", "reference")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <alloca.h>
#include <cstring>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Activations: each row of x [M, K] becomes int16 (round(x / s), s = max|x| / 32767 per row: error <= s / 2),
// each run of 32 reordered as its 16 even then its 16 odd elements, which is how the nibbles unpack.
static void quantize_x(const float* x, int16_t* xq, float* xs, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m) {
    const float* v = x + m * K;
    float amax = 0.f;
    for (int64_t j = 0; j < K; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float s = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / s;
    xs[m] = s;
    int16_t* o = xq + m * K;
    for (int64_t b = 0; b < K; b += 32)
      for (int j = 0; j < 16; ++j) {
        o[b + j] = int16_t(std::nearbyint(v[b + 2 * j] * inv));
        o[b + 16 + j] = int16_t(std::nearbyint(v[b + 2 * j + 1] * inv));
      }
  }
}

// 16 bytes of one run of 32 weights (byte i: element 2i in the low nibble, 2i+1 in the high one, stored q + 8)
// -> q as int16: even elements, odd elements
static inline void unpack32(const uint8_t* p, __m256i& even, __m256i& odd) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  even = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(v, mask), eight));
  odd = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight));
}

// one weight row (K/2 bytes, bf16 scales s[K/gs]) against R quantized input rows (scales xs[r]) -> y[r * ldy]
template <int R>
static inline void dot_rows(const int16_t* xq, const float* xs, int64_t K, const uint8_t* w, const uint16_t* s,
                            int64_t gs, float* y, int64_t ldy) {
  const int64_t G = K / gs;
  float* sf = static_cast<float*>(alloca(sizeof(float) * G));   // the row's scales in fp32, broadcast from memory
  for (int64_t g = 0; g < G; ++g) sf[g] = bf16_to_float(s[g]);
  __m256 acc0[R], acc1[R];                                         // two chains: blocks alternate between them
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  auto block = [&](int64_t k, __m256* acc) {
    __m256i even, odd;
    unpack32(w + k / 2, even, odd);
    const __m256 sw = _mm256_broadcast_ss(sf + k / gs);
    for (int r = 0; r < R; ++r) {
      const int16_t* xr = xq + r * K + k;
      const __m256i d = _mm256_add_epi32(
          _mm256_madd_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
          _mm256_madd_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16))));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sw, acc[r]);
    }
  };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) { block(k, acc0); block(k + 32, acc1); }
  if (k < K) block(k, acc0);
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(_mm256_add_ps(acc0[r], acc1[r])) * xs[r];
}

// y[:, n0:n1] of y[M, N] = x[M, K] @ W^T, W packed (int32 [N, K/8] read as bytes), scales bf16 [N, K/gs]
static void gemv(const int16_t* xq, const float* xs, int64_t M, int64_t K, const uint8_t* w, const uint16_t* s,
                 int64_t gs, int64_t N, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * (K / 2);
    const uint16_t* sr = s + n * (K / gs);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dot_rows<4>(xq + m * K, xs + m, K, row, sr, gs, y + m * N + n, N);
    for (; m + 2 <= M; m += 2) dot_rows<2>(xq + m * K, xs + m, K, row, sr, gs, y + m * N + n, N);
    for (; m < M; ++m) dot_rows<1>(xq + m * K, xs + m, K, row, sr, gs, y + m * N + n, N);
  }
}

static void check(const torch::Tensor& w, const torch::Tensor& s, int64_t K, int64_t gs) {
  TORCH_CHECK(w.scalar_type() == torch::kInt && s.scalar_type() == torch::kBFloat16, "int32 weights, bf16 scales");
  TORCH_CHECK(w.is_contiguous() && s.is_contiguous() && w.dim() == 2 && w.size(1) * 8 == K, "packed shape");
  TORCH_CHECK(gs % 32 == 0 && K % gs == 0 && s.size(0) == w.size(0) && s.size(1) == K / gs, "group size");
}

#define BYTES(t) reinterpret_cast<const uint8_t*>((t).data_ptr())
#define HALFS(t) reinterpret_cast<const uint16_t*>((t).data_ptr())

// x [M, K] fp32 -> [M, N] fp32
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t gs) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check(w, s, K, gs);
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kShort));
  auto xs = torch::empty({M}, x.options());
  quantize_x(x.data_ptr<float>(), xq.data_ptr<int16_t>(), xs.data_ptr<float>(), M, K);
  auto y = torch::empty({M, N}, x.options());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    gemv(xq.data_ptr<int16_t>(), xs.data_ptr<float>(), M, K, BYTES(w), HALFS(s), gs, N, y.data_ptr<float>(), n0, n1);
  });
  return y;
}

// one SwiGLU expert, down(silu(gate x) * up x): x [M, D] fp32 -> [M, D] fp32, in one call
torch::Tensor int4_expert(torch::Tensor x, torch::Tensor gw, torch::Tensor gsc, torch::Tensor uw, torch::Tensor usc,
                          torch::Tensor dw, torch::Tensor dsc, int64_t gs) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [M, D]");
  const int64_t M = x.size(0), D = x.size(1), I = gw.size(0);
  check(gw, gsc, D, gs); check(uw, usc, D, gs); check(dw, dsc, I, gs);
  TORCH_CHECK(uw.size(0) == I && dw.size(0) == D, "expert shapes");
  auto xq = torch::empty({M, D}, x.options().dtype(torch::kShort));
  auto xs = torch::empty({M}, x.options());
  quantize_x(x.data_ptr<float>(), xq.data_ptr<int16_t>(), xs.data_ptr<float>(), M, D);
  auto g = torch::empty({M, I}, x.options()), u = torch::empty({M, I}, x.options());
  at::parallel_for(0, I, 16, [&](int64_t n0, int64_t n1) {
    gemv(xq.data_ptr<int16_t>(), xs.data_ptr<float>(), M, D, BYTES(gw), HALFS(gsc), gs, I, g.data_ptr<float>(), n0, n1);
    gemv(xq.data_ptr<int16_t>(), xs.data_ptr<float>(), M, D, BYTES(uw), HALFS(usc), gs, I, u.data_ptr<float>(), n0, n1);
  });
  float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  for (int64_t i = 0; i < M * I; ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
  auto hq = torch::empty({M, I}, x.options().dtype(torch::kShort));
  auto hs = torch::empty({M}, x.options());
  quantize_x(gp, hq.data_ptr<int16_t>(), hs.data_ptr<float>(), M, I);
  auto y = torch::empty({M, D}, x.options());
  at::parallel_for(0, D, 16, [&](int64_t n0, int64_t n1) {
    gemv(hq.data_ptr<int16_t>(), hs.data_ptr<float>(), M, I, BYTES(dw), HALFS(dsc), gs, D, y.data_ptr<float>(), n0, n1);
  });
  return y;
}
// The routed experts of one MoE layer for a few tokens in one call (two parallel regions instead of two per
// expert): y[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]). x [N, D] fp32, idx [N, k] int64, w [N, k] fp32,
// the experts' packed weights and scales as lists indexed by expert.
torch::Tensor int4_moe(torch::Tensor x, torch::Tensor idx, torch::Tensor w, std::vector<torch::Tensor> gw,
                       std::vector<torch::Tensor> gsc, std::vector<torch::Tensor> uw, std::vector<torch::Tensor> usc,
                       std::vector<torch::Tensor> dw, std::vector<torch::Tensor> dsc, int64_t gs) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [N, D]");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && w.scalar_type() == torch::kFloat && idx.is_contiguous() &&
              w.is_contiguous() && idx.sizes() == w.sizes() && idx.size(0) == x.size(0), "idx, w: [N, k]");
  const int64_t N = x.size(0), D = x.size(1), k = idx.size(1), P = N * k, E = int64_t(gw.size());
  const int64_t I = gw[0].size(0);
  auto xq = torch::empty({N, D}, x.options().dtype(torch::kShort));
  auto xs = torch::empty({N}, x.options());
  quantize_x(x.data_ptr<float>(), xq.data_ptr<int16_t>(), xs.data_ptr<float>(), N, D);
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<const uint8_t*> G(P), U(P), Dn(P);
  std::vector<const uint16_t*> GS(P), US(P), DS(P);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = ip[p];
    TORCH_CHECK(0 <= e && e < E, "expert index out of range");
    check(gw[e], gsc[e], D, gs); check(uw[e], usc[e], D, gs); check(dw[e], dsc[e], I, gs);
    G[p] = BYTES(gw[e]); GS[p] = HALFS(gsc[e]); U[p] = BYTES(uw[e]); US[p] = HALFS(usc[e]);
    Dn[p] = BYTES(dw[e]); DS[p] = HALFS(dsc[e]);
  }
  auto g = torch::empty({P, I}, x.options()), u = torch::empty({P, I}, x.options());
  float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  const int16_t* xqp = xq.data_ptr<int16_t>();
  const float* xsp = xs.data_ptr<float>();
  at::parallel_for(0, P * I, 64, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; ++it) {
      const int64_t p = it / I, n = it % I, t = p / k;
      dot_rows<1>(xqp + t * D, xsp + t, D, G[p] + n * (D / 2), GS[p] + n * (D / gs), gs, gp + it, 1);
      dot_rows<1>(xqp + t * D, xsp + t, D, U[p] + n * (D / 2), US[p] + n * (D / gs), gs, up + it, 1);
    }
  });
  for (int64_t i = 0; i < P * I; ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
  auto hq = torch::empty({P, I}, x.options().dtype(torch::kShort));
  auto hs = torch::empty({P}, x.options());
  quantize_x(gp, hq.data_ptr<int16_t>(), hs.data_ptr<float>(), P, I);
  const int16_t* hqp = hq.data_ptr<int16_t>();
  const float* hsp = hs.data_ptr<float>();
  auto yp = torch::empty({P, D}, x.options());
  float* ypp = yp.data_ptr<float>();
  at::parallel_for(0, P * D, 64, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; ++it) {
      const int64_t p = it / D, n = it % D;
      dot_rows<1>(hqp + p * I, hsp + p, I, Dn[p] + n * (I / 2), DS[p] + n * (I / gs), gs, ypp + it, 1);
    }
  });
  auto y = torch::zeros({N, D}, x.options());
  float* yo = y.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t n = 0; n < D; ++n) yo[(p / k) * D + n] += wp[p] * ypp[p * D + n];
  return y;
}
"""


@functools.cache
def gemv_kernel():
    """nanok2's AVX2 int4 kernel (built once with torch's extension loader, cached), or None."""
    from nanok2.cpu_kernels import build_kernel

    return build_kernel("nanok2_int4_gemv", _SOURCE, ["int4_linear", "int4_expert", "int4_moe"], "int4",
                        "torch's int4 kernel")


def _no_grad(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


def gemv_supported(in_features: int, group_size: int) -> bool:
    return group_size % 32 == 0 and in_features % group_size == 0


KERNEL_GROUP_SIZES = (32, 64, 128, 256)


def kernel_supported(out_features: int, in_features: int, group_size: int) -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and group_size in KERNEL_GROUP_SIZES
            and out_features % 16 == 0 and in_features % group_size == 0)


def to_kernel(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q int8 [N, K] in [-8, 7], scale [N, K/g] -> (packed uint8 for the CPU kernel, scales_and_zeros [K/g, N, 2] bf16)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    s = scale.to(torch.bfloat16).t()
    return packed, torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def int4_mm(x: torch.Tensor, kernel: tuple[torch.Tensor, torch.Tensor], group_size: int) -> torch.Tensor:
    """x [..., K] (any float dtype; computed in bf16) @ Wᵀ -> [..., N] in x's dtype."""
    packed, sz = kernel
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)
    return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)


class Int4Linear(nn.Module):
    """A bias-free-or-not nn.Linear whose weight is symmetric group-wise INT4 (compressed-tensors names)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size, dtype=torch.bfloat16,
                                                        device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.kernel_mode = "auto"
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None
        self._weight: torch.Tensor | None = None
        # anything that rewrites the buffers (load_state_dict, copy_tensors + prepare_int4) invalidates the kernel form
        self.register_load_state_dict_post_hook(lambda module, _: module.reset_kernel())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int = 32, bias: torch.Tensor | None = None,
                    name: str = "weight") -> "Int4Linear":
        out_features, in_features = weight.shape
        q, scale = quantize_groupwise(weight.detach(), group_size, name=name)
        m = cls(in_features, out_features, group_size, bias=bias is not None, device=weight.device)
        m.set_quantized(q, scale)
        if bias is not None:
            m.bias.data.copy_(bias.detach())
        return m

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight_packed.copy_(pack_int4(q))
        self.weight_scale.copy_(scale)
        self.reset_kernel()

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in], scale bf16 [out, in/g]) from the checkpoint form."""
        return unpack_int4(self.weight_packed), self.weight_scale

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        q, scale = self.quantized()
        return dequantize(q, scale, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] in bf16, for code that reads `.weight` (the engine's absorbed MLA
        folds `kv_b_proj.weight` into the query every step): dequantized once, kept until the buffers change."""
        if self._weight is None:
            self._weight = self.dequantized()
        return self._weight

    def reset_kernel(self) -> None:
        self._kernel = None
        self._weight = None

    def kernel(self):
        """The CPU-kernel form, built on first use; None where the kernel cannot run this module."""
        if self._kernel is None and self.weight_packed.device.type == "cpu" and \
                kernel_supported(self.out_features, self.in_features, self.group_size):
            self._kernel = to_kernel(*self.quantized())
        return self._kernel

    def _mode(self, x: torch.Tensor) -> str:
        """Which multiply runs for this input (see the module docstring)."""
        mode = self.kernel_mode
        if mode == "reference" or x.device.type != "cpu" or not _no_grad(x):
            return "reference"
        rows = x.numel() // x.shape[-1]
        if mode in ("auto", "gemv") and (rows <= MAX_GEMV_ROWS or mode == "gemv") and \
                gemv_supported(self.in_features, self.group_size) and gemv_kernel() is not None:
            return "gemv"
        return "torch" if self.kernel() is not None else "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode(x)
        if mode == "gemv":
            x2 = x.reshape(-1, self.in_features).float().contiguous()
            y = gemv_kernel().int4_linear(x2, self.weight_packed, self.weight_scale, self.group_size)
            y = y.view(*x.shape[:-1], self.out_features)
        elif mode == "torch":
            y = int4_mm(x, self.kernel(), self.group_size)
        else:
            return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = y if self.bias is None else y + self.bias
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # a dtype cast of the model must not turn the scales into fp32 (the checkpoint stores bf16), and a
        # device move makes the kernel form stale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.bfloat16:
            self.weight_scale = self.weight_scale.to(torch.bfloat16)
        self.reset_kernel()
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, int4"


class Int4ExpertMLP(nn.Module):
    """One routed expert: `gate_proj`, `up_proj`, `down_proj` as Int4Linear (names `experts.{e}.gate_proj…`)."""

    def __init__(self, dim: int, inter: int, group_size: int = 32, device=None):
        super().__init__()
        self.gate_proj = Int4Linear(dim, inter, group_size, device=device)
        self.up_proj = Int4Linear(dim, inter, group_size, device=device)
        self.down_proj = Int4Linear(inter, dim, group_size, device=device)
        self._gate_up: tuple[torch.Tensor, torch.Tensor] | None = None   # gate and up fused: one kernel call
        self.register_load_state_dict_post_hook(lambda module, _: module.reset_kernel())

    def reset_kernel(self) -> None:
        self._gate_up = None
        for m in (self.gate_proj, self.up_proj, self.down_proj):
            m.reset_kernel()

    def gate_up_kernel(self):
        """gate and up stacked [2I, D] in the kernel form (one call instead of two), or None."""
        g, u = self.gate_proj, self.up_proj
        if self._gate_up is None and g.weight_packed.device.type == "cpu" and u.group_size == g.group_size and \
                kernel_supported(2 * g.out_features, g.in_features, g.group_size):
            (qg, sg), (qu, su) = g.quantized(), u.quantized()
            self._gate_up = to_kernel(torch.cat([qg, qu]), torch.cat([sg, su]))
        return self._gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        mode = g._mode(x)
        if mode == "gemv" and d._mode(x) == "gemv":        # the whole expert in one call
            y = gemv_kernel().int4_expert(x.reshape(-1, g.in_features).float().contiguous(),
                                          g.weight_packed, g.weight_scale, u.weight_packed, u.weight_scale,
                                          d.weight_packed, d.weight_scale, g.group_size)
            return y.view(x.shape).to(x.dtype)
        if mode in ("gemv", "torch"):
            gate_up, down = self.gate_up_kernel(), d.kernel()
            if gate_up is not None and down is not None:
                gate, up = int4_mm(x, gate_up, g.group_size).chunk(2, dim=-1)
                return int4_mm(F.silu(gate) * up, down, d.group_size)
        return d(F.silu(g(x)) * u(x))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._gate_up = None
        return self


class Int4Experts(nn.ModuleList):
    """Routed experts in INT4, one `Int4ExpertMLP` per expert; the same `forward(x, idx, w)` / `expert(e, x)`
    as `moe.Experts`, so `grouped_experts`, `looped_experts` and the engine run it unchanged."""

    def __init__(self, n_experts: int, dim: int, inter: int, group_size: int = 32, device=None):
        super().__init__(Int4ExpertMLP(dim, inter, group_size, device) for _ in range(n_experts))
        self.n_experts, self.inter, self.group_size = n_experts, inter, group_size
        self._lists: list[list[torch.Tensor]] | None = None   # buffers by expert, for int4_moe
        self.register_load_state_dict_post_hook(lambda module, _: module.reset_kernel())

    @classmethod
    def from_experts(cls, experts, group_size: int = 32, prefix: str = "experts") -> "Int4Experts":
        """Quantize a stacked `moe.Experts` (gate_up_proj [E, 2I, D], down_proj [E, D, I])."""
        gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
        E, two_i, D = gu.shape
        inter = two_i // 2
        q_gu, s_gu = quantize_groupwise(gu, group_size, name=f"{prefix}.0.gate_proj.weight")
        q_dn, s_dn = quantize_groupwise(dn, group_size, name=f"{prefix}.0.down_proj.weight")
        m = cls(E, D, inter, group_size, device=gu.device)
        for e, mlp in enumerate(m):
            mlp.gate_proj.set_quantized(q_gu[e, :inter], s_gu[e, :inter])
            mlp.up_proj.set_quantized(q_gu[e, inter:], s_gu[e, inter:])
            mlp.down_proj.set_quantized(q_dn[e], s_dn[e])
        return m

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self[e](x)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Decode (≤ MAX_FUSED_TOKENS tokens): every routed expert of the layer in one `int4_moe` call;
        otherwise `grouped_experts`, expert by expert (its reference)."""
        from nanok2.moe import grouped_experts

        first = self[0].gate_proj
        if x.shape[0] <= MAX_FUSED_TOKENS and first._mode(x) == "gemv" and self[0].down_proj._mode(x) == "gemv":
            if self._lists is None:
                self._lists = [[getattr(getattr(m, proj), t) for m in self]
                               for proj in ("gate_proj", "up_proj", "down_proj") for t in ("weight_packed", "weight_scale")]
            y = gemv_kernel().int4_moe(x.float().contiguous(), idx.contiguous(), w.float().contiguous(), *self._lists,
                                       self.group_size)
            return y.to(x.dtype)
        return grouped_experts(self, x, idx, w)

    def reset_kernel(self) -> None:
        self._lists = None
        for mlp in self:
            mlp.reset_kernel()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._lists = None          # the buffers may be new tensors now
        return self


def int4_modules(model: nn.Module):
    """(name, module) of every Int4Linear / Int4ExpertMLP in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Int4Linear, Int4ExpertMLP))]


@torch.no_grad()
def prepare_int4(model: nn.Module) -> nn.Module:
    """Build the kernel form of every INT4 weight now (rather than on the first forward)."""
    mods = int4_modules(model)
    inside_experts = set()
    for _, m in mods:
        m.reset_kernel()
    for _, m in mods:
        if isinstance(m, Int4ExpertMLP):
            m.gate_up_kernel()
            m.down_proj.kernel()
            inside_experts.update((id(m.gate_proj), id(m.up_proj)))
    for _, m in mods:
        if isinstance(m, Int4Linear) and id(m) not in inside_experts:
            m.kernel()
    return model


def set_int4_kernel(model: nn.Module, mode: str = "auto") -> nn.Module:
    """Choose how every INT4 module multiplies: "auto" (gemv up to 16 rows, torch's kernel above),
    "gemv", "torch" or "reference" (dequantize, then F.linear)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown int4 kernel mode {mode!r}; use one of {', '.join(KERNEL_MODES)}")
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.kernel_mode = mode
    return model
