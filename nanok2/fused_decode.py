"""A fused CPU decode step: one C++ call runs every layer of a batch-decode forward.

At batch 1 a decode step of the `bench` preset reads ≈270 MB of weights, 11 ms at this machine's
≈25 GB/s; the eager path (engine._decode) adds ≈8 ms of Python and small torch ops around its kernels
(≈70 ops per layer: norms, rope, the absorbed attention, routing, residuals). That overhead alone would
cap INT4 at 1.3× bf16, whatever its kernels did. Here the whole step is one call into C++: norms, rope,
the latent cache write, absorbed attention, routing and experts run on fp32 activations with the
weights read in their stored form (fp32, bf16, or INT4 pack-quantized through nanok2.int4_linear's
kernel), in a handful of OpenMP parallel regions per layer.

It is a fast path beside `Engine._decode`, which stays the reference: the tests run both on the same
cache and compare logits and greedy tokens. `FusedDecoder.build(model)` returns None (the engine then
keeps the reference) for what it does not cover: no AVX2/compiler, a device other than the CPU,
dimensions that are not multiples of 8, fp16 weights, a module class it does not know.

Maths, as in model.py / moe.py: RMSNorm in fp32; interleaved rope with the model's cos/sin (YaRN
included); absorbed MLA on the cached latent (scores = (q_nope·W_uk)·c + q_rope·k_rope, out =
W_uv·(softmax·c)); sigmoid routing with the selection bias, optional group limit, renormalised top-k
weights times routed_scaling_factor; SwiGLU experts summed with their weights, plus the shared experts.
Activations stay in fp32 from the embedding to the logits (the eager bf16 path rounds them to bf16
between ops), so on a bf16 model the two agree to bf16 precision, not bit for bit.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from nanok2 import cpu_kernels, int4_linear
from nanok2.model import LATENT_NORM_EPS
from nanok2.moe import MLP, Experts, MoE

_DECODE = r"""
namespace fused {

enum Kind { F32 = 0, BF16 = 1, INT4 = 2 };

// One linear layer in its stored form: y = x @ W^T (+ bias). W is fp32 or bf16 [N, K], or INT4
// pack-quantized (bytes [N, K/2], bf16 scales [N, K/gs]). `row0` offsets into a stacked tensor (an expert).
struct Lin {
  Kind kind = F32;
  int64_t N = 0, K = 0, gs = 0;
  const void* w = nullptr;
  const uint16_t* s = nullptr;
  const float* bias = nullptr;
  bool defined() const { return N > 0; }
};

static Lin make_lin(const torch::Tensor& w, const torch::Tensor& s, const torch::Tensor& bias, int64_t row0 = 0,
                    int64_t rows = -1) {
  Lin L;
  if (!w.defined() || w.numel() == 0) return L;
  TORCH_CHECK(w.is_contiguous(), "weights must be contiguous");
  const int64_t K = w.scalar_type() == torch::kInt ? w.size(-1) * 8 : w.size(-1);
  L.N = rows < 0 ? w.size(-2) : rows;
  L.K = K;
  if (w.scalar_type() == torch::kInt) {
    TORCH_CHECK(s.defined() && s.scalar_type() == torch::kBFloat16 && s.is_contiguous(), "int4 weights need bf16 scales");
    L.kind = INT4;
    L.gs = K / s.size(-1);
    L.w = reinterpret_cast<const uint8_t*>(w.data_ptr()) + row0 * (K / 2);
    L.s = reinterpret_cast<const uint16_t*>(s.data_ptr()) + row0 * (K / L.gs);
  } else if (w.scalar_type() == torch::kBFloat16) {
    L.kind = BF16;
    L.w = reinterpret_cast<const uint16_t*>(w.data_ptr()) + row0 * K;
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kFloat, "weights must be fp32, bf16 or int4");
    L.kind = F32;
    L.w = w.data_ptr<float>() + row0 * K;
  }
  if (bias.defined() && bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == torch::kFloat && bias.is_contiguous(), "bias must be fp32");
    L.bias = bias.data_ptr<float>();
  }
  return L;
}

using bf16k::hsum;
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) { return bf16k::widen8(p); }   // 8 bf16 -> fp32
static inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void store8(uint16_t* p, __m256 v) {   // fp32 -> bf16, round to nearest even
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128((__m128i*)p, packed);
}

// a[n] . b[n], n % 8 == 0, both fp32 or b in the cache's dtype. Four accumulators: with one, each fma waits
// for the last (4 cycles), and the short dots of attention and the router were bound by that chain, not memory.
template <typename T>
static inline float dot(const float* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), load8(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), load8(b + i + 24), acc3);
  }
  for (; i < n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}
// y[n] += a * b[n]
template <typename T>
static inline void axpy(float a, const T* b, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(b + i), _mm256_loadu_ps(y + i)));
}

// fp32 weights: y[m * ldy + n] = x[m] . w[n] for n in [n0, n1)
static void rows_times_f32_serial(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1,
                                  float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * ldy + n] = dot(x + m * K, w + n * K, K);
}

// Activations prepared for one linear's kind, once, before the parallel region: bf16 weights want them
// in the kernel's split_pairs order, INT4 ones quantized.
struct Prepared {
  const float* x = nullptr;
  int64_t M = 0;
  bf16k::AlignedVector<float> split;
  int4k::QuantRows q;
};

static void prepare(const Lin& L, const float* x, int64_t M, Prepared& p) {
  p.x = x;
  p.M = M;
  if (L.kind == BF16) {
    p.split.resize(M * L.K);
    bf16k::split_pairs(x, M, L.K, p.split.data());
    p.x = p.split.data();
  } else if (L.kind == INT4) {
    int4k::int4_quantize_rows(x, M, L.K, p.q);
  }
}

