// The projections' inner products as plain loops the compiler vectorizes (included by cpu_linear.h where
// the building machine has neither AVX-512 nor AVX2 + FMA, e.g. ARM).
#pragma once

#include "cpu_linear_base.h"
#include "dot_int_scalar.h"

namespace clrt {

constexpr int XROWS = 6;       // x rows per tile: XROWS x ROWS accumulators in registers
constexpr int INT4_XROWS = 2;  // (int4: two accumulators per output)
constexpr bool DENSE_ROW_AT_A_TIME = false;  // (see dot_avx2.h)


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


}  // namespace clrt
