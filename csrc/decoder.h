// A whole Llama decode step over the projections of cpu_linear.h, fp32 activations and KV cache, on plain
// pointers: DecoderCore. Both builds hold one: the torch extension's Decoder (cpu_native.cpp, tensors checked
// and kept alive there) and the lite library (lite.cpp, numpy arrays kept by codellama_rt.lite).
#pragma once

#include "gemm.h"

#include <cmath>
#include <string>
#include <vector>

namespace clrt {

inline void rms_norm(const float* h, const float* weight, float eps, int64_t dim, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < dim; ++i) ss += h[i] * h[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) y[i] = (h[i] * r) * weight[i];
}

#if CLRT_AVX512
// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial (about 1 ulp), times 2^n by
// vscalefps; x clamped to [-87.3, 88.7] (finite results; e^-87.3 is already 0 next to 1 in silu).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact to fp32
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#elif CLRT_AVX2
// e^x for 8 lanes: exp16's polynomial, x clamped to [-87.3, 88.3] so that 2^n (n in -126 .. 127) is built
// directly in the exponent bits.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i]
inline void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
#if CLRT_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)),
                                                   _mm512_maskz_loadu_ps(m, up + i)));
  }
#elif CLRT_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// s [M, n] = q [M, D] K[0..n)^T: the projections' tiles (M query rows against 4 key rows at a time).
template <int R>
inline void scores_tile(const float* q, int64_t M, const float* K, int64_t D, float* o) {
  switch (M) {
    case 1: dense_dot<R, 1>(q, K, D, o); break;
    case 2: dense_dot<R, 2>(q, K, D, o); break;
    case 3: dense_dot<R, 3>(q, K, D, o); break;
    case 4: dense_dot<R, 4>(q, K, D, o); break;
    case 5: dense_dot<R, 5>(q, K, D, o); break;
    default: dense_dot<R, XROWS>(q, K, D, o); break;
  }
}

inline void scores(const float* q, int64_t G, const float* K, int64_t n, int64_t D, float* s) {
  float o[XROWS * 4];
  for (int64_t m0 = 0; m0 < G; m0 += XROWS) {
    const int64_t M = std::min<int64_t>(XROWS, G - m0);
    const float* qm = q + m0 * D;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      scores_tile<4>(qm, M, K + t * D, D, o);
      for (int64_t m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) s[(m0 + m) * n + t + r] = o[m * 4 + r];
    }
    for (; t < n; ++t) {
      scores_tile<1>(qm, M, K + t * D, D, o);
      for (int64_t m = 0; m < M; ++m) s[(m0 + m) * n + t] = o[m];
    }
  }
}

// p[0..n) <- e^(scale p - max(scale p)); returns their sum.
inline float softmax_scaled(float* p, int64_t n, float scale) {
  // the max in vectors (exact, so any order gives the same value; a scalar loop was one dependent max per key)
  float mx = -INFINITY;
  int64_t t = 0;
#if CLRT_AVX512
  {
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (; t + 16 <= n; t += 16) m = _mm512_max_ps(m, _mm512_mul_ps(_mm512_loadu_ps(p + t), sc));
    mx = _mm512_reduce_max_ps(m);
  }
#elif CLRT_AVX2
  {
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= n; t += 8) m = _mm256_max_ps(m, _mm256_mul_ps(_mm256_loadu_ps(p + t), sc));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float v : lanes) mx = std::max(mx, v);
  }
#endif
  for (; t < n; ++t) mx = std::max(mx, p[t] * scale);
  float sum = 0.f;
  t = 0;
#if CLRT_AVX512
  const __m512 sc = _mm512_set1_ps(scale), m = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p + t), sc), m));
    _mm512_storeu_ps(p + t, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#elif CLRT_AVX2
  const __m256 sc = _mm256_set1_ps(scale), m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p + t), sc), m));
    _mm256_storeu_ps(p + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = reduce1(acc);
#endif
  for (; t < n; ++t) sum += (p[t] = std::exp(p[t] * scale - mx));
  return sum;
}

inline void rotate_half(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}


// o [G, D] = p [G, n] V [n, D]: each head's weights over the n values. Each V row is loaded once for up to four
// heads (the heads reading one kv head); every output is the sum over t in order, one FMA per term.
#if CLRT_AVX512 || CLRT_AVX2
template <int HS, int EV>
inline void weighted_values_tile(const float* p, int64_t n, const float* V, int64_t D, int64_t e, float* o) {
  vec acc[HS][EV];
  for (int h = 0; h < HS; ++h)
    for (int j = 0; j < EV; ++j) acc[h][j] = vzero();
  for (int64_t t = 0; t < n; ++t) {
    vec v[EV];
    for (int j = 0; j < EV; ++j) v[j] = vload(V + t * D + e + j * LANES);
    for (int h = 0; h < HS; ++h) {
      const vec w = vset1(p[h * n + t]);
      for (int j = 0; j < EV; ++j) acc[h][j] = vfma(w, v[j], acc[h][j]);
    }
  }
  for (int h = 0; h < HS; ++h)
    for (int j = 0; j < EV; ++j) vstore(o + h * D + e + j * LANES, acc[h][j]);
}

