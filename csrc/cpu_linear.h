// The projections of the native CPU kernels: out [M, N] = x [M, K] W^T, fp32 activations and accumulation,
// W [N, K] dense fp32, int8 per output row, or int4 per group (formats below). Each weight vector loaded serves
// XROWS rows of x. AVX-512 intrinsics where the building machine has AVX-512 F/BW/VL (compiled with
// -march=native), else plain loops the compiler vectorizes (AVX2 or whatever the machine has). Threads come
// from torch's pool (at::parallel_for), so torch.set_num_threads governs them and nothing oversubscribes.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define CLRT_AVX512 1
#else
#define CLRT_AVX512 0
#endif

namespace clrt {

constexpr int64_t CHUNK = 32;  // int4: 32 weights per 16 bytes (byte j: k = j low nibble, k = 16 + j high)
constexpr int64_t ROWS = 4;    // weight rows per block: independent accumulators, one x load for all
#ifndef CLRT_PREFETCH
#define CLRT_PREFETCH 4096
#endif
constexpr int64_t PREFETCH = CLRT_PREFETCH;  // bytes ahead in a weight row to request (DRAM latency cover)

enum Kind : int64_t { DENSE = 0, INT8 = 1, INT4 = 2 };

// One projection W [N, K] in one of the formats:
//   DENSE: w fp32 [N, K]
//   INT8:  w int8 [N, K], scale fp32 [N]                   W[n, k] = w[n, k] * scale[n]
//   INT4:  w uint8 [N, K / 2] in CHUNK order, scale and zs fp32 [N, K / group], levels fp32 [16]
//          W[n, k] = levels[q[n, k]] * scale[n, g] - zs[n, g], g = k / group (zs = zero * scale);
//          levels 0 .. 15 (int4) unless given (NF4: its codebook), zs 0 when empty (NF4: absmax scales only)
struct Linear {
  int64_t kind = DENSE, N = 0, K = 0, group = 0;
  torch::Tensor w, scale, zs, levels;
  int64_t ldo = 0;  // out's row stride when this is one part of a wider output (0: N, the output its own)

  const float* zs_or_null() const { return zs.defined() && zs.numel() ? zs.data_ptr<float>() : nullptr; }
  const float* levels_or_null() const { return levels.defined() && levels.numel() ? levels.data_ptr<float>() : nullptr; }
};

inline void check(bool ok, const std::string& what) { TORCH_CHECK(ok, "codellama_rt native CPU kernels: ", what); }

inline void check_f32(const torch::Tensor& t, const char* name, int64_t dim) {
  check(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == dim && t.is_contiguous(),
        std::string(name) + " must be a contiguous fp32 CPU tensor of " + std::to_string(dim) + " dims");
}

inline Linear make_linear(int64_t kind, torch::Tensor w, torch::Tensor scale, torch::Tensor zs, int64_t N, int64_t K,
                          int64_t group, torch::Tensor levels = {}) {
  Linear l{kind, N, K, group, w, scale, zs, levels};
  check(w.device().is_cpu() && w.is_contiguous(), "weight must be a contiguous CPU tensor");
  if (kind == DENSE) {
    check_f32(w, "dense weight", 2);
    check(w.size(0) == N && w.size(1) == K, "dense weight shape");
  } else if (kind == INT8) {
    check(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.size(0) == N && w.size(1) == K, "int8 weight [N, K]");
    check_f32(scale, "int8 scale", 1);
    check(scale.size(0) == N, "int8 scale [N]");
  } else if (kind == INT4) {
    check(K % CHUNK == 0 && group % CHUNK == 0 && group > 0 && K % group == 0, "int4 K and group multiples of 32");
    check(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.size(0) == N && w.size(1) == K / 2,
          "int4 weight uint8 [N, K / 2]");
    check_f32(scale, "int4 scale", 2);
    check(scale.size(0) == N && scale.size(1) == K / group, "int4 scale [N, K/g]");
    if (l.zs_or_null()) {
      check_f32(zs, "int4 zs", 2);
      check(zs.sizes() == scale.sizes(), "int4 zs [N, K/g] (or empty: no zero points)");
    }
    if (l.levels_or_null()) {
      check_f32(levels, "int4 levels", 1);
      check(levels.size(0) == 16, "int4 levels [16] (or empty: 0 .. 15)");
    }
  } else {
    check(false, "unknown weight kind " + std::to_string(kind));
  }
  return l;
}

// ---- R weight rows against one x row: o[r] = sum_k x[k] W[r][k] ------------------------------------------

#if CLRT_AVX512

inline __m512 load_i8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }

