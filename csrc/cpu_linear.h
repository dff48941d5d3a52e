// The projections of the native CPU kernels: out [M, N] = x [M, K] W^T, fp32 activations and accumulation,
// W [N, K] dense fp32, int8 per output row, or int4 per group (formats: cpu_linear_base.h). Each weight vector
// loaded serves several rows of x. The inner products come from dot_avx512.h (AVX-512 F/BW/VL), dot_avx2.h
// (AVX2 + FMA) or dot_plain.h (loops the compiler vectorizes), by what the building machine has (compiled with
// -march=native). Threads come from torch's pool (at::parallel_for), so torch.set_num_threads governs them and
// nothing oversubscribes.
#pragma once

#include "cpu_linear_base.h"

#include <type_traits>

#if CLRT_AVX512
#include "dot_avx512.h"
#elif CLRT_AVX2
#include "dot_avx2.h"
#else
#include "dot_plain.h"
#endif

namespace clrt {

// Weight rows n .. n + R - 1 against x rows m0 .. m0 + M - 1 (M x R outputs of `out`).
template <int R, int M>
inline void tile(const Linear& l, const float* x, int64_t m0, int64_t n, float* out) {
  const int64_t K = l.K, ldo = l.ldo ? l.ldo : l.N;
  float o[M * R];
  const float* xm = x + m0 * K;
  if (l.kind == DENSE) {
    dense_dot<R, M>(xm, static_cast<const float*>(l.w_p) + n * K, K, o);
  } else if (l.kind == INT8) {
    int8_dot<R, M>(xm, static_cast<const int8_t*>(l.w_p) + n * K, K, o);
    const float* S = l.scale_p + n;
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) o[m * R + r] *= S[r];
  } else {
    const int64_t G = K / l.group;
    const float* Z = l.zs_p;
    int4_dot<R, M>(xm, static_cast<const uint8_t*>(l.w_p) + n * (K / 2), K, l.group, l.scale_p + n * G,
                   Z ? Z + n * G : nullptr, l.levels_p, o);
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[(m0 + m) * ldo + n + r] = o[m * R + r];
}

// Weight rows n .. n + R - 1 against every x row, XROWS x rows at a time.
// A row's outputs never depend on M or on the other rows (the same sums in the same order), so a verify pass
// scores each token exactly as a decode step would.
template <int R>
inline void rows_block(const Linear& l, const float* x, int64_t M, int64_t n, float* out) {
  if (DENSE_ROW_AT_A_TIME && M == 1 && R > 1 && l.kind == DENSE) {  // (the same sums as one R-row tile)
    for (int r = 0; r < R; ++r) tile<1, 1>(l, x, 0, n + r, out);
    return;
  }
  int64_t m = 0;
  if (l.kind == INT4) {
    for (; m + INT4_XROWS <= M; m += INT4_XROWS) tile<R, INT4_XROWS>(l, x, m, n, out);
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

// Every output row of the projection, in parallel blocks: rows(std::integral_constant<int, R>, n) computes
// weight rows n .. n + R - 1 (R = ROWS, or 1 for the last few) against every x row.
template <class Rows>
inline void for_row_blocks(const Linear& l, Rows rows) {
  const int64_t blocks = (l.N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, grain_blocks(l.K), [&](int64_t b0, int64_t b1) {
    const int64_t n1 = std::min(l.N, b1 * ROWS);
    int64_t n = b0 * ROWS;
    for (; n + ROWS <= n1; n += ROWS) rows(std::integral_constant<int, ROWS>{}, n);
    for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
  });
}

// INT8_X16: weight rows n .. n + R - 1 against x rows m0 .. m0 + M - 1, x rounded by quantize_x16.
template <int R, int M>
inline void tile_x16(const Linear& l, const int16_t* xq, const float* sx, int64_t m0, int64_t n, float* out) {
  const int64_t K = l.K, Kp = x16_width(K), ldo = l.ldo ? l.ldo : l.N;
  float o[M * R];
  int8_x16_dot<R, M>(xq + m0 * Kp, sx + m0 * (Kp / X16_BLOCK), Kp, static_cast<const int8_t*>(l.w_p) + n * K, K, o);
  const float* S = l.scale_p + n;
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[(m0 + m) * ldo + n + r] = o[m * R + r] * S[r];
}

// out [M, N] = x [M, K] W^T for INT8_X16: x rounded once, then X16_XROWS x rows at a time.
inline void apply_x16(const Linear& l, const float* x, int64_t M, float* out) {
  const int64_t Kp = x16_width(l.K);
  std::vector<int16_t> xq(M * Kp);
  std::vector<float> sx(M * (Kp / X16_BLOCK));
  quantize_x16(x, M, l.K, xq.data(), sx.data());
  for_row_blocks(l, [&](auto rows, int64_t n) {
    constexpr int R = decltype(rows)::value;
    int64_t m = 0;
    for (; m + X16_XROWS <= M; m += X16_XROWS) tile_x16<R, X16_XROWS>(l, xq.data(), sx.data(), m, n, out);
    for (; m < M; ++m) tile_x16<R, 1>(l, xq.data(), sx.data(), m, n, out);
  });
}

// out [M, N] = x [M, K] W^T (rows of out ldo apart where l.ldo is set).
inline void apply(const Linear& l, const float* x, int64_t M, float* out) {
  if (l.kind == INT8_X16) {
    apply_x16(l, x, M, out);
    return;
  }
  for_row_blocks(l, [&](auto R, int64_t n) { rows_block<decltype(R)::value>(l, x, M, n, out); });
}

inline bool avx512() { return CLRT_AVX512; }
inline std::string isa() { return CLRT_AVX512 ? "avx512" : CLRT_AVX2 ? "avx2" : "plain"; }

}  // namespace clrt