template <int HS>
inline void weighted_values_heads(const float* p, int64_t n, const float* V, int64_t D, float* o) {
  int64_t e = 0;
  for (; e + 2 * LANES <= D; e += 2 * LANES) weighted_values_tile<HS, 2>(p, n, V, D, e, o);
  for (; e < D; e += LANES) weighted_values_tile<HS, 1>(p, n, V, D, e, o);
}
#endif

inline void weighted_values(const float* p, int64_t G, int64_t n, const float* V, int64_t D, float* o) {
#if CLRT_AVX512 || CLRT_AVX2
  if (D % LANES == 0) {
    for (int64_t h = 0; h < G; h += 4) {
      const float* ph = p + h * n;
      float* oh = o + h * D;
      switch (std::min<int64_t>(4, G - h)) {
        case 1: weighted_values_heads<1>(ph, n, V, D, oh); break;
        case 2: weighted_values_heads<2>(ph, n, V, D, oh); break;
        case 3: weighted_values_heads<3>(ph, n, V, D, oh); break;
        default: weighted_values_heads<4>(ph, n, V, D, oh); break;
      }
    }
    return;
  }
#endif
  for (int64_t h = 0; h < G; ++h) {
    float* oh = o + h * D;
    std::fill(oh, oh + D, 0.f);
    for (int64_t t = 0; t < n; ++t) {
      const float w = p[h * n + t];
      const float* vt = V + t * D;
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) oh[e] += w * vt[e];
    }
  }
}

// A Llama decode step over the module graph's weights (the formats of cpu_linear_base.h). The arrays are the
// owner's: embedding fp32 [V, dim], norms fp32 [dim] each (per layer attention then MLP), final_norm fp32 [dim],
// rope cos / sin fp32 [rope_positions, head_dim / 2].
class DecoderCore {
 public:
  static constexpr int64_t GEMM_MIN_ROWS = 16;  // prompt rows from which the projections run as a packed GEMM

  DecoderCore(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn_dim, int64_t vocab_size,
              double eps, const float* embedding, std::vector<const float*> norms, const float* final_norm,
              const float* rope_cos, const float* rope_sin, int64_t rope_positions)
      : dim_(dim), H_(n_heads), Hkv_(n_kv_heads), D_(head_dim), F_(ffn_dim), V_(vocab_size), eps_(eps),
        embedding_(embedding), norms_(std::move(norms)), final_norm_(final_norm), cos_(rope_cos), sin_(rope_sin),
        rope_positions_(rope_positions) {
    check(dim_ > 0 && H_ > 0 && Hkv_ > 0 && D_ > 0 && F_ > 0 && V_ > 0 && rope_positions_ > 0,
          "dimensions must be positive");
    check(H_ % Hkv_ == 0 && D_ % 2 == 0, "heads: n_heads a multiple of n_kv_heads, head_dim even");
    check(!norms_.empty() && norms_.size() % 2 == 0, "two norm weights per layer");
  }

  int64_t layers() const { return static_cast<int64_t>(norms_.size()) / 2; }
  int64_t vocab_size() const { return V_; }

  // The projections in graph order: per layer wqkv, wo, w13, w2, then the lm_head. `continues`: this weight is
  // the next rows of the previous projection's output (a checkpoint's q, k, v parts), not a new projection.
  void add_linear(const Linear& l, bool continues) {
    if (!continues) {
      check(static_cast<int64_t>(projections_.size()) < 4 * layers() + 1, "the decoder has every projection");
      projections_.push_back({});
    } else {
      check(!projections_.empty() && projections_.back().parts.front().K == l.K,
            "a continuing part needs a previous projection of the same input width");
    }
    Projection& p = projections_.back();
    p.offsets.push_back(p.N);
    p.parts.push_back(l);
    p.N += l.N;
    for (auto& part : p.parts) part.ldo = p.parts.size() > 1 ? p.N : 0;
  }

  // Prompt rows (step's `prompt`) of int8 / int4 weights multiply in bf16 (gemm_bf16: activations and weights
  // rounded to bf16) where the CPU has AVX512-BF16; returns whether it does.
  bool bf16_prompt(bool on) {
    bf16_prompt_ = on && HAS_GEMM_BF16;
    return bf16_prompt_;
  }

