// The projections of the native CPU kernels: out [M, N] = x [M, K] W^T, fp32 activations and accumulation,
// W [N, K] dense fp32, int8 per output row, or int4 per group (formats: cpu_linear_base.h). Each weight vector
// loaded serves several rows of x. The inner products come from dot_avx512.h (AVX-512 F/BW/VL), dot_avx2.h
// (AVX2 + FMA) or dot_plain.h (loops the compiler vectorizes), by what the building machine has (compiled with
// -march=native). Threads come from parallel_for (cpu_linear_base.h): torch's pool in the torch extension, so
// torch.set_num_threads governs them and nothing oversubscribes; OpenMP's in the lite library.
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
  if (M == 1 && R > 1 && (l.one_row || (DENSE_ROW_AT_A_TIME && l.kind == DENSE))) {  // (the sums of one R-row tile)
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
  parallel_for(0, blocks, grain_blocks(l.K), [&](int64_t b0, int64_t b1) {
    const int64_t n1 = std::min(l.N, b1 * ROWS);
    int64_t n = b0 * ROWS;
    for (; n + ROWS <= n1; n += ROWS) rows(std::integral_constant<int, ROWS>{}, n);
    for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
  });
}

// The x rows rounded to integers for INT8_X16 (int16, blocks of X16_BLOCK) or INT4_X8 (int8, blocks of X8_BLOCK):
// codes [M, Kp], their blocks' scales sx, and for INT4_X8 with zero points each row's rounded x summed over each
// group, xz [M, K / group] (sum over the group's blocks of sx times the exact integer sum).
struct IntRows {
  int64_t Kp = 0;
  std::vector<int16_t> q16;
  std::vector<int8_t> q8;
  std::vector<float> sx, xz;

  IntRows(const Linear& l, const float* x, int64_t M) {
    if (l.kind == INT8_X16) {
      Kp = blocks_width<X16_BLOCK>(l.K);
      q16.resize(M * Kp), sx.resize(M * (Kp / X16_BLOCK));
      quantize_x16(x, M, l.K, q16.data(), sx.data());
      return;
    }
    Kp = blocks_width<X8_BLOCK>(l.K);  // (K itself: int4 rows are whole chunks, CHUNK == X8_BLOCK)
    q8.resize(M * Kp), sx.resize(M * (Kp / X8_BLOCK));
    quantize_x8(x, M, l.K, q8.data(), sx.data());
    if (!l.zs_p) return;
    const int64_t G = l.K / l.group, nb = Kp / X8_BLOCK;
    xz.assign(M * G, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        int32_t sum = 0;
        for (int64_t k = b * X8_BLOCK; k < (b + 1) * X8_BLOCK; ++k) sum += q8[m * Kp + k];
        xz[m * G + b * X8_BLOCK / l.group] += static_cast<float>(sum) * sx[m * nb + b];
      }
  }
};

// INT8_X16 / INT4_X8: weight rows n .. n + R - 1 against x rows m0 .. m0 + M - 1 of the rounded rows xr.
template <int R, int M>
inline void tile_int(const Linear& l, const IntRows& xr, int64_t m0, int64_t n, float* out) {
  const int64_t K = l.K, Kp = xr.Kp, ldo = l.ldo ? l.ldo : l.N;
  float o[M * R];
  if (l.kind == INT8_X16) {
    int8_x16_dot<R, M>(xr.q16.data() + m0 * Kp, xr.sx.data() + m0 * (Kp / X16_BLOCK), Kp,
                       static_cast<const int8_t*>(l.w_p) + n * K, K, o);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) o[m * R + r] *= l.scale_p[n + r];
  } else {
    const int64_t G = K / l.group;
    int4_x8_dot<R, M>(xr.q8.data() + m0 * Kp, xr.sx.data() + m0 * (Kp / X8_BLOCK),
                      static_cast<const uint8_t*>(l.w_p) + n * (K / 2), K, l.group, l.scale_p + n * G, o);
    if (!xr.xz.empty())  // less sum_g zs[r][g] xz[m][g], in group order
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) {
          const float *Z = l.zs_p + (n + r) * G, *X = xr.xz.data() + (m0 + m) * G;
          float z = 0.f;
          for (int64_t g = 0; g < G; ++g) z += Z[g] * X[g];
          o[m * R + r] -= z;
        }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[(m0 + m) * ldo + n + r] = o[m * R + r];
}

// out [M, N] = x [M, K] W^T for INT8_X16 / INT4_X8: x rounded once, then XROWS x rows a tile.
inline void apply_int(const Linear& l, const float* x, int64_t M, float* out) {
  const IntRows xr(l, x, M);
  const int xrows = l.kind == INT8_X16 ? X16_XROWS : X8_XROWS;
  for_row_blocks(l, [&](auto rows, int64_t n) {
    constexpr int R = decltype(rows)::value;
    int64_t m = 0;
    if (xrows == 2)
      for (; m + 2 <= M; m += 2) tile_int<R, 2>(l, xr, m, n, out);
    for (; m < M; ++m) tile_int<R, 1>(l, xr, m, n, out);
  });
}

// out [M, N] = x [M, K] W^T (rows of out ldo apart where l.ldo is set).
inline void apply(const Linear& l, const float* x, int64_t M, float* out) {
  if (l.kind == INT8_X16 || l.kind == INT4_X8) {
    apply_int(l, x, M, out);
    return;
  }
  for_row_blocks(l, [&](auto R, int64_t n) { rows_block<decltype(R)::value>(l, x, M, n, out); });
}

inline bool avx512() { return CLRT_AVX512; }
inline std::string isa() { return CLRT_AVX512 ? "avx512" : CLRT_AVX2 ? "avx2" : "plain"; }

}  // namespace clrt