// y[m * ldy + n] for output rows [n0, n1) of one linear, on one thread
static void lin_rows(const Lin& L, const Prepared& p, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (L.kind == BF16)
    bf16k::rows_times_bf16_serial(p.x, p.M, L.K, static_cast<const uint16_t*>(L.w), n0, n1, y, ldy);
  else if (L.kind == F32)
    rows_times_f32_serial(p.x, p.M, L.K, static_cast<const float*>(L.w), n0, n1, y, ldy);
  else
    int4k::int4_gemv_rows(p.q, static_cast<const uint8_t*>(L.w), L.s, L.gs, y, ldy, n0, n1);
  if (L.bias)
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = n0; n < n1; ++n) y[m * ldy + n] += L.bias[n];
}

// Rows per thread: at least 128k weights (64 kB in INT4, 256 kB in bf16), or a parallel region costs more than
// it saves.
static int64_t lin_grain(const Lin& L) { return std::max<int64_t>(16, 131072 / L.K); }

// y[M, N] = x[M, K] @ W^T, split over threads by output rows
static void lin(const Lin& L, const float* x, int64_t M, float* y) {
  Prepared p;
  prepare(L, x, M, p);
  at::parallel_for(0, L.N, lin_grain(L), [&](int64_t n0, int64_t n1) { lin_rows(L, p, y, L.N, n0, n1); });
}

// y1 = x @ W1^T and y2 = x @ W2^T in one parallel region (attention's q_a and kv_a read the same x): their rows
// concatenated, split over threads
static void lin_pair(const Lin& L1, float* y1, const Lin& L2, float* y2, const float* x, int64_t M) {
  Prepared p1, p2;
  prepare(L1, x, M, p1);
  prepare(L2, x, M, p2);
  at::parallel_for(0, L1.N + L2.N, std::min(lin_grain(L1), lin_grain(L2)), [&](int64_t n0, int64_t n1) {
    if (n0 < L1.N) lin_rows(L1, p1, y1, L1.N, n0, std::min(n1, L1.N));
    if (n1 > L1.N) lin_rows(L2, p2, y2, L2.N, std::max(n0, L1.N) - L1.N, n1 - L1.N);
  });
}

// out[m] = x[m] / rms(x[m]) * w, rows of D (out may be x)
static void rms_norm(const float* x, int64_t M, int64_t D, const float* w, float eps, float* out, int64_t ldx,
                     int64_t ldo) {
  for (int64_t m = 0; m < M; ++m) {
    const float* v = x + m * ldx;
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += double(v[d]) * v[d];
    const float inv = 1.f / std::sqrt(float(ss / D) + eps);
    float* o = out + m * ldo;
    for (int64_t d = 0; d < D; ++d) o[d] = v[d] * inv * w[d];
  }
}

// interleaved rope on pairs (v[2i], v[2i+1]) with cos/sin [dr/2]
static inline void rope(float* v, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[2 * i], b = v[2 * i + 1];
    v[2 * i] = a * c[i] - b * s[i];
    v[2 * i + 1] = b * c[i] + a * s[i];
  }
}

static inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// e^x for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r, then 2^n in the
// exponent bits; within 2 ulp of std::exp). At batch 16 a step takes ~600k exponentials for SiLU: with
// std::exp one at a time they cost about as much as a small matrix.
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));   // keeps 2^n a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);            // ln2 = 0.693359375 - 2.12194440e-4
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// s[t] = e^(s[t] - max s) for t < n, 8 at a time; -> their sum (a softmax's denominator). At batch 16 the
// attention's exponentials one at a time with std::exp cost as much as its dot products.
static inline float exp_shifted(float* s, int64_t n) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
    _mm256_storeu_ps(s + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum(sum);
  for (; t < n; ++t) total += (s[t] = std::exp(s[t] - mx));
  return total;
}

// g[i] = silu(g[i]) * u[i] for i < n (a NaN in g stays NaN: it is the numerator)
static inline void silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) g[i] = silu(g[i]) * u[i];
}

struct Layer {
  std::vector<torch::Tensor> tensors; // what the pointers below point into: kept alive with the plan
  const float *in_norm, *post_norm, *q_a_norm = nullptr, *kv_norm;
  torch::Tensor kv_b;                 // [H*(dn+dv), r] fp32 or bf16: per head, dn key rows then dv value rows
  torch::Tensor kv_b_keys_t;          // [H, r, dn]: each head's key rows transposed, for q_lat = W_k^T q_nope
  std::vector<Lin> absorb_q, absorb_out;   // per head: [r, dn] (q_nope -> latent), [dv, r] (latent -> value)
  Lin q_a, q_b, kv_a, o;              // q_a is q_proj when the model has no q_lora_rank (q_b undefined)
  bool moe = false;
  Lin gate, up, down;                 // the dense MLP, or the shared experts of an MoE layer (undefined: none)
  const float *router = nullptr, *router_bias = nullptr;
  std::vector<Lin> e_gate, e_up, e_down;   // the routed experts
};

