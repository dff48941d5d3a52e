// The projections' inner products with AVX-512 intrinsics (included by cpu_linear.h where the building
// machine has AVX-512 F/BW/VL).
#pragma once

#include "cpu_linear_base.h"
#include "dot_int_scalar.h"

namespace clrt {

constexpr int XROWS = 6;       // x rows per tile: XROWS x ROWS accumulators in registers
constexpr int INT4_XROWS = 2;  // (int4: two accumulators per output)
// (see dot_avx2.h): on a Zen 4 EPYC the fp32 decode step took 0.80-1.00 ms instead of 1.25-1.55 (7.7M model) and
// 6.0-6.1 ms instead of 7.5-7.9 (~57M), the same logits
constexpr bool DENSE_ROW_AT_A_TIME = true;

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
// Through a local copy: with the array element itself bound to the asm, GCC 12 kept the whole tile (the x vectors
// and every accumulator) in memory as well, storing all of them each step (30 stores per 24 FMAs in dense_dot<4, 6>);
// 9-row steps then ran 1.2-1.7x slower (int8 most). The same instructions otherwise, so the same sums.
inline void in_register(__m512& v) {
  __m512 t = v;
  asm("" : "+v"(t));
  v = t;
}

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

}  // namespace clrt
