// The attention of the native decode step over the KV cache (fp32 [.., Hkv, S, D] per layer): decode rows
// (`attend_rows`: dot products in the projections' order, so a verify block's rows score exactly as decode steps)
// and prompt rows (`attend_prompt`: keys transposed into tiles, no reductions; another summation order).
#pragma once

#include "gemm.h"
#include "vmath.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace clrt {

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
inline void weighted_values_tile(const float* const* p, int64_t n, const float* V, int64_t D, int64_t e,
                                 float* const* o) {
  vec acc[HS][EV];
  for (int h = 0; h < HS; ++h)
    for (int j = 0; j < EV; ++j) acc[h][j] = vzero();
  for (int64_t t = 0; t < n; ++t) {
    vec v[EV];
    for (int j = 0; j < EV; ++j) v[j] = vload(V + t * D + e + j * LANES);
    for (int h = 0; h < HS; ++h) {
      const vec w = vset1(p[h][t]);
      for (int j = 0; j < EV; ++j) acc[h][j] = vfma(w, v[j], acc[h][j]);
    }
  }
  for (int h = 0; h < HS; ++h)
    for (int j = 0; j < EV; ++j) vstore(o[h] + e + j * LANES, acc[h][j]);
}

// o[h] [D] = p[h] [n] V [n, D] for HS weight rows p[h] (each V row loaded once for all of them).
template <int HS>
inline void weighted_values_rows(const float* const* p, int64_t n, const float* V, int64_t D, float* const* o) {
  int64_t e = 0;
  for (; e + 2 * LANES <= D; e += 2 * LANES) weighted_values_tile<HS, 2>(p, n, V, D, e, o);
  for (; e < D; e += LANES) weighted_values_tile<HS, 1>(p, n, V, D, e, o);
}

template <int HS>
inline void weighted_values_heads(const float* p, int64_t n, const float* V, int64_t D, float* o) {
  const float* ps[HS];
  float* os[HS];
  for (int h = 0; h < HS; ++h) ps[h] = p + h * n, os[h] = o + h * D;
  weighted_values_rows<HS>(ps, n, V, D, os);
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

// One layer's attention geometry: H query heads, Hkv kv heads, G = H / Hkv query heads per kv head, head width D,
// a qkv row QKV floats wide (q heads, then k, then v), S cache positions.
struct AttentionShape {
  int64_t H, Hkv, G, D, QKV, S;
};

// Rows b = 0 .. B - 1 (q in qkv [B, QKV]) attend to their slot's positions 0 .. pos[b] of one layer's K / V cache
// kc / vc ([rows, Hkv, S, D] each) -> out [B, H, D]. One task per (row, kv head): its G query heads against the
// keys as one small product (tasks taken from the front and the back in turn: a prompt's rows attend to ever more
// keys, so each thread's contiguous share of tasks mixes short and long ones).
inline void attend_rows(const AttentionShape& a, int64_t B, const int64_t* pos, const int64_t* slot, const float* kc,
                        const float* vc, const float* qkv, float* out) {
  const int64_t G = a.G, D = a.D;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t tasks = B * a.Hkv;
  parallel_for(0, tasks, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> p;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = j % 2 == 0 ? j / 2 : tasks - 1 - j / 2;
      const int64_t b = i / a.Hkv, kv = i % a.Hkv, n = pos[b] + 1;
      const float* q = qkv + b * a.QKV + kv * G * D;  // the G heads reading this kv head: contiguous
      const float* K = kc + (slot[b] * a.Hkv + kv) * a.S * D;
      const float* Vv = vc + (slot[b] * a.Hkv + kv) * a.S * D;
      p.resize(G * n);
      scores(q, G, K, n, D, p.data());
      for (int64_t h = 0; h < G; ++h) {
        float* ph = p.data() + h * n;
        const float sum = softmax_scaled(ph, n, scale);
        for (int64_t t = 0; t < n; ++t) ph[t] /= sum;
      }
      weighted_values(p.data(), G, n, Vv, D, out + b * a.H * D + kv * G * D);
    }
  });
}

#if CLRT_AVX512 || CLRT_AVX2
constexpr int SCORE_VECTORS = 8;   // query vectors scored together against each key tile
constexpr int64_t PROMPT_QUERIES = 16;  // query vectors (rows x the G heads of a kv head) per task, about

// Keys 0 .. n - 1 (K [n, D]) -> kt [tiles][D][LANES], key t at tile t / LANES, lane t % LANES (zeros past n).
inline void transpose_keys(const float* K, int64_t n, int64_t D, float* kt) {
  const int64_t tiles = (n + LANES - 1) / LANES;
  std::fill(kt + (n / LANES) * D * LANES, kt + tiles * D * LANES, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    float* col = kt + (t / LANES) * D * LANES + t % LANES;
    for (int64_t d = 0; d < D; ++d) col[d * LANES] = K[t * D + d];
  }
}

// s[m][0 .. tiles x LANES) = q[m] . key t, M query vectors q[m] [D] against transposed key tiles (one broadcast
// FMA per query element and tile: no horizontal sums).
template <int M>
inline void scores_transposed(const float* const* q, const float* kt, int64_t tiles, int64_t D, float* const* s) {
  for (int64_t j = 0; j < tiles; ++j) {
    vec acc[M];
    for (int m = 0; m < M; ++m) acc[m] = vzero();
    const float* k = kt + j * D * LANES;
    for (int64_t d = 0; d < D; ++d) {
      const vec kd = vload(k + d * LANES);
      for (int m = 0; m < M; ++m) acc[m] = vfma(vset1(q[m][d]), kd, acc[m]);
    }
    for (int m = 0; m < M; ++m) vstore(s[m] + j * LANES, acc[m]);
  }
}