class Plan {
 public:
  // dims: D, H, dn, dr, dv, r, q_lora_rank (0: none), E, top_k, n_group, topk_group, norm_topk_prob, vocab
  // floats: rms_norm_eps, latent_norm_eps, softmax_scale, routed_scaling_factor, rope attention factor
  // layers[i]: the tensors in the order nanok2/fused_decode.py's _layer_tensors writes them
  // final_: final norm weight, lm_head (weight, scale, bias)
  // first: the token embeddings [V, D] (fp32 or bf16), rope's inverse frequencies [dr/2] fp32
  Plan(std::vector<int64_t> dims, std::vector<double> floats, std::vector<std::vector<torch::Tensor>> layers,
       std::vector<torch::Tensor> final_, std::vector<torch::Tensor> first) {
    D = dims[0]; H = dims[1]; dn = dims[2]; dr = dims[3]; dv = dims[4]; r = dims[5]; qr = dims[6]; E = dims[7];
    top_k = dims[8]; n_group = dims[9]; topk_group = dims[10]; norm_topk = dims[11] != 0; V = dims[12];
    eps = float(floats[0]); latent_eps = float(floats[1]); scale = float(floats[2]); routed_scaling = float(floats[3]);
    rope_factor = float(floats[4]);
    embed = first[0];
    inv_freq = first[1];
    TORCH_CHECK(embed.dim() == 2 && embed.size(0) == V && embed.size(1) == D && embed.is_contiguous() &&
                (embed.scalar_type() == torch::kFloat || embed.scalar_type() == torch::kBFloat16),
                "embeddings must be fp32 or bf16 [vocab_size, hidden_size]");
    TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat && inv_freq.numel() == dr / 2, "inv_freq: fp32 [dr/2]");
    for (auto& t : layers) {
      Layer L;
      L.tensors = t;
      L.in_norm = t[0].data_ptr<float>();
      L.post_norm = t[1].data_ptr<float>();
      if (t[2].numel()) L.q_a_norm = t[2].data_ptr<float>();
      L.kv_norm = t[3].data_ptr<float>();
      L.kv_b = t[4];
      TORCH_CHECK(L.kv_b.dim() == 2 && L.kv_b.size(0) == H * (dn + dv) && L.kv_b.size(1) == r && L.kv_b.is_contiguous(),
                  "kv_b must be [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]");
      L.kv_b_keys_t = L.kv_b.view({H, dn + dv, r}).narrow(1, 0, dn).transpose(1, 2).contiguous();
      for (int64_t hh = 0; hh < H; ++hh) {
        L.absorb_q.push_back(make_lin(L.kv_b_keys_t, torch::Tensor(), torch::Tensor(), hh * r, r));
        L.absorb_out.push_back(make_lin(L.kv_b, torch::Tensor(), torch::Tensor(), hh * (dn + dv) + dn, dv));
      }
      L.q_a = make_lin(t[5], t[6], t[7]);
      L.q_b = make_lin(t[8], t[9], t[10]);
      L.kv_a = make_lin(t[11], t[12], t[13]);
      L.o = make_lin(t[14], t[15], t[16]);
      L.gate = make_lin(t[17], t[18], t[19]);
      L.up = make_lin(t[20], t[21], t[22]);
      L.down = make_lin(t[23], t[24], t[25]);
      L.moe = t[26].numel() > 0;
      if (L.moe) {
        L.router = t[26].data_ptr<float>();
        L.router_bias = t[27].data_ptr<float>();
        if (t[28].numel()) {            // stacked experts: gate_up [E, 2I, D], down [E, D, I]
          const int64_t I = t[28].size(1) / 2;
          for (int64_t e = 0; e < E; ++e) {
            L.e_gate.push_back(make_lin(t[28], torch::Tensor(), torch::Tensor(), e * 2 * I, I));
            L.e_up.push_back(make_lin(t[28], torch::Tensor(), torch::Tensor(), e * 2 * I + I, I));
            L.e_down.push_back(make_lin(t[29], torch::Tensor(), torch::Tensor(), e * D, D));
          }
        } else {                        // INT4 experts: 9 tensors per expert after index 29
          TORCH_CHECK(int64_t(t.size()) == 30 + 9 * E, "int4 experts: 9 tensors per expert");
          for (int64_t e = 0; e < E; ++e) {
            const int64_t b = 30 + 9 * e;
            L.e_gate.push_back(make_lin(t[b], t[b + 1], t[b + 2]));
            L.e_up.push_back(make_lin(t[b + 3], t[b + 4], t[b + 5]));
            L.e_down.push_back(make_lin(t[b + 6], t[b + 7], t[b + 8]));
          }
        }
      }
      plan.push_back(std::move(L));
    }
    final_tensors = final_;
    final_norm = final_[0].data_ptr<float>();
    lm_head = make_lin(final_[1], final_[2], final_[3]);
    TORCH_CHECK(lm_head.N == V && lm_head.K == D, "lm_head must be [vocab_size, hidden_size]");
  }

  // tokens, pos, slots int64 [B]; the whole cache c_kv [L, S, T, r] and k_rope [L, S, T, dr] (written at
  // [layer, slot_b, pos_b]) -> (logits [B, V] fp32, tokens routed to each expert [L, E] int64, 0 in dense layers).
  // The embedding lookup and rope's cos/sin happen here too: in Python they cost ~10% of an INT4 step.
  std::vector<torch::Tensor> step(torch::Tensor tokens, torch::Tensor pos, torch::Tensor slots, torch::Tensor c_kv,
                                  torch::Tensor k_rope) {
    for (const auto* t : {&tokens, &pos, &slots})
      TORCH_CHECK(t->scalar_type() == torch::kLong && t->dim() == 1 && t->is_contiguous() && t->size(0) == tokens.size(0),
                  "tokens, positions and slots: int64 [B]");
    TORCH_CHECK(c_kv.is_contiguous() && k_rope.is_contiguous() && c_kv.scalar_type() == k_rope.scalar_type(), "cache");
    const int64_t B = tokens.size(0), Lyr = int64_t(plan.size()), half = dr / 2;
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* ps = pos.data_ptr<int64_t>();
    auto h = torch::empty({B, D}, torch::dtype(torch::kFloat));   // the residual stream, fp32
    float* hp = h.data_ptr<float>();
    std::vector<float> cos(B * half), sin(B * half);
    const float* inv = inv_freq.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(0 <= tok[b] && tok[b] < V, "token id ", tok[b], " outside the vocabulary (", V, ")");
      if (embed.scalar_type() == torch::kFloat)
        std::memcpy(hp + b * D, embed.data_ptr<float>() + tok[b] * D, D * sizeof(float));
      else
        for (int64_t d = 0; d < D; d += 8)
          store8(hp + b * D + d, load8(reinterpret_cast<const uint16_t*>(embed.data_ptr()) + tok[b] * D + d));
      for (int64_t i = 0; i < half; ++i) {       // as model.rope_cos_sin: fp32 angle, then times the factor
        const float angle = float(ps[b]) * inv[i];
        cos[b * half + i] = std::cos(angle) * rope_factor;
        sin[b * half + i] = std::sin(angle) * rope_factor;
      }
    }
    std::vector<int64_t> routed(B * top_k);
    auto counts = torch::zeros({Lyr, E}, torch::dtype(torch::kLong));
    const bool bf16_cache = c_kv.scalar_type() == torch::kBFloat16;
    for (int64_t i = 0; i < Lyr; ++i) {
      attention(plan[i], i, hp, B, c_kv, k_rope, bf16_cache, slots.data_ptr<int64_t>(), ps, cos.data(), sin.data());
      mlp(plan[i], hp, B, routed.data());
      if (plan[i].moe)
        for (int64_t p = 0; p < B * top_k; ++p) counts.data_ptr<int64_t>()[i * E + routed[p]] += 1;
    }
    std::vector<float> normed(B * D);
    rms_norm(hp, B, D, final_norm, eps, normed.data(), D, D);
    auto logits = torch::empty({B, lm_head.N}, torch::dtype(torch::kFloat));
    lin(lm_head, normed.data(), B, logits.data_ptr<float>());
    return {logits, counts};
  }

 private:
  int64_t D, H, dn, dr, dv, r, qr, E, top_k, n_group, topk_group, V;
  bool norm_topk;
  float eps, latent_eps, scale, routed_scaling, rope_factor;
  torch::Tensor embed, inv_freq;
  std::vector<Layer> plan;
  std::vector<torch::Tensor> final_tensors;
  const float* final_norm;
  Lin lm_head;

  void attention(const Layer& L, int64_t layer, float* h, int64_t B, torch::Tensor& c_kv, torch::Tensor& k_rope,
                 bool bf16_cache, const int64_t* slots, const int64_t* pos, const float* cos, const float* sin) {
    const int64_t qd = dn + dr, S = c_kv.size(1), T = c_kv.size(2);
    std::vector<float> xn(B * D), q(B * H * qd), kv(B * (r + dr)), out(B * H * dv), o(B * D);
    rms_norm(h, B, D, L.in_norm, eps, xn.data(), D, D);
    if (L.q_b.defined()) {
      std::vector<float> qa(B * qr);
      lin_pair(L.q_a, qa.data(), L.kv_a, kv.data(), xn.data(), B);
      rms_norm(qa.data(), B, qr, L.q_a_norm, latent_eps, qa.data(), qr, qr);
      lin(L.q_b, qa.data(), B, q.data());
    } else {
      lin_pair(L.q_a, q.data(), L.kv_a, kv.data(), xn.data(), B);
    }
    const int64_t half = dr / 2;
    for (int64_t b = 0; b < B; ++b) {
      float* row = kv.data() + b * (r + dr);
      rms_norm(row, 1, r, L.kv_norm, latent_eps, row, r, r);
      rope(row + r, cos + b * half, sin + b * half, half);
      for (int64_t hh = 0; hh < H; ++hh) rope(q.data() + (b * H + hh) * qd + dn, cos + b * half, sin + b * half, half);
      TORCH_CHECK(0 <= slots[b] && slots[b] < S && 0 <= pos[b] && pos[b] < T, "slot or position outside the cache");
      const int64_t at = (layer * S + slots[b]) * T + pos[b];
      if (bf16_cache) {
        auto* c = reinterpret_cast<uint16_t*>(c_kv.data_ptr()) + at * r;
        auto* k = reinterpret_cast<uint16_t*>(k_rope.data_ptr()) + at * dr;
        for (int64_t j = 0; j < r; j += 8) store8(c + j, _mm256_loadu_ps(row + j));
        for (int64_t j = 0; j < dr; j += 8) store8(k + j, _mm256_loadu_ps(row + r + j));
      } else {
        std::memcpy(c_kv.data_ptr<float>() + at * r, row, r * sizeof(float));
        std::memcpy(k_rope.data_ptr<float>() + at * dr, row + r, dr * sizeof(float));
      }
    }
    // Absorbed attention in three parts. Per head, for all B sequences at once: q_lat = W_k^T q_nope, the query
    // in the latent space (one pass of the matmul kernel over the head's key rows of kv_b; reading and widening
    // them once per sequence made batch 16 pay for them 16 times). Then per sequence: scores against its cached
    // latents and rope keys, softmax, and ctx = sum_t p_t c_t. Then per head, for all sequences: out = W_v ctx.
    bf16k::AlignedVector<float> q_lat(B * H * r), ctx(B * H * r);
    // per head hh, for all B sequences: y[b, hh] = lins[hh] x[b, hh], where x[b, hh] starts at
    // x + (b * H + hh) * x_stride (lins[hh].K floats) and y is [B, H, lins[hh].N]
    auto per_head = [&](const std::vector<Lin>& lins, const float* x, int64_t x_stride, float* y) {
      at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
        Prepared p;
        bf16k::AlignedVector<float> rows;   // fp32 weights read it as it is
        for (int64_t hh = h0; hh < h1; ++hh) {
          const Lin& W = lins[hh];
          rows.resize(B * W.K);
          for (int64_t b = 0; b < B; ++b)
            std::memcpy(rows.data() + b * W.K, x + (b * H + hh) * x_stride, W.K * sizeof(float));
          prepare(W, rows.data(), B, p);
          lin_rows(W, p, y + hh * W.N, H * W.N, 0, W.N);
        }
      });
    };
    per_head(L.absorb_q, q.data(), qd, q_lat.data());   // the first dn numbers of each head's query
    // a task is one sequence and a group of its heads: all heads when there are enough sequences to share
    // out, and then a bf16 cache is widened to fp32 once for all of them (at batch 16, widening it again for
    // every head cost more than the dot products); else one head
    const int64_t per_task = B >= 2 * at::get_num_threads() ? H : 1, groups = H / per_task;
    at::parallel_for(0, B * groups, 1, [&](int64_t p0, int64_t p1) {
      bf16k::AlignedVector<float> scores, lat, rk;
      // heads [h0, h0 + per_task) of sequence b over its n cached latents [n, r] and rope keys [n, dr]
      auto attend = [&](int64_t b, int64_t h0, int64_t n, const auto* lat_rows, const auto* rope_rows) {
        scores.resize(n);
        for (int64_t hh = h0; hh < h0 + per_task; ++hh) {
          const float* ql = q_lat.data() + (b * H + hh) * r;
          const float* qrope = q.data() + (b * H + hh) * qd + dn;
          float* cx = ctx.data() + (b * H + hh) * r;
          for (int64_t t = 0; t < n; ++t)
            scores[t] = (dot(ql, lat_rows + t * r, r) + dot(qrope, rope_rows + t * dr, dr)) * scale;
          const float total = exp_shifted(scores.data(), n);
          std::fill(cx, cx + r, 0.f);
          for (int64_t t = 0; t < n; ++t) axpy(scores[t] / total, lat_rows + t * r, cx, r);
        }
      };
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / groups, h0 = (p % groups) * per_task, n = pos[b] + 1;
        const int64_t base = (layer * S + slots[b]) * T;
        if (!bf16_cache) {
          attend(b, h0, n, c_kv.data_ptr<float>() + base * r, k_rope.data_ptr<float>() + base * dr);
          continue;
        }
        const auto* c = reinterpret_cast<const uint16_t*>(c_kv.data_ptr()) + base * r;
        const auto* k = reinterpret_cast<const uint16_t*>(k_rope.data_ptr()) + base * dr;
        if (per_task == 1) {
          attend(b, h0, n, c, k);
          continue;
        }
        lat.resize(n * r);
        rk.resize(n * dr);
        for (int64_t i = 0; i < n * r; i += 8) store8(lat.data() + i, load8(c + i));
        for (int64_t i = 0; i < n * dr; i += 8) store8(rk.data() + i, load8(k + i));
        attend(b, h0, n, lat.data(), rk.data());
      }
    });
    per_head(L.absorb_out, ctx.data(), r, out.data());
    lin(L.o, out.data(), B, o.data());
    for (int64_t i = 0; i < B * D; ++i) h[i] += o[i];
  }

  // sigmoid routing of one token: scores s = sigmoid(logits), selection on s + bias (group-limited when
  // n_group > 1), weights from s, renormalised, times routed_scaling_factor
  void route(const float* logits, const float* bias, int64_t* idx, float* weight) const {
    std::vector<float> s(E), biased(E);
    for (int64_t e = 0; e < E; ++e) {
      s[e] = 1.f / (1.f + std::exp(-logits[e]));
      biased[e] = s[e] + bias[e];
    }
    if (n_group > 1) {
      const int64_t per = E / n_group;
      std::vector<std::pair<float, int64_t>> groups(n_group);
      for (int64_t g = 0; g < n_group; ++g) {
        std::vector<float> v(biased.begin() + g * per, biased.begin() + (g + 1) * per);
        std::partial_sort(v.begin(), v.begin() + 2, v.end(), std::greater<float>());
        groups[g] = {v[0] + v[1], g};
      }
      std::partial_sort(groups.begin(), groups.begin() + topk_group, groups.end(),
                        [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
      std::vector<char> keep(n_group, 0);
      for (int64_t g = 0; g < topk_group; ++g) keep[groups[g].second] = 1;
      for (int64_t e = 0; e < E; ++e) if (!keep[e / per]) biased[e] = -INFINITY;
    }
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int64_t a, int64_t b) { return biased[a] > biased[b] || (biased[a] == biased[b] && a < b); });
    float total = 0.f;
    for (int64_t j = 0; j < top_k; ++j) { idx[j] = order[j]; weight[j] = s[order[j]]; total += weight[j]; }
    for (int64_t j = 0; j < top_k; ++j) weight[j] = (norm_topk ? weight[j] / (total + 1e-20f) : weight[j]) * routed_scaling;
  }

  // post-attention half of a block: h += FFN(norm(h)), the FFN being the dense MLP or routed + shared experts
  void mlp(const Layer& L, float* h, int64_t B, int64_t* routed) {
    std::vector<float> xn(B * D), y(B * D, 0.f);
    rms_norm(h, B, D, L.post_norm, eps, xn.data(), D, D);
    std::vector<Task> tasks;
    if (L.moe) {
      std::vector<float> logits(B * E), w(B * top_k);
      at::parallel_for(0, E, std::max<int64_t>(8, 16384 / D), [&](int64_t e0, int64_t e1) {   // >= 64 kB per thread
        rows_times_f32_serial(xn.data(), B, D, L.router, e0, e1, logits.data(), E);
      });
      for (int64_t b = 0; b < B; ++b) route(logits.data() + b * E, L.router_bias, routed + b * top_k, w.data() + b * top_k);
      std::vector<int64_t> task_of(E, -1);     // the routed experts that received tokens, one task each
      for (int64_t p = 0; p < B * top_k; ++p) {
        const int64_t e = routed[p];
        if (task_of[e] < 0) { task_of[e] = tasks.size(); tasks.push_back({&L.e_gate[e], &L.e_up[e], &L.e_down[e]}); }
        tasks[task_of[e]].tokens.push_back(p / top_k);
        tasks[task_of[e]].weight.push_back(w[p]);
      }
    }
    if (L.gate.defined()) {                    // the dense MLP, or the shared experts (unweighted)
      Task t{&L.gate, &L.up, &L.down};
      for (int64_t b = 0; b < B; ++b) { t.tokens.push_back(b); t.weight.push_back(1.f); }
      tasks.push_back(std::move(t));
    }
    feed_forward(tasks, xn.data(), y.data());
    for (int64_t i = 0; i < B * D; ++i) h[i] += y[i];
  }

  // One SwiGLU expert (routed, shared or the dense MLP) and the tokens it runs on, with their weights.
  struct Task {
    const Lin *gate, *up, *down;
    std::vector<int64_t> tokens;
    std::vector<float> weight;
  };

  // y[token] += weight * down(silu(gate x) * up x) for every task. Two parallel regions for all of them: the
  // gate and up rows of every task split over threads (row i of both with its silu, so the exponentials are
  // shared out too: at batch 16 they cost as much as a small matrix), then their down rows. Each weight row
  // is read once per step. The threads claim runs of rows as they go (see `claimed`), so they finish
  // together whatever the number of experts, tokens and weight formats, and whatever else the machine runs.
  static constexpr double BYTE_COST = 1.5;   // reading one weight byte, in units of one token's multiply-add
  static constexpr double MIN_CLAIM = 2e5;   // ~64 kB of bf16 weights at batch 1: a claim costs ~0.1 us

  // feed_forward's buffers, per task: kept from call to call, so that they are not allocated and freed for
  // every layer of every step. Fresh ones cost page faults (glibc hands freed memory back to the system): at
  // batch 16 the gather alone took 0.6 ms a step. The GIL serializes calls into a plan.
  struct Scratch {
    std::vector<Prepared> in, mid;                          // each task's activations, for the kernels
    std::vector<bf16k::AlignedVector<float>> gathered, act, up, out; // its tokens' rows, silu(gate) * up, up, down
  } scratch;

  // the work of one weight row of L for M tokens (it sizes the runs threads claim): its bytes plus M
  // multiply-adds per weight
  static double row_cost(const Lin& L, int64_t M) {
    const double bytes_per_weight = L.kind == INT4 ? 0.5 + 2.0 / double(L.gs) : L.kind == BF16 ? 2.0 : 4.0;
    return double(L.K) * (BYTE_COST * bytes_per_weight + double(M));
  }

  void feed_forward(const std::vector<Task>& tasks, const float* xn, float* y) {
    const int64_t A = tasks.size();
    int64_t pairs = 0;                    // (task, token) pairs: 9 at batch 1, ~130 at batch 16
    for (const Task& t : tasks) pairs += t.tokens.size();
    // the per-task set-up and the final sum run on both threads when there is enough of it (batch 16: ~2 ms a
    // step on one thread while the other waited)
    const bool parallel = pairs > 2 * A;
    const int64_t task_grain = parallel ? 1 : A;
    if (int64_t(scratch.in.size()) < A) {
      for (auto* v : {&scratch.gathered, &scratch.act, &scratch.up, &scratch.out}) v->resize(A);
      scratch.in.resize(A);
      scratch.mid.resize(A);
    }
    auto &in = scratch.in, &mid = scratch.mid;
    auto &gathered = scratch.gathered, &act = scratch.act, &up = scratch.up, &out = scratch.out;
    at::parallel_for(0, A, task_grain, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        const Task& t = tasks[a];
        const int64_t M = t.tokens.size(), I = t.gate->N;
        gathered[a].resize(M * D);
        for (int64_t m = 0; m < M; ++m) std::memcpy(&gathered[a][m * D], xn + t.tokens[m] * D, D * sizeof(float));
        prepare(*t.gate, gathered[a].data(), M, in[a]);   // gate and up read the same prepared activations
        act[a].resize(M * I);
        up[a].resize(M * I);
        out[a].resize(M * D);
      }
    });
    // each task's first row in the two regions: I "rows" (gate row i and up row i) each, then D down rows
    std::vector<int64_t> first_up(A + 1, 0), first_down(A + 1, 0);
    for (int64_t a = 0; a < A; ++a) {
      first_up[a + 1] = first_up[a] + tasks[a].gate->N;
      first_down[a + 1] = first_down[a] + D;
    }
    // rows [r0, r1) of the concatenation of every task's rows in one of the two regions
    auto rows = [&](const std::vector<int64_t>& first, int64_t r0, int64_t r1, bool up_phase) {
      int64_t a = std::upper_bound(first.begin(), first.end(), r0) - first.begin() - 1;
      for (; a < A && first[a] < r1; ++a) {
        const Task& t = tasks[a];
        const int64_t l0 = std::max(r0, first[a]) - first[a], l1 = std::min(r1, first[a + 1]) - first[a];
        if (!up_phase) { lin_rows(*t.down, mid[a], out[a].data(), D, l0, l1); continue; }
        const int64_t I = t.gate->N, M = t.tokens.size();
        lin_rows(*t.gate, in[a], act[a].data(), I, l0, l1);
        lin_rows(*t.up, in[a], up[a].data(), I, l0, l1);
        for (int64_t m = 0; m < M; ++m) silu_mul(act[a].data() + m * I + l0, up[a].data() + m * I + l0, l1 - l0);
      }
    };
    // Threads claim runs of rows from both ends of the task list: even threads from the front (the routed
    // experts, bound by memory), odd ones from the back (the shared experts, which at batch 16 are bound by
    // arithmetic, so the two kinds overlap). A claim takes 1 / (2 x threads) of the cost left, at least
    // MIN_CLAIM, so there are few claims and the last ones are short. A static split by the cost model left
    // the threads waiting for each other 5% of their time in the expert phases at batch 16, 4% at batch 1
    // (bf16, bench preset): the model cannot know how DRAM, caches and other processes treat each thread.
    auto claimed = [&](const std::vector<int64_t>& first, bool up_phase) {
      auto per_row = [&](int64_t a) {
        const Task& t = tasks[a];
        const int64_t M = t.tokens.size();
        return up_phase ? row_cost(*t.gate, M) + row_cost(*t.up, M) : row_cost(*t.down, M);
      };
      std::vector<double> cost(A + 1, 0.0);   // cumulative cost at each task's first row
      for (int64_t a = 0; a < A; ++a) cost[a + 1] = cost[a] + double(first[a + 1] - first[a]) * per_row(a);
      auto row_at = [&](double c) {           // the global row where the cumulative cost reaches c
        if (c <= 0.0) return first[0];
        if (c >= cost[A]) return first[A];
        const int64_t a = std::upper_bound(cost.begin(), cost.end(), c) - cost.begin() - 1;
        return std::min(first[a + 1], first[a] + int64_t((c - cost[a]) / per_row(a)));
      };
      auto cost_at = [&](int64_t row) {       // the cumulative cost at a global row
        if (row >= first[A]) return cost[A];
        const int64_t a = std::upper_bound(first.begin(), first.end(), row) - first.begin() - 1;
        return cost[a] + double(row - first[a]) * per_row(a);
      };
      const int64_t threads = at::get_num_threads();
      TORCH_CHECK(first[A] < (int64_t(1) << 32), "too many expert rows");
      std::atomic<uint64_t> left{uint64_t(first[A]) << 32};   // the rows not claimed yet: [low 32 bits, high 32)
      at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const bool from_back = t % 2 == 1;
          uint64_t now = left.load();
          for (;;) {
            const int64_t lo = int64_t(now & 0xFFFFFFFFu), hi = int64_t(now >> 32);
            if (lo >= hi) break;
            const double c_lo = cost_at(lo), c_hi = cost_at(hi);
            const double take = std::max(MIN_CLAIM, (c_hi - c_lo) / double(2 * threads));
            int64_t r0 = lo, r1 = hi;
            if (from_back) r0 = std::clamp(row_at(c_hi - take), lo, hi - 1);
            else r1 = std::clamp(row_at(c_lo + take), lo + 1, hi);
            const uint64_t rest = from_back ? (uint64_t(r0) << 32) | uint64_t(lo) : (uint64_t(hi) << 32) | uint64_t(r1);
            if (!left.compare_exchange_weak(now, rest)) continue;   // another thread claimed first: `now` reloaded
            rows(first, r0, r1, up_phase);
            now = left.load();
          }
        }
      });
    };
    claimed(first_up, true);
    at::parallel_for(0, A, task_grain, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) prepare(*tasks[a].down, act[a].data(), tasks[a].tokens.size(), mid[a]);
    });
    claimed(first_down, false);
    // y[token] += weight * out, split over columns (each thread adds every task into its share of D)
    at::parallel_for(0, D / 8, parallel ? 1 : D / 8, [&](int64_t c0, int64_t c1) {   // columns 8 * c0 .. 8 * c1
      for (int64_t a = 0; a < A; ++a)
        for (size_t m = 0; m < tasks[a].tokens.size(); ++m) {
          const float* o = out[a].data() + m * D + 8 * c0;
          axpy(tasks[a].weight[m], o, y + tasks[a].tokens[m] * D + 8 * c0, 8 * (c1 - c0));
        }
    });
  }
};

}  // namespace fused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<fused::Plan>(m, "Plan")
      .def(pybind11::init<std::vector<int64_t>, std::vector<double>, std::vector<std::vector<torch::Tensor>>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>>())
      .def("step", &fused::Plan::step);
}
"""

_INCLUDES = """
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <alloca.h>
#include <cstdlib>
#include <new>
#include <atomic>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>
"""


def _namespaced(name: str, source: str) -> str:
    """Another kernel's source inside a namespace, without its #include lines (they come first, once)."""
    body = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#include"))
    return f"namespace {name} {{\n{body}\n}}  // namespace {name}\n"