inline __m512 load_i8(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// The 16 lane sums of v[0..15] as one vector (lane i: the sum of v[i]'s lanes), by a transposing tree: pairs
// added within 128-bit lanes, then across them. About 45 instructions for 16 sums, where 16 separate
// reductions take ~150; every sum is added in the same order, whichever lane it lands in.
inline __m512 reduce16(const __m512* v) {
  __m512 q[4];
  for (int g = 0; g < 4; ++g) {
    const __m512* w = v + 4 * g;
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    q[g] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  }  // q[g]: in 128-bit lane j, the lane-j partial sums of v[4g .. 4g + 3]
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], 0x44), _mm512_shuffle_f32x4(q[0], q[1], 0xEE));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], 0x44), _mm512_shuffle_f32x4(q[2], q[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

// The lane sum of one vector in reduce16's order (so a sum is the same bits whichever way it was reduced).
inline float reduce1(__m512 v) {
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));              // x0 + x2, x1 + x3 in each 128-bit lane
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));              // (x0 + x2) + (x1 + x3)
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));        // L0 + L2, L1 + L3
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));        // (L0 + L2) + (L1 + L3)
  return _mm512_cvtss_f32(v);
}

// o[0 .. n - 1] = the lane sums of v[0 .. n - 1]: 16 at a time by reduce16 (the last group padded with zeros),
// fewer than 8 one by one.
inline void reduce_into(const __m512* v, int n, float* o) {
  if (n < 8) {
    for (int i = 0; i < n; ++i) o[i] = reduce1(v[i]);
    return;
  }
  for (int i = 0; i < n; i += 16) {
    __m512 group[16];
    const int k = std::min(16, n - i);
    for (int j = 0; j < 16; ++j) group[j] = j < k ? v[i + j] : _mm512_setzero_ps();
    const __m512 sums = reduce16(group);
    if (k == 16) {
      _mm512_storeu_ps(o + i, sums);
    } else {
      _mm512_mask_storeu_ps(o + i, static_cast<__mmask16>((1u << k) - 1), sums);
    }
  }
}

// Keeps v in a register: without this the compiler folds the x loads into every FMA as memory operands, one
// load per FMA (M x R per step instead of M + R), and the loads, not the FMAs, set the pace.
inline void in_register(__m512& v) { asm("" : "+v"(v)); }

// M x rows (stride K) against R weight rows: o[m * R + r] = sum_k x[m][k] W[r][k]. Each weight vector loaded
// (and, for int8 / int4, converted) once serves all M rows: M x R independent accumulators.
template <int R, int M>
inline void dense_dot(const float* x, const float* w, int64_t K, float* o) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {  // a cache line of each row per step
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + PREFETCH, _MM_HINT_T0);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) in_register(xv[m] = _mm512_loadu_ps(x + m * K + k));
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * K + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + r * K + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  reduce_into(&acc[0][0], M * R, o);
}

template <int R, int M>
inline void int8_dot(const float* x, const int8_t* w, int64_t K, float* o) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  auto step = [&](int64_t k) {
    __m512 xv[M];
    for (int m = 0; m < M; ++m) in_register(xv[m] = _mm512_loadu_ps(x + m * K + k));
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load_i8(w + r * K + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  };
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {  // a cache line of each row per step, the lines PREFETCH bytes ahead requested
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + PREFETCH), _MM_HINT_T0);
    for (int j = 0; j < 64; j += 16) step(k + j);
  }
  for (; k + 16 <= K; k += 16) step(k);
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load_i8(w + r * K + k, mask);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  reduce_into(&acc[0][0], M * R, o);
}