template <int M>
struct ScoresTransposed {
  static void run(const float* const* q, const float* kt, int64_t tiles, int64_t D, float* const* s) {
    scores_transposed<M>(q, kt, tiles, D, s);
  }
};

template <int HS>
struct WeightedValues {
  static void run(const float* const* p, int64_t n, const float* V, int64_t D, float* const* o) {
    weighted_values_rows<HS>(p, n, V, D, o);
  }
};

// F<1> .. F<N>::run(args...) by a count known at run time (1 <= m <= N, N <= 8; the std::min keeps the cases past
// N from instantiating F above N).
template <int N, template <int> class F, class... Args>
inline void by_count(int m, Args... args) {
  switch (std::min(m, N)) {
    case 1: F<1>::run(args...); break;
    case 2: F<std::min(2, N)>::run(args...); break;
    case 3: F<std::min(3, N)>::run(args...); break;
    case 4: F<std::min(4, N)>::run(args...); break;
    case 5: F<std::min(5, N)>::run(args...); break;
    case 6: F<std::min(6, N)>::run(args...); break;
    case 7: F<std::min(7, N)>::run(args...); break;
    default: F<N>::run(args...); break;
  }
}

// attend_rows' result for a prompt's rows, faster and in another summation order (logits within fp32 rounding of
// attend_rows', not bitwise: not for rows whose logits must equal decode steps'). Rows of one slot at consecutive
// positions form a block; per block and kv head the keys 0 .. (its last position) are transposed once, then each
// task (kv head, a few consecutive rows: their G heads each) scores SCORE_VECTORS query vectors against each key
// tile at once, and weights the V rows loaded once for four of them. Scores past a row's position are computed
// and then zeroed (rows of a task differ by a few positions). A head_dim that is not whole vectors: attend_rows.
inline void attend_prompt(const AttentionShape& a, int64_t B, const int64_t* pos, const int64_t* slot,
                          const float* kc, const float* vc, const float* qkv, float* out) {
  if (a.D % LANES != 0) {  // (weighted_values_rows takes whole vectors of a head)
    attend_rows(a, B, pos, slot, kc, vc, qkv, out);
    return;
  }
  const int64_t G = a.G, D = a.D, Hkv = a.Hkv;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t rows_per_task = std::max<int64_t>(1, PROMPT_QUERIES / G);
  std::vector<float> kt;
  for (int64_t r0 = 0; r0 < B;) {
    int64_t r1 = r0 + 1;
    while (r1 < B && slot[r1] == slot[r0] && pos[r1] == pos[r1 - 1] + 1) ++r1;
    const int64_t keys = pos[r1 - 1] + 1, tiles = (keys + LANES - 1) / LANES, per_kv = tiles * D * LANES;
    kt.resize(Hkv * per_kv);
    parallel_for(0, Hkv, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t kv = k0; kv < k1; ++kv)
        transpose_keys(kc + (slot[r0] * Hkv + kv) * a.S * D, keys, D, kt.data() + kv * per_kv);
    });
    const int64_t chunks = (r1 - r0 + rows_per_task - 1) / rows_per_task, tasks = Hkv * chunks;
    parallel_for(0, tasks, 1, [&](int64_t j0, int64_t j1) {
      std::vector<float> s;
      std::vector<const float*> q;
      std::vector<float*> srow, orow;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t i = j % 2 == 0 ? j / 2 : tasks - 1 - j / 2;  // (front and back in turn, as attend_rows)
        const int64_t kv = i % Hkv, c = i / Hkv;
        const int64_t b0 = r0 + c * rows_per_task, b1 = std::min(r1, b0 + rows_per_task);
        const int64_t n = pos[b1 - 1] + 1, nt = (n + LANES - 1) / LANES, width = nt * LANES, M = (b1 - b0) * G;
        s.resize(M * width);
        q.clear(), srow.clear(), orow.clear();
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t h = 0; h < G; ++h) {
            q.push_back(qkv + b * a.QKV + (kv * G + h) * D);
            srow.push_back(s.data() + srow.size() * width);
            orow.push_back(out + b * a.H * D + (kv * G + h) * D);
          }
        const float* ktv = kt.data() + kv * per_kv;
        for (int64_t m = 0; m < M; m += SCORE_VECTORS)
          by_count<SCORE_VECTORS, ScoresTransposed>(static_cast<int>(M - m), q.data() + m, ktv, nt, D,
                                                    srow.data() + m);
        for (int64_t m = 0; m < M; ++m) {
          float* ph = srow[m];
          const int64_t own = pos[b0 + m / G] + 1;
          const float sum = softmax_scaled(ph, own, scale);
          for (int64_t t = 0; t < own; ++t) ph[t] /= sum;
          std::fill(ph + own, ph + n, 0.f);
        }
        const float* Vv = vc + (slot[r0] * Hkv + kv) * a.S * D;
        for (int64_t m = 0; m < M; m += 4)
          by_count<4, WeightedValues>(static_cast<int>(M - m), srow.data() + m, n, Vv, D, orow.data() + m);
      }
    });
    r0 = r1;
  }
}
#else
inline void attend_prompt(const AttentionShape& a, int64_t B, const int64_t* pos, const int64_t* slot,
                          const float* kc, const float* vc, const float* qkv, float* out) {
  attend_rows(a, B, pos, slot, kc, vc, qkv, out);
}
#endif

}  // namespace clrt
