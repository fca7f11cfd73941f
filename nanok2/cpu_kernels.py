"""A bf16-weight matmul for CPUs without bf16 units, and the module swap that puts it under a built model.

On AVX2 CPUs (no AVX512-BF16), torch's bf16 `F.linear` converts the weights again for every row of the
input: its cost grows with the number of rows, so a decode step for 16 requests costs about 16 steps
for one, and batching buys nothing. Decoding is bound by reading the weights; the kernel here reads
each weight row once, widens it to fp32 in registers (a shift and a mask, no shuffle) and multiplies it
into every input row while it sits in L1 (beyond 8 rows, in tiles of 4 weight rows x 2 input rows). Up
to 16 rows run it; for more (prefill) the weights are widened once and torch's fp32 matmul runs. The
fused decode step (fused_decode.py) compiles this source in and calls `rows_times_bf16_serial` directly.

The kernel is C++ built on first use with torch's extension loader (cached under
~/.cache/torch_extensions; a minute or more the first time). Without a compiler or AVX2/FMA, nothing is
swapped and the model runs as it is. `use_bf16_kernel(model)` changes the class of bf16 `nn.Linear`
and `Experts` modules in place: same parameters, same names, same state dict; under autograd, or with
other dtypes, they run torch's own path.
"""
from __future__ import annotations

import functools
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanok2.moe import Experts

MAX_KERNEL_ROWS = 16   # more input rows: widen the weight once and use torch's fp32 matmul

ALIGNED_VECTOR_SOURCE = r"""
#include <cstdlib>
#include <new>
#include <vector>

// std::vector storage that starts on a cache line. The kernels load activations 32 bytes at a time; at
// malloc's 16-byte alignment every other load straddles two cache lines, and a load that does costs two.
// Measured on this machine's Zen 3 (one thread, weights in L2, K = 1024): the bf16 kernel at 4 input rows
// 12.5 -> 18.2 GB/s, at 2 rows 21.9 -> 30.1, at 1 row 33.7 -> 42.3.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U> CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(64, std::max<std::size_t>(64, (n * sizeof(T) + 63) / 64 * 64));
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U> bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U> bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T> using AlignedVector = std::vector<T, CacheLineAllocator<T>>;
"""


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
""" + ALIGNED_VECTOR_SOURCE + r"""

// 8 bf16 -> 8 fp32: a bf16 is the top half of an fp32
static inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The kernel widens 16 bf16 weights without a shuffle: loaded as 8 32-bit lanes, each lane holds an even
// element in its low half and the next odd one in its high half, so `lane << 16` is the even elements
// as fp32 and `lane & 0xFFFF0000` the odd ones. The activations are reordered to match, once per call:
// in each run of 16, its 8 even elements then its 8 odd ones (a last run of 8, when K % 16 == 8, stays as is).
static void split_pairs(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* v = x + m * K;
    float* o = out + m * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      for (int j = 0; j < 8; ++j) { o[k + j] = v[k + 2 * j]; o[k + 8 + j] = v[k + 2 * j + 1]; }
    for (; k < K; ++k) o[k] = v[k];
  }
}

static inline void widen16(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
}

// R input rows x[R, K] (fp32, split_pairs order) times one weight row w[K] (bf16) -> y[r * ldy]. A fused
// multiply-add has a latency of 4 cycles: with one or two rows, four accumulator chains per row keep the
// FMA units busy; with three or four rows, two per row (six or eight chains) do, within the 16 vector registers.
template <int R>
static inline void dot_rows(const float* x, int64_t K, const uint16_t* w, float* y, int64_t ldy) {
  constexpr int A = R >= 3 ? 2 : 4;
  __m256 acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256 e0, o0, e1, o1;
    // one cache line per iteration, fetched 1 kB ahead into L1 (into the next row near a row's end: rows
    // are contiguous). Measured on the bench preset: 8-10% on a batch-1 step, from DRAM 25 -> 31 GB/s at one
    // input row and 21 -> 29 GB/s at two; the hardware prefetcher alone leaves the memory bus idle at times.
    // And 6 kB ahead into L2: 1 kB is 16 lines in flight, ~12 GB/s per thread at DRAM's ~85 ns, enough
    // while one input row leaves the loop waiting on memory, not once 2-4 rows give it arithmetic to do.
    // Two threads, DRAM, best of 10 interleaved, two runs: 2 rows 25-30 -> 32 GB/s, 4 rows 23-25 -> 31-34
    // (1 and 3 rows unchanged); the bench preset's batch-16 step 10-15% shorter (57-63 -> 48-56 ms, steps
    // of both builds interleaved), its batch-1 step within the noise.
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + 1024, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + 6144, _MM_HINT_T1);
    widen16(w + k, e0, o0);
    widen16(w + k + 16, e1, o1);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * K + k;
      acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), e0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), o0, acc[r][1]);
      acc[r][2 % A] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), e1, acc[r][2 % A]);
      acc[r][3 % A] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), o1, acc[r][3 % A]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    __m256 e0, o0;
    widen16(w + k, e0, o0);
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), e0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k + 8), o0, acc[r][1]);
    }
  }
  if (k < K) {   // a last run of 8, in natural order
    const __m256 w0 = widen8(w + k);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + k), w0, acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 sum = acc[r][0];
    for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
    y[r * ldy] = hsum(sum);
  }
}