// int4 rows (K / 2 bytes each, CHUNK order): o[r] = sum_k W[r][k] x[k] with W = levels[q] s - zs. Per group a
// 16-entry table of the dequantized values (levels[k] s - zs, k = 0..15) in a register; vpermps looks each code
// up (it reads an index's low 4 bits only, so the low nibble needs no mask). Z null: no zero points; L null:
// levels 0 .. 15.
template <int R, int M>
inline void int4_dot(const float* x, const uint8_t* w, int64_t K, int64_t group, const float* S, const float* Z,
                     const float* L, float* o) {
  const int64_t G = K / group, chunks = group / CHUNK, rowbytes = K / 2;
  const __m512 iota = L ? _mm512_loadu_ps(L) : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  constexpr int A = 2;  // two accumulators per output, so the FMA chains interleave (and every M sums alike)
  __m512 acc[M][R][A];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < A; ++a) acc[m][r][a] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 table[R];
    for (int r = 0; r < R; ++r)
      table[r] = _mm512_fmsub_ps(iota, _mm512_set1_ps(S[r * G + g]), _mm512_set1_ps(Z ? Z[r * G + g] : 0.f));
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      if ((c & 3) == 0)  // four chunks per cache line
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * rowbytes + c * (CHUNK / 2) + PREFETCH), _MM_HINT_T0);
      __m512 x0[M], x1[M];
      for (int m = 0; m < M; ++m) {
        in_register(x0[m] = _mm512_loadu_ps(x + m * K + c * CHUNK));
        in_register(x1[m] = _mm512_loadu_ps(x + m * K + c * CHUNK + 16));
      }
      for (int r = 0; r < R; ++r) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + r * rowbytes + c * (CHUNK / 2))));
        const __m512 w0 = _mm512_permutexvar_ps(q, table[r]), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table[r]);
        for (int m = 0; m < M; ++m) {
          acc[m][r][0] = _mm512_fmadd_ps(w0, x0[m], acc[m][r][0]);
          acc[m][r][1] = _mm512_fmadd_ps(w1, x1[m], acc[m][r][1]);
        }
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r)
      o[m * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][r][0], acc[m][r][1]));
}

#else  // plain loops

template <int R, class T>
inline void plain_dot(const float* x, const T* w, int64_t K, float* o) {
  for (int r = 0; r < R; ++r) {
    const T* wr = w + r * K;
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t k = 0; k < K; ++k) a += x[k] * static_cast<float>(wr[k]);
    o[r] = a;
  }
}

// (M rows: one after the other; the compiler vectorizes each over K.)
template <int R, int M>
inline void dense_dot(const float* x, const float* w, int64_t K, float* o) {
  for (int m = 0; m < M; ++m) plain_dot<R>(x + m * K, w, K, o + m * R);
}

template <int R, int M>
inline void int8_dot(const float* x, const int8_t* w, int64_t K, float* o) {
  for (int m = 0; m < M; ++m) plain_dot<R>(x + m * K, w, K, o + m * R);
}

// int4 rows: sum_g (s sum_{k in g} levels[q] x - zs sum_{k in g} x), per-lane sums scaled group by group (one
// reduction per row, not per group).
template <int R>
inline void int4_row_dot(const float* x, const uint8_t* w, int64_t K, int64_t group, const float* S, const float* Z,
                         const float* L, float* o) {
  const int64_t G = K / group, chunks = group / CHUNK, rowbytes = K / 2;
  float lv[16];
  for (int j = 0; j < 16; ++j) lv[j] = L ? L[j] : static_cast<float>(j);
  for (int r = 0; r < R; ++r) {
    const uint8_t* wr = w + r * rowbytes;
    float lanes[16] = {0.f};
    for (int64_t g = 0; g < G; ++g) {
      float part[16] = {0.f}, xs[16] = {0.f};
      for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
        const uint8_t* b = wr + c * (CHUNK / 2);
        const float* xc = x + c * CHUNK;
#pragma omp simd
        for (int j = 0; j < 16; ++j) {
          part[j] += xc[j] * lv[b[j] & 15] + xc[16 + j] * lv[b[j] >> 4];
          xs[j] += xc[j] + xc[16 + j];
        }
      }
      const float s = S[r * G + g], z = Z ? Z[r * G + g] : 0.f;
#pragma omp simd
      for (int j = 0; j < 16; ++j) lanes[j] += s * part[j] - z * xs[j];
    }
    float a = 0.f;
    for (int j = 0; j < 16; ++j) a += lanes[j];
    o[r] = a;
  }
}

