"""INT4 weights at run time: `Int4Linear` and `Int4Experts`, on CPU int4 kernels or the dequantized reference.

Each quantized weight is held in the checkpoint form, compressed-tensors' `pack-quantized`
(`weight_packed` int32 [out, in/8], `weight_scale` bf16 [out, in/g], `weight_shape` int64 [2]), which is the
module's state dict, so `save_model` writes K2-Thinking's tensor names unchanged. Three ways to multiply:

- "gemv" (decode, up to 16 rows): nanok2's AVX2 kernel below reads that form directly, in the style of
  llama.cpp's Q4_0 x Q8_0 dot product: the activations are rounded to int8 in blocks of 32 with one fp32
  scale each (error ≤ max|x_block| / 254 per element; ~0.5% RMS on a dot product of random data, where
  the INT4 weights themselves are off by ~10%), the nibbles (q + 8, unsigned) multiply them with
  `maddubs`, the +8 is taken off with precomputed block sums, and each block is scaled by weight scale ×
  activation scale in fp32. At batch 1 a decode step is bound by the bytes it reads; this reads 0.56 bytes
  per weight instead of bf16's 2, and its arithmetic is light enough to stream them near memory speed
  (measured on a 2-core AVX2 EPYC: ~14 GB/s from DRAM on one thread, ~21 GB/s on two, ~2x and ~3x the
  int16-activation kernel it replaced). It splits output rows over torch's threads (OpenMP).
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

from nanok2.cpu_kernels import ALIGNED_VECTOR_SOURCE, build_kernel
from nanok2.quant import dequantize, pack_int4, quantize_groupwise, unpack_int4

MAX_GEMV_ROWS = 16     # more rows (prefill): torch's int4 kernel
MAX_FUSED_TOKENS = 4   # up to this many tokens, a whole MoE layer's experts run in one int4_moe call
KERNEL_MODES = ("auto", "gemv", "torch", "reference")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
""" + ALIGNED_VECTOR_SOURCE + r"""

// ============================================================================================== core
// Static free functions, before any torch::Tensor function: another extension concatenates this source and
// calls int4_quantize_rows / int4_gemv_rows directly, so every helper is named int4_* (no clash with, e.g.,
// cpu_kernels.py's hsum or dot_rows) and nothing here threads (callers split over output rows n).
//
// Weights: a "chunk" is 64 consecutive weights of a row (blocks 2j and 2j+1 of 32), 32 packed bytes: bytes
// 0-15 hold the first block (byte i: element 2i in the low nibble, 2i+1 in the high one, stored n = q + 8),
// bytes 16-31 the second. One 32-byte load, masked and shifted, gives
//   lo = low nibbles  = [first block's even elements (16) | second block's even elements (16)]  (bytes 0..15)
//   hi = high nibbles = [first block's odd elements  (16) | second block's odd elements  (16)]
// Activations: int8 in blocks of 32 with one fp32 scale each, stored per chunk in that same order (even of
// the first block, even of the second, odd of the first, odd of the second: 64 bytes), so
// maddubs(lo, x[0:32]) + maddubs(hi, x[32:64]) gives 16 int16 lanes, 4 products each, whose 128-bit halves
// belong to the two blocks. No saturation: |n x| <= 15 * 127 = 1905, so a lane holds up to 17 products.
//
// The main loop takes 8 blocks ("octet": 4 chunks, 256 weights, 128 bytes) at a time. Per input row it folds
// the 4 chunks' int16 lanes (two shuffle-and-add steps: 16 products per lane) and widens them with
// madd(ones) to 8 int32 lanes = the 8 block dot products, in the order [b0 b2 b4 b6 | b1 b3 b5 b7]; then one
// int32 subtract (nibble offset), one conversion and one fmadd with (weight scales x activation scales) per
// 256 weights, instead of per block.
//
// Nibble offset: sum_i q_i x_i = sum_i n_i x_i - 8 * sum_i x_i, and 8 * (block sum of the int8
// activations) is precomputed per block (no sign tricks in the loop).
// Rows whose block count is not a multiple of 8 end with up to 3 chunks done one at a time (lanes 0-3: first
// block, 4-7: second) and, for an odd count, a lone block stored [even (16) | odd (16)] (one 16-byte load).

// Activations of M rows quantized for int4_gemv_rows (K a multiple of 32). Per row: B = K / 32 blocks, in
// B / 8 octets, then (B % 8) / 2 chunks, then B % 2 lone blocks: NV = B / 8 + (B % 8) / 2 + B % 2 vectors.
struct QuantRows {
  AlignedVector<int8_t> q;   // [M, K]   round(x / s_b), |q| <= 127, reordered per chunk as described above
  AlignedVector<float> s;    // [M, B]   block scales s_b = max|x_block| / 127
  // per row, NV vectors of 8 lanes matching the int32 lanes of the loop: an octet's block order
  // [b0 b2 b4 b6 b1 b3 b5 b7], a chunk's [b b b b b' b' b' b'], a lone block's [b x 8]
  AlignedVector<float> sv;   // [M, NV, 8] the lane's block scale
  AlignedVector<int32_t> c;  // [M, NV, 8] the offset correction 8 * S_b, once per block (other lanes 0)
  int64_t M = 0, K = 0, NV = 0;
};

#define INT4_INLINE inline __attribute__((always_inline))   // keeps the accumulators in registers

static INT4_INLINE float int4_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// bf16 -> fp32 is a 16-bit shift (F16C converts fp16, not bf16)
static INT4_INLINE uint32_t int4_bf16_bits(uint16_t b) { return uint32_t(b) << 16; }
static INT4_INLINE __m256 int4_bf16_bcast(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_set1_epi32(int(int4_bf16_bits(*p))));
}

// Quantize x [M, K] (fp32, K % 32 == 0) to int8 in blocks of 32 with one fp32 scale per block.
// Rounding error per element <= s_b / 2 = max|x_block| / 254.
static void int4_quantize_rows(const float* x, int64_t M, int64_t K, QuantRows& out) {
  TORCH_CHECK(K % 32 == 0, "int4_quantize_rows: K must be a multiple of 32");
  const int64_t B = K / 32, NO = B / 8, NC = (B % 8) / 2, NV = NO + NC + B % 2;
  out.M = M; out.K = K; out.NV = NV;
  out.q.resize(M * K); out.s.resize(M * B); out.sv.assign(M * NV * 8, 0.f); out.c.assign(M * NV * 8, 0);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const float* v = x + m * K + 32 * b;
      const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
                   v3 = _mm256_loadu_ps(v + 24);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      // blocks of (near) zeros quantize to 0 (1e-30: keeps 127 / amax finite); inf blocks give q = 0 with an
      // infinite scale, so the output is not finite either
      const float s = amax / 127.f, inv = (amax >= 1e-30f && amax <= 3.4e38f) ? 127.f / amax : 0.f;
      const __m256 vi = _mm256_set1_ps(inv);
      // split even / odd elements: shuffle_ps picks [0,2,8,10 | 4,6,12,14], the 64-bit permute fixes the order
      auto evens = [](__m256 a, __m256 b) {
        return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
      };
      auto odds = [](__m256 a, __m256 b) {
        return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
      };
      // round to nearest (even), as nearbyint: elements 0-14 even, 16-30 even, 1-15 odd, 17-31 odd
      const __m256i e0 = _mm256_cvtps_epi32(_mm256_mul_ps(evens(v0, v1), vi));
      const __m256i e1 = _mm256_cvtps_epi32(_mm256_mul_ps(evens(v2, v3), vi));
      const __m256i o0 = _mm256_cvtps_epi32(_mm256_mul_ps(odds(v0, v1), vi));
      const __m256i o1 = _mm256_cvtps_epi32(_mm256_mul_ps(odds(v2, v3), vi));
      // int32 -> int8 (packs work per 128-bit lane; the dword permute puts the 32 bytes back in order):
      // p = [16 even elements | 16 odd elements]
      const __m256i p = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(e0, e1), _mm256_packs_epi32(o0, o1)), order);
      // block sum of the int8 values, for the nibble offset
      const __m256i t = _mm256_add_epi32(_mm256_add_epi32(e0, e1), _mm256_add_epi32(o0, o1));
      __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
      t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
      const int32_t S = _mm_cvtsi128_si32(t4);
      // where the block goes: chunk b / 2, half b % 2 (a lone last block keeps [even | odd]) ...
      const bool lone = b == B - 1 && B % 2 == 1;
      const int64_t half = b % 2;
      int8_t* o = out.q.data() + m * K + 64 * (b / 2);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16 * half), _mm256_castsi256_si128(p));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + (lone ? 16 : 32 + 16 * half)), _mm256_extracti128_si256(p, 1));
      out.s[m * B + b] = s;
      // ... and which lanes of which vector carry its scale and offset
      float* sv = out.sv.data() + m * NV * 8;
      int32_t* c = out.c.data() + m * NV * 8;
      if (b < 8 * NO) {                    // octet b / 8, lane (b % 2) * 4 + (b % 8) / 2
        const int64_t i = (b / 8) * 8 + half * 4 + (b % 8) / 2;
        sv[i] = s;
        c[i] = 8 * S;
      } else {                             // a chunk's or the lone block's vector: lanes 4 * half onwards
        const int64_t i = (NO + (b - 8 * NO) / 2) * 8 + 4 * half;
        for (int l = 0; l < (lone ? 8 : 4); ++l) sv[i + l] = s;
        c[i] = 8 * S;
      }
    }
}

// The weight scales of octet o as 8 fp32 lanes, in the loop's block order [b0 b2 b4 b6 | b1 b3 b5 b7].
// MODE 0: gs == 32 (8 consecutive bf16: one 16-byte load, even ones to the low half, odd ones to the high);
// 1: gs == 64 (4 bf16: groups [0 1 2 3 | 0 1 2 3]); 2: gs == 128 (2 bf16: [0 0 1 1 | 0 0 1 1]);
// 3: gs = 256 << sh (one scale for the octet); 4: any other multiple of 32 (scalar, slow, rare).
template <int MODE>
static INT4_INLINE __m256 int4_octet_scale(const uint16_t* s, int64_t o, int64_t gs, int sh) {
  const __m256i top = _mm256_set1_epi32(int(0xFFFF0000u));
  if (MODE == 0) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 8 * o)));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_sllv_epi32(v, _mm256_setr_epi32(16, 16, 16, 16, 0, 0, 0, 0)), top));
  } else if (MODE == 1) {
    const __m128i v = _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + 4 * o))), 16);
    return _mm256_castsi256_ps(_mm256_broadcastsi128_si256(v));
  } else if (MODE == 2) {
    uint32_t u;
    std::memcpy(&u, s + 2 * o, 4);
    const __m256i v = _mm256_sllv_epi32(_mm256_set1_epi32(int(u)), _mm256_setr_epi32(16, 16, 0, 0, 16, 16, 0, 0));
    return _mm256_castsi256_ps(_mm256_and_si256(v, top));
  } else if (MODE == 3) {
    return int4_bf16_bcast(s + (o >> sh));
  } else {
    alignas(32) uint32_t v[8];
    for (int l = 0; l < 8; ++l) v[l] = int4_bf16_bits(s[(8 * o + (l % 4) * 2 + l / 4) * 32 / gs]);
    return _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(v)));
  }
}

// acc[r] += (int32 lanes minus the offset correction c) * weight scales sw * block scales sv
template <int R>
static INT4_INLINE void int4_scale_add(int r, __m256i d32, const int32_t* c, const float* sv, __m256 sw,
                                       __m256 (&acc)[R]) {
  d32 = _mm256_sub_epi32(d32, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
  acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d32), _mm256_mul_ps(sw, _mm256_loadu_ps(sv)), acc[r]);
}

// one chunk: its low / high nibbles (lo, hi) against its 64 activations at xr -> 16 int16 lanes, 4 products each
static INT4_INLINE __m256i int4_chunk_dot(__m256i lo, __m256i hi, const int8_t* xr) {
  return _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
                          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32))));
}

// the 32 bytes of a chunk at w -> low nibbles, high nibbles (0..15 as unsigned bytes)
static INT4_INLINE void int4_nibbles(const uint8_t* w, __m256i& lo, __m256i& hi) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  lo = _mm256_and_si256(b, low4);
  hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
}

// two chunks' int16 lanes [b b' ...] and [b2 b3 ...] -> [b x4, b2 x4 | b' x4, b3 x4] (8 products per lane)
static INT4_INLINE __m256i int4_fold(__m256i d0, __m256i d1) {
  return _mm256_add_epi16(_mm256_unpacklo_epi64(d0, d1), _mm256_unpackhi_epi64(d0, d1));
}

// A tile: rows m0 .. m0+R-1 of x times weight rows 0 .. NR-1 (K/2 packed bytes each from w, row stride K/2;
// bf16 scales from s, row stride K/gs) -> y[r * ldy + i]. Several weight rows at once (NR > 1, for R = 1)
// overlap their dependency chains and share the loop and the final horizontal sums.
template <int R, int NR, int MODE>
static INT4_INLINE void int4_tile(const QuantRows& x, int64_t m0, const uint8_t* w, const uint16_t* s,
                                  int64_t gs, int sh, float* y, int64_t ldy) {
  const int64_t K = x.K, B = K / 32, NO = B / 8, ST = x.NV * 8;   // ST: row stride of sv and c
  const int8_t* q = x.q.data() + m0 * K;
  const float* sv = x.sv.data() + m0 * ST;
  const int32_t* c = x.c.data() + m0 * ST;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R * NR];                      // acc[r * NR + i]: 8 partial sums of x row r . weight row i
  for (int a = 0; a < R * NR; ++a) acc[a] = _mm256_setzero_ps();
  for (int64_t o = 0; o < NO; ++o)         // octets: chunks 4o .. 4o+3
    for (int i = 0; i < NR; ++i) {
      const uint8_t* wo = w + i * (K / 2) + 128 * o;
      if (R == 1) {                        // one input row: little arithmetic per byte, so ask for the weights
        _mm_prefetch(reinterpret_cast<const char*>(wo) + 1024, _MM_HINT_T0);   // 1 kB ahead (measured: a few
        _mm_prefetch(reinterpret_cast<const char*>(wo) + 1024 + 64, _MM_HINT_T0);   // % to 20% from DRAM)
      }
      const __m256 sw = int4_octet_scale<MODE>(s + i * (K / gs), o, gs, sh);
      __m256i lo0, hi0, lo1, hi1, f01[R];
      int4_nibbles(wo, lo0, hi0);
      int4_nibbles(wo + 32, lo1, hi1);
      for (int r = 0; r < R; ++r) {        // chunks 0, 1 -> [b0 x4, b2 x4 | b1 x4, b3 x4]
        const int8_t* xr = q + r * K + 256 * o;
        f01[r] = int4_fold(int4_chunk_dot(lo0, hi0, xr), int4_chunk_dot(lo1, hi1, xr + 64));
      }
      int4_nibbles(wo + 64, lo0, hi0);
      int4_nibbles(wo + 96, lo1, hi1);
      for (int r = 0; r < R; ++r) {        // chunks 2, 3 -> [b4 x4, b6 x4 | b5 x4, b7 x4], then one lane per block
        const int8_t* xr = q + r * K + 256 * o + 128;
        const __m256 a = _mm256_castsi256_ps(f01[r]);
        const __m256 e = _mm256_castsi256_ps(int4_fold(int4_chunk_dot(lo0, hi0, xr), int4_chunk_dot(lo1, hi1, xr + 64)));
        const __m256i f = _mm256_add_epi16(_mm256_castps_si256(_mm256_shuffle_ps(a, e, 0x88)),   // 16 products per lane
                                           _mm256_castps_si256(_mm256_shuffle_ps(a, e, 0xDD)));
        int4_scale_add<R * NR>(r * NR + i, _mm256_madd_epi16(f, ones), c + r * ST + 8 * o, sv + r * ST + 8 * o, sw, acc);
      }
    }
  // the rest (K not a multiple of 256): chunks one at a time, then maybe a lone block; scales by division
  for (int i = 0; i < NR; ++i) {
    const uint8_t* wi = w + i * (K / 2);
    const uint16_t* si = s + i * (K / gs);
    for (int64_t j = 4 * NO, v = NO; j < B / 2; ++j, ++v) {
      __m256i lo, hi;
      int4_nibbles(wi + 32 * j, lo, hi);
      const __m256 sw = _mm256_blend_ps(int4_bf16_bcast(si + 64 * j / gs), int4_bf16_bcast(si + (64 * j + 32) / gs), 0xF0);
      for (int r = 0; r < R; ++r)
        int4_scale_add<R * NR>(r * NR + i, _mm256_madd_epi16(int4_chunk_dot(lo, hi, q + r * K + 64 * j), ones),
                               c + r * ST + 8 * v, sv + r * ST + 8 * v, sw, acc);
    }
    if (B % 2) {                           // lone last block: [low nibbles | high nibbles] of its 16 bytes
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wi + 16 * (B - 1))), m = _mm_set1_epi8(0x0F);
      const __m256i n = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
      const __m256 sw = int4_bf16_bcast(si + (K - 32) / gs);
      for (int r = 0; r < R; ++r) {
        const __m256i d = _mm256_maddubs_epi16(n, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + K - 32)));
        int4_scale_add<R * NR>(r * NR + i, _mm256_madd_epi16(d, ones), c + r * ST + ST - 8, sv + r * ST + ST - 8, sw, acc);
      }
    }
  }
  for (int a = 0; a < R * NR; ++a) y[(a / NR) * ldy + a % NR] = int4_hsum(acc[a]);
}

// y[m * ldy + n] for m in [m0, m1), n in [n0, n1) (serial). Tiles of input rows x weight rows: 1 x 2 (one
// input row), 2 x 2 (two or three), 4 x 1 (more); each weight row is read from memory once, then from L1.
// One input row takes 2 weight rows at a time, not 4: on the bench preset's INT4 step that was 5-9% faster
// (timed in one process, alternating), and 5-20% from DRAM alone: the 4 interleaved rows streamed worse.
template <int MODE>
static void int4_gemv_impl(const QuantRows& x, int64_t m0, int64_t m1, const uint8_t* w, const uint16_t* s,
                           int64_t gs, int sh, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t M = m1 - m0, K = x.K;
  auto wr = [&](int64_t n) { return w + n * (K / 2); };
  auto sr = [&](int64_t n) { return s + n * (K / gs); };
  int64_t n = n0;
  if (M == 1) {
    for (; n + 2 <= n1; n += 2) int4_tile<1, 2, MODE>(x, m0, wr(n), sr(n), gs, sh, y + m0 * ldy + n, ldy);
  } else if (M <= 3) {
    for (; n + 2 <= n1; n += 2) {
      int4_tile<2, 2, MODE>(x, m0, wr(n), sr(n), gs, sh, y + m0 * ldy + n, ldy);
      if (M == 3) int4_tile<1, 2, MODE>(x, m0 + 2, wr(n), sr(n), gs, sh, y + (m0 + 2) * ldy + n, ldy);
    }
  }
  for (; n < n1; ++n) {                    // the other weight rows one at a time
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) int4_tile<4, 1, MODE>(x, m, wr(n), sr(n), gs, sh, y + m * ldy + n, ldy);
    for (; m + 2 <= m1; m += 2) int4_tile<2, 1, MODE>(x, m, wr(n), sr(n), gs, sh, y + m * ldy + n, ldy);
    for (; m < m1; ++m) int4_tile<1, 1, MODE>(x, m, wr(n), sr(n), gs, sh, y + m * ldy + n, ldy);
  }
}

// rows [m0, m1) of x only (int4_moe: each (token, expert) pair uses its own row)
static void int4_gemv_row_range(const QuantRows& x, int64_t m0, int64_t m1, const uint8_t* w, const uint16_t* s,
                                int64_t gs, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (gs) {
    case 32: return int4_gemv_impl<0>(x, m0, m1, w, s, gs, 0, y, ldy, n0, n1);
    case 64: return int4_gemv_impl<1>(x, m0, m1, w, s, gs, 0, y, ldy, n0, n1);
    case 128: return int4_gemv_impl<2>(x, m0, m1, w, s, gs, 0, y, ldy, n0, n1);
  }
  int sh = 0;
  while ((int64_t(256) << sh) < gs) ++sh;
  if ((int64_t(256) << sh) == gs) return int4_gemv_impl<3>(x, m0, m1, w, s, gs, sh, y, ldy, n0, n1);
  int4_gemv_impl<4>(x, m0, m1, w, s, gs, 0, y, ldy, n0, n1);
}

// y[m * ldy + n] for m in [0, M), n in [n0, n1): the rows of x times weight rows n (packed bytes w, row stride
// K/2; bf16 scales s, row stride K/gs; gs a multiple of 32 dividing K). Serial: callers parallelize over n.
static void int4_gemv_rows(const QuantRows& x, const uint8_t* w, const uint16_t* s, int64_t gs, float* y,
                           int64_t ldy, int64_t n0, int64_t n1) {
  int4_gemv_row_range(x, 0, x.M, w, s, gs, y, ldy, n0, n1);
}

// ============================================================================================== torch entry points

static void int4_check(const torch::Tensor& w, const torch::Tensor& s, int64_t K, int64_t gs) {
  TORCH_CHECK(w.scalar_type() == torch::kInt && s.scalar_type() == torch::kBFloat16, "int32 weights, bf16 scales");
  TORCH_CHECK(w.is_contiguous() && s.is_contiguous() && w.dim() == 2 && w.size(1) * 8 == K, "packed shape");
  TORCH_CHECK(gs % 32 == 0 && K % gs == 0 && s.size(0) == w.size(0) && s.size(1) == K / gs, "group size");
}

#define INT4_BYTES(t) reinterpret_cast<const uint8_t*>((t).data_ptr())
#define INT4_HALFS(t) reinterpret_cast<const uint16_t*>((t).data_ptr())

// Rows per thread: at least ~64k weights (36 kB) each, or a parallel region costs more than it saves.
static inline int64_t int4_grain(int64_t K) { return std::max<int64_t>(16, 65536 / K); }

static inline float int4_silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

// x [M, K] fp32 -> [M, N] fp32
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t gs) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  int4_check(w, s, K, gs);
  QuantRows xq;
  int4_quantize_rows(x.data_ptr<float>(), M, K, xq);
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, int4_grain(K), [&](int64_t n0, int64_t n1) {
    int4_gemv_rows(xq, INT4_BYTES(w), INT4_HALFS(s), gs, yp, N, n0, n1);
  });
  return y;
}

// one SwiGLU expert, down(silu(gate x) * up x): x [M, D] fp32 -> [M, D] fp32, in one call
torch::Tensor int4_expert(torch::Tensor x, torch::Tensor gw, torch::Tensor gsc, torch::Tensor uw, torch::Tensor usc,
                          torch::Tensor dw, torch::Tensor dsc, int64_t gs) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [M, D]");
  const int64_t M = x.size(0), D = x.size(1), I = gw.size(0);
  int4_check(gw, gsc, D, gs); int4_check(uw, usc, D, gs); int4_check(dw, dsc, I, gs);
  TORCH_CHECK(uw.size(0) == I && dw.size(0) == D, "expert shapes");
  QuantRows xq, hq;
  int4_quantize_rows(x.data_ptr<float>(), M, D, xq);
  std::vector<float> g(M * I), u(M * I);
  at::parallel_for(0, I, int4_grain(D), [&](int64_t n0, int64_t n1) {
    int4_gemv_rows(xq, INT4_BYTES(gw), INT4_HALFS(gsc), gs, g.data(), I, n0, n1);
    int4_gemv_rows(xq, INT4_BYTES(uw), INT4_HALFS(usc), gs, u.data(), I, n0, n1);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) g[m * I + n] = int4_silu_mul(g[m * I + n], u[m * I + n]);
  });
  int4_quantize_rows(g.data(), M, I, hq);
  auto y = torch::empty({M, D}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, D, int4_grain(I), [&](int64_t n0, int64_t n1) {
    int4_gemv_rows(hq, INT4_BYTES(dw), INT4_HALFS(dsc), gs, yp, D, n0, n1);
  });
  return y;
}

// The routed experts of one MoE layer for a few tokens in one call (two parallel regions instead of two per
// expert): y[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]). x [N, D] fp32, idx [N, k] int64, w [N, k] fp32,
// the experts' packed weights and scales as lists indexed by expert. Work is split over (pair, output row),
// pair p = t * k + j, so one token's 8 experts keep both threads busy.
torch::Tensor int4_moe(torch::Tensor x, torch::Tensor idx, torch::Tensor w, std::vector<torch::Tensor> gw,
                       std::vector<torch::Tensor> gsc, std::vector<torch::Tensor> uw, std::vector<torch::Tensor> usc,
                       std::vector<torch::Tensor> dw, std::vector<torch::Tensor> dsc, int64_t gs) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [N, D]");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && w.scalar_type() == torch::kFloat && idx.is_contiguous() &&
              w.is_contiguous() && idx.sizes() == w.sizes() && idx.size(0) == x.size(0), "idx, w: [N, k]");
  const int64_t N = x.size(0), D = x.size(1), k = idx.size(1), P = N * k, E = int64_t(gw.size());
  const int64_t I = gw[0].size(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<const uint8_t*> G(P), U(P), Dn(P);
  std::vector<const uint16_t*> GS(P), US(P), DS(P);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = ip[p];
    TORCH_CHECK(0 <= e && e < E, "expert index out of range");
    int4_check(gw[e], gsc[e], D, gs); int4_check(uw[e], usc[e], D, gs); int4_check(dw[e], dsc[e], I, gs);
    G[p] = INT4_BYTES(gw[e]); GS[p] = INT4_HALFS(gsc[e]); U[p] = INT4_BYTES(uw[e]); US[p] = INT4_HALFS(usc[e]);
    Dn[p] = INT4_BYTES(dw[e]); DS[p] = INT4_HALFS(dsc[e]);
  }
  QuantRows xq, hq;
  int4_quantize_rows(x.data_ptr<float>(), N, D, xq);
  // h[p] = silu(gate_e x[t]) * up_e x[t], items (p, n) of [P, I] split over threads; a thread's range
  // [a, b) is walked pair by pair (no division per item)
  std::vector<float> h(P * I), u(P * I);
  at::parallel_for(0, P * I, 64, [&](int64_t a, int64_t b) {
    for (int64_t p = a / I; p < P && p * I < b; ++p) {
      const int64_t n0 = std::max(a, p * I) - p * I, n1 = std::min(b, (p + 1) * I) - p * I, t = p / k;
      // x's row t into h[p] (ldy 0: the one row's output starts at the pointer given)
      int4_gemv_row_range(xq, t, t + 1, G[p], GS[p], gs, h.data() + p * I, 0, n0, n1);
      int4_gemv_row_range(xq, t, t + 1, U[p], US[p], gs, u.data() + p * I, 0, n0, n1);
      for (int64_t n = n0; n < n1; ++n) h[p * I + n] = int4_silu_mul(h[p * I + n], u[p * I + n]);
    }
  });
  int4_quantize_rows(h.data(), P, I, hq);
  // yp[p] = down_e h[p], items (p, n) of [P, D]
  std::vector<float> yp(P * D);
  at::parallel_for(0, P * D, 64, [&](int64_t a, int64_t b) {
    for (int64_t p = a / D; p < P && p * D < b; ++p) {
      const int64_t n0 = std::max(a, p * D) - p * D, n1 = std::min(b, (p + 1) * D) - p * D;
      int4_gemv_row_range(hq, p, p + 1, Dn[p], DS[p], gs, yp.data(), D, n0, n1);   // row p -> yp[p * D + n]
    }
  });
  auto y = torch::zeros({N, D}, x.options());
  float* yo = y.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t n = 0; n < D; ++n) yo[(p / k) * D + n] += wp[p] * yp[p * D + n];
  return y;
}
"""


@functools.cache
def gemv_kernel():
    """nanok2's AVX2 int4 kernel (built once with torch's extension loader, cached), or None."""
    return build_kernel("nanok2_int4_gemv", _SOURCE, ["int4_linear", "int4_expert", "int4_moe"], "int4",
                        "torch's int4 kernel", openmp=True)   # OpenMP: without it at::parallel_for runs serially


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