// More than 8 input rows (batch 16): a tile of 4 weight rows x 2 input rows, one accumulator each. 16 rows
// of activations (64 kB for K = 1024) do not fit L1; re-reading them from L2 for every weight row, not the
// arithmetic, bounded the row-at-a-time kernel. Here every activation vector loaded serves 4 weight rows.
// 8 accumulators + 4 activation + 2 weight registers of the 16. `next` (or null): the next 4 weight rows,
// fetched into L1 two cache lines per iteration (4 rows x K bf16 = 128 bytes per 16 k) while these are
// multiplied; `far` (or null): the 4 after those, into L2 alike, so that `next` finds them there (DRAM's
// latency was showing: from DRAM, one thread, 16 input rows 34 -> 44 G multiply-adds/s, 9 rows 28 -> 40,
// which is what the tiles reach with the weights in L2).
template <int RW, int RX>
static inline void tile(const float* x, int64_t K, const uint16_t* w, float* y, int64_t ldy,
                        const char* next = nullptr, const char* far = nullptr) {
  __m256 acc[RW][RX];
  for (int i = 0; i < RW; ++i)
    for (int j = 0; j < RX; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (next) {
      _mm_prefetch(next + 8 * k, _MM_HINT_T0);
      _mm_prefetch(next + 8 * k + 64, _MM_HINT_T0);
    }
    if (far) {
      _mm_prefetch(far + 8 * k, _MM_HINT_T1);
      _mm_prefetch(far + 8 * k + 64, _MM_HINT_T1);
    }
    __m256 xe[RX], xo[RX];
    for (int j = 0; j < RX; ++j) { xe[j] = _mm256_loadu_ps(x + j * K + k); xo[j] = _mm256_loadu_ps(x + j * K + k + 8); }
    for (int i = 0; i < RW; ++i) {
      __m256 e, o;
      widen16(w + i * K + k, e, o);
      for (int j = 0; j < RX; ++j) acc[i][j] = _mm256_fmadd_ps(xo[j], o, _mm256_fmadd_ps(xe[j], e, acc[i][j]));
    }
  }
  if (k < K)   // a last run of 8, in natural order
    for (int i = 0; i < RW; ++i) {
      const __m256 w0 = widen8(w + i * K + k);
      for (int j = 0; j < RX; ++j) acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + j * K + k), w0, acc[i][j]);
    }
  for (int i = 0; i < RW; ++i)
    for (int j = 0; j < RX; ++j) y[j * ldy + i] = hsum(acc[i][j]);
}