@functools.cache
def kernel():
    """The compiled fused-decode extension (it embeds the bf16 and INT4 kernels' sources), or None."""
    source = (_INCLUDES + _namespaced("bf16k", cpu_kernels._SOURCE) + _namespaced("int4k", int4_linear._SOURCE)
              + _DECODE)
    return cpu_kernels.build_kernel("nanok2_fused_decode", source, None, "fused decode",
                                    "the eager decode step", openmp=True)


class Unsupported(Exception):
    """What the fused step does not cover; the engine keeps its eager decode."""


def _linear(module: nn.Module | None) -> list[torch.Tensor]:
    """(weight, scale, bias) of a linear layer as stored: fp32/bf16 weight and no scale, or INT4 packed
    weight and bf16 scales; empty tensors for what it lacks."""
    empty = torch.empty(0)
    if module is None:
        return [empty] * 3
    if isinstance(module, int4_linear.Int4Linear):
        if not int4_linear.gemv_supported(module.in_features, module.group_size):
            raise Unsupported(f"INT4 group size {module.group_size} with {module.in_features} inputs")
        weight, scale = module.weight_packed, module.weight_scale
    elif isinstance(module, nn.Linear):
        weight, scale = _dense(module.weight), empty
    else:
        raise Unsupported(f"a {type(module).__name__} where a linear layer was expected")
    bias = empty if module.bias is None else module.bias.detach().float().contiguous()
    return [weight.detach().contiguous(), scale.contiguous(), bias]


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """A float weight as the kernels read it (fp32 or bf16, contiguous)."""
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise Unsupported(f"{weight.dtype} weights")
    return weight.detach().contiguous()