  // Decode rows (one x row) of every int8 projection (fp32 products) read their weight rows one at a time (on) or
  // four side by side (off, the default): see Linear::one_row.
  void one_row_int8(bool on) {
    for (auto& p : projections_)
      for (auto& part : p.parts)
        if (part.kind == INT8) part.one_row = on;
  }

  // Checks the projections' widths and a step's arguments (step's, below); slot: null for row b at cache row b.
  // (Each message is built only on failure: this runs every step.)
  void check_step(int64_t B, const int64_t* tok, const int64_t* pos, const int64_t* slot, int64_t rows,
                  int64_t S, int64_t out_rows) const {
    const int64_t L = layers();
    if (static_cast<int64_t>(projections_.size()) != 4 * L + 1) check(false, "decoder has not every projection");
    const int64_t widths[4] = {(H_ + 2 * Hkv_) * D_, dim_, 2 * F_, dim_};  // wqkv, wo, w13, w2
    const int64_t inputs[4] = {dim_, H_ * D_, dim_, F_};
    for (int64_t i = 0; i <= 4 * L; ++i) {
      const int64_t N = projections_[i].N, K = projections_[i].parts.front().K;
      if (N != (i < 4 * L ? widths[i % 4] : V_))
        check(false, "projection " + std::to_string(i) + " is " + std::to_string(N) + " wide, not the model's");
      if (K != (i < 4 * L ? inputs[i % 4] : dim_))
        check(false, "projection " + std::to_string(i) + " takes " + std::to_string(K) + " inputs, not the model's");
    }
    check(B > 0, "a step needs at least one token");
    check(out_rows >= 1 && out_rows <= B, "logits for 1 .. B rows");
    if (slot == nullptr && rows < B)
      check(false, "cache has " + std::to_string(rows) + " rows for " + std::to_string(B) + " tokens");
    for (int64_t b = 0; b < B; ++b) {
      if (tok[b] < 0 || tok[b] >= V_) check(false, "token id " + std::to_string(tok[b]) + " outside the vocabulary");
      if (pos[b] < 0 || pos[b] >= S || pos[b] >= rope_positions_)
        check(false, "position " + std::to_string(pos[b]) + " outside the cache (" + std::to_string(S) +
              ") or the rope tables");
      if (slot && (slot[b] < 0 || slot[b] >= rows))
        check(false, "slot " + std::to_string(slot[b]) + " outside the cache's " + std::to_string(rows) + " rows");
    }
  }

  // tokens, positions, slots [B] (slot null: row b at cache row b); cache fp32 [layers, 2, rows, Hkv, S, D];
  // -> logits fp32 [out_rows, V] of the last out_rows rows (1 .. B; a prompt needs its last). Row b is at cache
  // row slot[b], position pos[b]: every row's K/V is written before any row attends, so rows sharing a slot at
  // consecutive positions (a speculative verify block, a prompt) attend causally. Row b attends to its slot's
  // positions 0 .. pos[b]. prompt: the rows are a prompt's, their projections a packed GEMM where there are
  // enough of them (gemm.h: another summation order than a decode step's, so not for rows whose logits must
  // equal decode steps'). Call check_step first.
  void step(int64_t B, const int64_t* tok, const int64_t* pos, const int64_t* slot, float* cache, int64_t rows,
            int64_t S, float* logits, int64_t out_rows, bool prompt = false) const {
    const bool packed = prompt && HAS_GEMM && B >= GEMM_MIN_ROWS;
    std::vector<int64_t> own;
    if (!slot) {
      own.resize(B);
      for (int64_t b = 0; b < B; ++b) own[b] = b;
      slot = own.data();
    }
    const int64_t L = layers(), QKV = (H_ + 2 * Hkv_) * D_, G = H_ / Hkv_;
    std::vector<float> h(B * dim_), y(B * std::max(dim_, H_ * D_)), qkv(B * QKV), attn(B * H_ * D_),
        o(B * dim_), g(B * 2 * F_), a(B * F_);
    for (int64_t b = 0; b < B; ++b)
      std::copy(embedding_ + tok[b] * dim_, embedding_ + (tok[b] + 1) * dim_, h.data() + b * dim_);
    for (int64_t l = 0; l < L; ++l) {
      const float* an = norms_[2 * l];
      const float* mn = norms_[2 * l + 1];
      for (int64_t b = 0; b < B; ++b) rms_norm(h.data() + b * dim_, an, eps_, dim_, y.data() + b * dim_);
      project(projections_[4 * l], y.data(), B, qkv.data(), packed);
      attend(l, B, S, rows, pos, slot, cache, qkv.data(), attn.data(), G, QKV);
      project(projections_[4 * l + 1], attn.data(), B, o.data(), packed);
      for (int64_t i = 0; i < B * dim_; ++i) h[i] += o[i];
      for (int64_t b = 0; b < B; ++b) rms_norm(h.data() + b * dim_, mn, eps_, dim_, y.data() + b * dim_);
      project(projections_[4 * l + 2], y.data(), B, g.data(), packed);
      for (int64_t b = 0; b < B; ++b)
        silu_mul(g.data() + b * 2 * F_, g.data() + b * 2 * F_ + F_, a.data() + b * F_, F_);
      project(projections_[4 * l + 3], a.data(), B, o.data(), packed);
      for (int64_t i = 0; i < B * dim_; ++i) h[i] += o[i];
    }
    for (int64_t b = B - out_rows; b < B; ++b)
      rms_norm(h.data() + b * dim_, final_norm_, eps_, dim_, y.data() + b * dim_);
    project(projections_[4 * L], y.data() + (B - out_rows) * dim_, out_rows, logits,
            packed && out_rows >= GEMM_MIN_ROWS);
  }