// y[m, n] (row stride ldy) = x[M, K] . w[n, K] for n in [n0, n1): x fp32 in split_pairs order, w bf16,
// K % 8 == 0, serial. Up to 8 input rows: each weight row is read from memory once and multiplied into
// every input row while it sits in L1 (decode is bound by reading the weights). More rows: tiles, the first
// pass over each 4 weight rows fetching the next 4 (the tiles are bound by arithmetic, so without it the
// memory bus idles while they run: batch 16's shared experts went from 23 to 20 ms of thread time a step).
static void rows_times_bf16_serial(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                                   float* y, int64_t ldy) {
  int64_t n = n0;
  if (M > 8)
    for (; n + 4 <= n1; n += 4) {
      int64_t m = 0;
      const char* next = n + 8 <= n1 ? reinterpret_cast<const char*>(w + (n + 4) * K) : nullptr;
      const char* far = n + 12 <= n1 ? reinterpret_cast<const char*>(w + (n + 8) * K) : nullptr;
      for (; m + 2 <= M; m += 2)
        tile<4, 2>(x + m * K, K, w + n * K, y + m * ldy + n, ldy, m == 0 ? next : nullptr, m == 0 ? far : nullptr);
      if (m < M) tile<4, 1>(x + m * K, K, w + n * K, y + m * ldy + n, ldy);
    }
  for (; n < n1; ++n) {
    const uint16_t* row = w + n * K;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dot_rows<4>(x + m * K, K, row, y + m * ldy + n, ldy);
    if (M - m == 3) dot_rows<3>(x + m * K, K, row, y + m * ldy + n, ldy);
    else if (M - m == 2) dot_rows<2>(x + m * K, K, row, y + m * ldy + n, ldy);
    else if (M - m == 1) dot_rows<1>(x + m * K, K, row, y + m * ldy + n, ldy);
  }
}

// y[M, N] = x[M, K] @ w[N, K]^T in fp32, split over threads by output rows. A thread gets at least
// ~512 kB of weights: smaller matrices run on one thread (a parallel region costs more than they do).
static torch::Tensor rows_times_bf16(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  auto xs = torch::empty_like(x);
  split_pairs(x.data_ptr<float>(), M, K, xs.data_ptr<float>());
  const float* xp = xs.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(32, 262144 / K), [&](int64_t n0, int64_t n1) {
    rows_times_bf16_serial(xp, M, K, wp, n0, n1, yp, N);
  });
  return y;
}

// F.linear(x, w) for x [..., K] (bf16 or fp32) and w [N, K] (bf16), accumulated in fp32; -> [..., N]
// in x's dtype. Up to max_rows rows run the kernel above; more rows widen w once for torch's fp32 matmul.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w, int64_t max_rows) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() == 2 && x.size(-1) == w.size(1), "w must be bf16 [N, K]");
  const int64_t K = w.size(1), N = w.size(0);
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto x2 = x.reshape({-1, K}).to(torch::kFloat).contiguous();
  torch::Tensor y;
  if (x2.size(0) <= max_rows && K % 8 == 0)
    y = rows_times_bf16(x2, w.contiguous());
  else
    y = at::linear(x2, w.to(torch::kFloat));
  return y.to(x.scalar_type()).view(shape);
}