def _norm(module: nn.Module | None) -> torch.Tensor:
    return torch.empty(0) if module is None else module.weight.detach().float().contiguous()


def _layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """One block's tensors in the order Plan's constructor reads them (see _DECODE)."""
    attn, mlp = layer.self_attn, layer.mlp
    lora = attn.args.q_lora_rank is not None
    kv_b = attn.kv_b_proj
    kv_b_weight = kv_b.weight if isinstance(kv_b, int4_linear.Int4Linear) else _dense(kv_b.weight)
    if kv_b.bias is not None:
        raise Unsupported("a bias on kv_b_proj")
    tensors = [_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm),
               _norm(attn.q_a_layernorm if lora else None), _norm(attn.kv_a_layernorm), kv_b_weight.contiguous(),
               *_linear(attn.q_a_proj if lora else attn.q_proj), *_linear(attn.q_b_proj if lora else None),
               *_linear(attn.kv_a_proj_with_mqa), *_linear(attn.o_proj)]
    if isinstance(mlp, MLP):
        return tensors + _linear(mlp.gate_proj) + _linear(mlp.up_proj) + _linear(mlp.down_proj) + [torch.empty(0)] * 4
    if not isinstance(mlp, MoE):
        raise Unsupported(f"a {type(mlp).__name__} feed-forward")
    shared = mlp.shared_experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        tensors += _linear(getattr(shared, name) if shared is not None else None)
    tensors += [mlp.gate.weight.detach().float().contiguous(), mlp.gate.e_score_correction_bias.float().contiguous()]
    experts = mlp.experts
    if isinstance(experts, Experts):
        return tensors + [_dense(experts.gate_up_proj), _dense(experts.down_proj)]
    if isinstance(experts, int4_linear.Int4Experts):
        tensors += [torch.empty(0), torch.empty(0)]
        for expert in experts:
            tensors += _linear(expert.gate_proj) + _linear(expert.up_proj) + _linear(expert.down_proj)
        return tensors
    raise Unsupported(f"{type(experts).__name__} experts")