template <int R, int M>
inline void int4_dot(const float* x, const uint8_t* w, int64_t K, int64_t group, const float* S, const float* Z,
                     const float* L, float* o) {
  for (int m = 0; m < M; ++m) int4_row_dot<R>(x + m * K, w, K, group, S, Z, L, o + m * R);
}

#endif

constexpr int XROWS = 6;  // x rows per kernel call: XROWS x ROWS accumulators in registers (int4: 2, two each)

// Weight rows n .. n + R - 1 against x rows m0 .. m0 + M - 1 (M x R outputs of `out`).
template <int R, int M>
inline void tile(const Linear& l, const float* x, int64_t m0, int64_t n, float* out) {
  const int64_t K = l.K, ldo = l.ldo ? l.ldo : l.N;
  float o[M * R];
  const float* xm = x + m0 * K;
  if (l.kind == DENSE) {
    dense_dot<R, M>(xm, l.w.data_ptr<float>() + n * K, K, o);
  } else if (l.kind == INT8) {
    int8_dot<R, M>(xm, l.w.data_ptr<int8_t>() + n * K, K, o);
    const float* S = l.scale.data_ptr<float>() + n;
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) o[m * R + r] *= S[r];
  } else {
    const int64_t G = K / l.group;
    const float* Z = l.zs_or_null();
    int4_dot<R, M>(xm, l.w.data_ptr<uint8_t>() + n * (K / 2), K, l.group, l.scale.data_ptr<float>() + n * G,
                   Z ? Z + n * G : nullptr, l.levels_or_null(), o);
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[(m0 + m) * ldo + n + r] = o[m * R + r];
}

// Weight rows n .. n + R - 1 against every x row, XROWS x rows at a time.
// A row's outputs never depend on M or on the other rows (the same sums in the same order), so a verify pass
// scores each token exactly as a decode step would.
template <int R>
inline void rows_block(const Linear& l, const float* x, int64_t M, int64_t n, float* out) {
  int64_t m = 0;
  if (l.kind == INT4) {
    for (; m + 2 <= M; m += 2) tile<R, 2>(l, x, m, n, out);
  } else {
    for (; m + XROWS <= M; m += XROWS) tile<R, XROWS>(l, x, m, n, out);
  }
  switch (M - m) {
    case 5: tile<R, 5>(l, x, m, n, out); break;
    case 4: tile<R, 4>(l, x, m, n, out); break;
    case 3: tile<R, 3>(l, x, m, n, out); break;
    case 2: tile<R, 2>(l, x, m, n, out); break;
    case 1: tile<R, 1>(l, x, m, n, out); break;
    default: break;
  }
}

// Blocks of ROWS output rows per task: at least ~16K weights each, so a small projection is not split
// into tasks costing more to hand out than to run.
inline int64_t grain_blocks(int64_t K) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(K * ROWS, 1)); }

// out [M, N] = x [M, K] W^T (rows of out ldo apart where l.ldo is set).
inline void apply(const Linear& l, const float* x, int64_t M, float* out) {
  const int64_t blocks = (l.N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, grain_blocks(l.K), [&](int64_t b0, int64_t b1) {
    const int64_t n1 = std::min(l.N, b1 * ROWS);
    int64_t n = b0 * ROWS;
    for (; n + ROWS <= n1; n += ROWS) rows_block<ROWS>(l, x, M, n, out);
    for (; n < n1; ++n) rows_block<1>(l, x, M, n, out);
  });
}

inline bool avx512() { return CLRT_AVX512; }

}  // namespace clrt