// The routed experts of an MoE layer in one call, same maths as moe.grouped_experts: x [N, D], idx [N, k]
// (int64), w [N, k] (fp32), gate_up [E, 2I, D] and down [E, D, I] (bf16) -> sum_j w[n, j] * expert_idx[n, j](x[n])
// [N, D] in x's dtype. Tokens are grouped by expert so each expert's weights are read once; the
// intermediate activations and the sum stay in fp32.
torch::Tensor experts_bf16(const torch::Tensor& x, const torch::Tensor& idx, const torch::Tensor& w,
                           const torch::Tensor& gate_up, const torch::Tensor& down) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16 && down.scalar_type() == torch::kBFloat16, "bf16 experts");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "contiguous experts");
  const int64_t N = x.size(0), D = x.size(1), k = idx.size(1), E = gate_up.size(0), I = down.size(2);
  TORCH_CHECK(D % 8 == 0 && I % 8 == 0, "dims must be multiples of 8");
  auto xf = x.to(torch::kFloat).contiguous();
  auto idx_c = idx.to(torch::kLong).contiguous();
  auto w_c = w.to(torch::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  const float* wp = w_c.data_ptr<float>();
  const uint16_t* gup = reinterpret_cast<const uint16_t*>(gate_up.data_ptr());
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(down.data_ptr());
  std::vector<std::vector<int64_t>> pairs(E);   // per expert: the (token * k + j) routed to it, in order
  for (int64_t p = 0; p < N * k; ++p) pairs[ip[p]].push_back(p);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) if (!pairs[e].empty()) active.push_back(e);
  // one parallel region per layer: each thread runs whole experts and sums into its own output
  const int64_t threads = at::get_num_threads();
  auto partial = torch::zeros({threads, N, D}, xf.options());
  at::parallel_for(0, (int64_t)active.size(), 1, [&](int64_t a0, int64_t a1) {
    float* yp = partial.data_ptr<float>() + at::get_thread_num() * N * D;
    AlignedVector<float> xs, h, act, o;
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t e = active[a];
      const auto& ps = pairs[e];
      const int64_t M = ps.size();
      xs.resize(M * D); h.resize(M * 2 * I); act.resize(2 * M * I); o.resize(M * D);
      for (int64_t m = 0; m < M; ++m) std::memcpy(&o[m * D], xp + (ps[m] / k) * D, D * sizeof(float));
      split_pairs(o.data(), M, D, xs.data());
      rows_times_bf16_serial(xs.data(), M, D, gup + e * 2 * I * D, 0, 2 * I, h.data(), 2 * I);   // gate | up
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < I; ++i) {
          const float g = h[m * 2 * I + i];
          act[m * I + i] = g / (1.0f + std::exp(-g)) * h[m * 2 * I + I + i];
        }
      split_pairs(act.data(), M, I, act.data() + M * I);
      rows_times_bf16_serial(act.data() + M * I, M, I, dp + e * D * I, 0, D, o.data(), D);
      for (int64_t m = 0; m < M; ++m) {
        const float wt = wp[ps[m]];
        float* yrow = yp + (ps[m] / k) * D;
        for (int64_t d = 0; d < D; ++d) yrow[d] += wt * o[m * D + d];
      }
    }
  });
  return partial.sum(0).to(x.scalar_type());
}
"""


def _cpu_supports_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def build_kernel(name: str, source: str, functions: list[str], what: str, fallback: str,
                 openmp: bool = False):
    """Compile (once, cached by torch's extension loader) an AVX2 C++ kernel, or None when this CPU lacks
    AVX2/FMA or nothing can compile it: callers then keep `fallback` (named in the warning)."""
    if not _cpu_supports_avx2():
        return None
    from torch.utils.cpp_extension import load_inline

    print(f"nanok2: loading the {what} CPU kernel (built once, then cached)...", file=sys.stderr, flush=True)
    omp = ["-fopenmp"] if openmp else []
    try:
        return load_inline(name, cpp_sources=source, functions=functions,
                           extra_cflags=["-O3", "-mavx2", "-mfma", *omp], extra_ldflags=omp)
    except Exception as e:   # no compiler, no headers: slower, not broken
        warnings.warn(f"nanok2: the {what} CPU kernel could not be built ({e}); using {fallback}")
        return None


@functools.cache
def kernel():
    """The compiled bf16 extension, or None (no AVX2/FMA, no compiler): callers then keep torch's path."""
    return build_kernel("nanok2_bf16_linear", _SOURCE, ["linear_bf16", "experts_bf16"], "bf16",
                        "torch's bf16 matmul", openmp=True)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for x [..., K] and a bf16 weight [N, K], accumulated in fp32; -> [..., N] in x's dtype."""
    y = kernel().linear_bf16(x, weight, MAX_KERNEL_ROWS)
    return y if bias is None else y + bias


def _use(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class KernelLinear(nn.Linear):
    """nn.Linear whose bf16 inference forward runs `linear_bf16`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use(x, self.weight):
            return linear_bf16(x, self.weight, self.bias)
        return super().forward(x)


class KernelExperts(Experts):
    """Experts whose bf16 inference runs in one kernel call per layer (`experts_bf16`) when decoding: tokens
    grouped by expert as in moe.grouped_experts, without a Python step (or a parallel region) per expert."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # many tokens (prefill): expert by expert, each on its rows through `expert` below
        if not _use(x, self.gate_up_proj) or x.shape[0] > MAX_KERNEL_ROWS:
            return super().forward(x, idx, w)
        return kernel().experts_bf16(x, idx, w, self.gate_up_proj, self.down_proj)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not _use(x, self.gate_up_proj):
            return super().expert(e, x)
        gate, up = linear_bf16(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return linear_bf16(F.silu(gate) * up, self.down_proj[e])


def use_bf16_kernel(model: nn.Module) -> int:
    """Swap the class of every plain nn.Linear and Experts module of a bf16 model (in place); -> how many.

    Modules of other classes (quantized experts, for one) are left alone. Returns 0 when the kernel is
    not available here or the model is not bf16."""
    if not any(p.dtype == torch.bfloat16 for p in model.parameters()) or kernel() is None:
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = KernelLinear
            swapped += 1
        elif type(module) is Experts:
            module.__class__ = KernelExperts
            swapped += 1
    return swapped