 private:
  // Rotate q and k of each row at its position, write k and v into layer l's cache at (its slot, its position),
  // then attend over the slot's 0..pos. rows: the cache's max_batch (its row count, part of its strides).
  void attend(int64_t l, int64_t B, int64_t S, int64_t rows, const int64_t* pos, const int64_t* slot, float* cache,
              float* qkv, float* out, int64_t G, int64_t QKV) const {
    const int64_t half = D_ / 2, maxB = rows;
    const float* C = cos_;
    const float* Sn = sin_;
    float* kc = cache + l * 2 * maxB * Hkv_ * S * D_;
    float* vc = kc + maxB * Hkv_ * S * D_;
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkv + b * QKV;
      const float *c = C + pos[b] * half, *s = Sn + pos[b] * half;
      for (int64_t hd = 0; hd < H_ + Hkv_; ++hd) rotate_half(row + hd * D_, c, s, half);
      for (int64_t kv = 0; kv < Hkv_; ++kv) {
        const int64_t at = ((slot[b] * Hkv_ + kv) * S + pos[b]) * D_;
        std::copy(row + (H_ + kv) * D_, row + (H_ + kv + 1) * D_, kc + at);
        std::copy(row + (H_ + Hkv_ + kv) * D_, row + (H_ + Hkv_ + kv + 1) * D_, vc + at);
      }
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(D_));
    // one task per (row, kv head): its G query heads against the slot's keys 0..pos as one small product
    // (tasks taken from the front and the back in turn: a prompt's rows attend to ever more keys, so each thread's
    // contiguous share of tasks mixes short and long ones)
    const int64_t tasks = B * Hkv_;
    parallel_for(0, tasks, 1, [&](int64_t j0, int64_t j1) {
      std::vector<float> p;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i = j % 2 == 0 ? j / 2 : tasks - 1 - j / 2;
        const int64_t b = i / Hkv_, kv = i % Hkv_, n = pos[b] + 1;
        const float* q = qkv + b * QKV + kv * G * D_;  // the G heads reading this kv head: contiguous
        const float* K = kc + (slot[b] * Hkv_ + kv) * S * D_;
        const float* Vv = vc + (slot[b] * Hkv_ + kv) * S * D_;
        p.resize(G * n);
        scores(q, G, K, n, D_, p.data());
        for (int64_t h = 0; h < G; ++h) {
          float* ph = p.data() + h * n;
          const float sum = softmax_scaled(ph, n, scale);
          for (int64_t t = 0; t < n; ++t) ph[t] /= sum;
        }
        weighted_values(p.data(), G, n, Vv, D_, out + b * H_ * D_ + kv * G * D_);
      }
    });
  }


  int64_t dim_, H_, Hkv_, D_, F_, V_;
  float eps_;
  const float* embedding_;
  std::vector<const float*> norms_;
  const float *final_norm_, *cos_, *sin_;
  int64_t rope_positions_;
  bool bf16_prompt_ = false;
  // One projection: its weights' outputs side by side (parts[i] writes columns offsets[i] ..), N wide in all.
  struct Projection {
    std::vector<Linear> parts;
    std::vector<int64_t> offsets;
    int64_t N = 0;
  };

  void project(const Projection& p, const float* x, int64_t M, float* out, bool packed) const {
    for (size_t i = 0; i < p.parts.size(); ++i) {
      const Linear& l = p.parts[i];
      (!packed ? apply : bf16_prompt_ && l.kind != DENSE ? gemm_bf16 : gemm)(l, x, M, out + p.offsets[i]);
    }
  }

  std::vector<Projection> projections_;
};

}  // namespace clrt