class FusedDecoder:
    """The decode step of a model as one C++ call. Build it once the weights are final: it holds the
    weights' storage (fp32/bf16/INT4 as stored; norms and biases copied to fp32)."""

    def __init__(self, model: nn.Module, plan):
        self.model, self.plan = model, plan
        self.moe_layers = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]

    @classmethod
    def build(cls, model: nn.Module) -> "FusedDecoder | None":
        """-> a FusedDecoder, or None where the fused step does not apply (it says nothing: the eager
        decode runs as before)."""
        try:
            return cls(model, cls._plan(model))
        except Unsupported:
            return None

    @staticmethod
    def _plan(model: nn.Module):
        a = model.args
        if model.model.embed_tokens.weight.device.type != "cpu":
            raise Unsupported("not on the CPU")
        dims = [a.hidden_size, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim,
                a.kv_lora_rank, a.q_lora_rank or 0, a.moe_intermediate_size, a.intermediate_size]
        if any(d % 8 for d in dims):
            raise Unsupported("dimensions that are not multiples of 8")
        ext = kernel()
        if ext is None:
            raise Unsupported("no compiled kernel")
        layers = [_layer_tensors(layer) for layer in model.model.layers]
        final = [_norm(model.model.norm), *_linear(model.lm_head)]
        attn = model.model.layers[0].self_attn
        return ext.Plan(
            [a.hidden_size, a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim,
             a.kv_lora_rank, a.q_lora_rank or 0, a.n_routed_experts, a.num_experts_per_tok, a.n_group,
             a.topk_group, int(a.norm_topk_prob), a.vocab_size],
            [a.rms_norm_eps, LATENT_NORM_EPS, attn.softmax_scale, a.routed_scaling_factor, model.rope_factor],
            layers, final, [_dense(model.model.embed_tokens.weight), model.inv_freq.float().contiguous()])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, c_kv: torch.Tensor,
             k_rope: torch.Tensor) -> torch.Tensor:
        """tokens, positions, slots int64 [B]; the cache's c_kv [L, S, T, r] and k_rope [L, S, T, dr] are
        written at (layer, slot, position) -> logits [B, V] fp32. Sets each MoE's `last_counts` as its forward does."""
        logits, counts = self.plan.step(tokens, positions, slots, c_kv, k_rope)   # [B, V], [L, E]
        for i, moe in self.moe_layers:
            moe.last_counts = counts[i]
        return logits
