// Prompt rows of a projection as a packed GEMM: out [M, N] = x [M, K] W^T with W (any format of
// cpu_linear_base.h) dequantized to fp32 and packed per call, KC inputs x NR outputs at a time, into a panel the
// micro-kernel reads in order: MR rows x NR outputs accumulate in registers, one broadcast of x per row and NR / LANES
// weight loads per input. The decode tiles (cpu_linear.h) instead sum each output as lane partial sums reduced at
// the end, so that a row's outputs do not depend on how many rows share its step; this kernel sums in another
// order, so it serves a prompt's rows only (a verify pass must score its tokens exactly as decode steps do). A row's
// outputs here do not depend on the other rows either: a prompt split into chunks (of >= GEMM_MIN_ROWS rows) gets
// the same bits.
#pragma once

#include "cpu_linear.h"

#include <cstring>
#include <vector>

namespace clrt {

// levels[q] * s - z per code of the chunks of one int4 weight row from k0 to k1 (multiples of CHUNK): one
// rounding with a zero point (an FMA), the product's own without (NF4: bitsandbytes' code * absmax).
inline void dequantize_int4_row(const Linear& l, int64_t n, int64_t k0, int64_t k1, float* out) {
  const uint8_t* W = static_cast<const uint8_t*>(l.w_p) + n * (l.K / 2);
  const int64_t G = l.K / l.group;
  float lv[16];
  for (int j = 0; j < 16; ++j) lv[j] = l.levels_p ? l.levels_p[j] : static_cast<float>(j);
  for (int64_t c = k0 / CHUNK; c < k1 / CHUNK; ++c) {
    const uint8_t* b = W + c * (CHUNK / 2);
    const float s = l.scale_p[n * G + c * CHUNK / l.group];
    float* o = out + c * CHUNK - k0;
    if (l.zs_p) {
      const float z = l.zs_p[n * G + c * CHUNK / l.group];
#pragma omp simd
      for (int j = 0; j < 16; ++j) {
        o[j] = lv[b[j] & 15] * s - z;
        o[16 + j] = lv[b[j] >> 4] * s - z;
      }
    } else {
#pragma omp simd
      for (int j = 0; j < 16; ++j) {
        o[j] = lv[b[j] & 15] * s;
        o[16 + j] = lv[b[j] >> 4] * s;
      }
    }
  }
}

// W[n, k0 .. k1) in fp32, whatever the format (int4: k0, k1 multiples of CHUNK).
inline void dequantize_row(const Linear& l, int64_t n, int64_t k0, int64_t k1, float* out) {
  if (l.kind == DENSE) {
    const float* w = static_cast<const float*>(l.w_p) + n * l.K;
    std::copy(w + k0, w + k1, out);
  } else if (l.kind == INT8 || l.kind == INT8_X16) {
    const int8_t* w = static_cast<const int8_t*>(l.w_p) + n * l.K;
    const float s = l.scale_p[n];
#pragma omp simd
    for (int64_t k = k0; k < k1; ++k) out[k - k0] = static_cast<float>(w[k]) * s;
  } else {
    dequantize_int4_row(l, n, k0, k1, out);
  }
}

#if CLRT_AVX512 || CLRT_AVX2
constexpr bool HAS_GEMM = true;
#if CLRT_AVX512
using vec = __m512;
constexpr int LANES = 16, NV = 4;  // 6 x 4 accumulators + 4 weight vectors + a broadcast of 32 registers
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vset1(float v) { return _mm512_set1_ps(v); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
#else
using vec = __m256;
constexpr int LANES = 8, NV = 2;  // 6 x 2 accumulators + 2 weight vectors + a broadcast of 16 registers
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vset1(float v) { return _mm256_set1_ps(v); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
#endif
constexpr int MR = 6, NR = NV * LANES;
constexpr int64_t KC = 256;  // inputs per packed panel: KC x NR floats (64 KiB on AVX-512) stay in L2

// c [R, NR] = x [R, kk] (rows ldx apart) times the packed panel p [kk, NR].
template <int R>
inline void gemm_micro(const float* x, int64_t ldx, const float* p, int64_t kk, float* c) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = vzero();
  for (int64_t k = 0; k < kk; ++k) {
    vec w[NV];
    for (int j = 0; j < NV; ++j) w[j] = vload(p + k * NR + j * LANES);
    for (int r = 0; r < R; ++r) {
      const vec a = vset1(x[r * ldx + k]);
      for (int j = 0; j < NV; ++j) acc[r][j] = vfma(a, w[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) vstore(c + r * NR + j * LANES, acc[r][j]);
}

inline void gemm_rows(int rows, const float* x, int64_t ldx, const float* p, int64_t kk, float* c) {
  switch (rows) {
    case 1: gemm_micro<1>(x, ldx, p, kk, c); break;
    case 2: gemm_micro<2>(x, ldx, p, kk, c); break;
    case 3: gemm_micro<3>(x, ldx, p, kk, c); break;
    case 4: gemm_micro<4>(x, ldx, p, kk, c); break;
    case 5: gemm_micro<5>(x, ldx, p, kk, c); break;
    default: gemm_micro<MR>(x, ldx, p, kk, c); break;
  }
}

// out [M, N] (rows l.ldo apart where set) = x [M, K] W^T, in parallel over panels of NR outputs.
inline void gemm(const Linear& l, const float* x, int64_t M, float* out) {
  const int64_t K = l.K, N = l.N, ldo = l.ldo ? l.ldo : l.N, panels = (N + NR - 1) / NR;
  parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> pack(KC * NR), row(KC), c(MR * NR);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * NR, nn = std::min<int64_t>(NR, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kk = std::min(KC, K - k0);
        for (int64_t j = 0; j < NR; ++j) {  // the panel: column j is weight row n0 + j (zeros past N)
          const float* src = row.data();
          if (j < nn && l.kind == DENSE) {
            src = static_cast<const float*>(l.w_p) + (n0 + j) * K + k0;
          } else if (j < nn) {
            dequantize_row(l, n0 + j, k0, k0 + kk, row.data());
          }
          for (int64_t k = 0; k < kk; ++k) pack[k * NR + j] = j < nn ? src[k] : 0.f;
        }
        for (int64_t m = 0; m < M; m += MR) {
          const int rows = static_cast<int>(std::min<int64_t>(MR, M - m));
          gemm_rows(rows, x + m * K + k0, K, pack.data(), kk, c.data());
          for (int r = 0; r < rows; ++r) {
            float* o = out + (m + r) * ldo + n0;
            const float* cr = c.data() + r * NR;
            if (k0 == 0) {
              std::copy(cr, cr + nn, o);
            } else {
              for (int64_t j = 0; j < nn; ++j) o[j] += cr[j];
            }
          }
        }
      }
    }
  });
}
#else
constexpr bool HAS_GEMM = false;
inline void gemm(const Linear& l, const float* x, int64_t M, float* out) { apply(l, x, M, out); }
#endif

// bf16 (AVX512-BF16's vdpbf16ps: two products a lane per instruction, twice the fp32 FMA's rate): as gemm, with
// the activations and the dequantized weights rounded to bf16 (to nearest even), sums in fp32 (the torch path's
// cpu_bf16_prefill for quantized weights). Where the CPU lacks it, gemm.
#if CLRT_AVX512 && defined(__AVX512BF16__)
constexpr bool HAS_GEMM_BF16 = true;

inline uint32_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;  // NaN stays NaN
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

inline uint32_t bf16_pair(float lo, float hi) { return bf16_bits(hi) << 16 | bf16_bits(lo); }

// c [R, NR] = x [R, 2 kp] (bf16 pairs, rows ldx pairs apart) times the packed panel p [kp, NR] of bf16 pairs.
template <int R>
inline void gemm_micro_bf16(const uint32_t* x, int64_t ldx, const uint32_t* p, int64_t kp, float* c) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    __m512bh w[NV];
    for (int j = 0; j < NV; ++j) w[j] = (__m512bh)_mm512_loadu_si512(p + k * NR + j * LANES);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + k]));
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, w[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + r * NR + j * LANES, acc[r][j]);
}

inline void gemm_rows_bf16(int rows, const uint32_t* x, int64_t ldx, const uint32_t* p, int64_t kp, float* c) {
  switch (rows) {
    case 1: gemm_micro_bf16<1>(x, ldx, p, kp, c); break;
    case 2: gemm_micro_bf16<2>(x, ldx, p, kp, c); break;
    case 3: gemm_micro_bf16<3>(x, ldx, p, kp, c); break;
    case 4: gemm_micro_bf16<4>(x, ldx, p, kp, c); break;
    case 5: gemm_micro_bf16<5>(x, ldx, p, kp, c); break;
    default: gemm_micro_bf16<MR>(x, ldx, p, kp, c); break;
  }
}

inline void gemm_bf16(const Linear& l, const float* x, int64_t M, float* out) {
  const int64_t K = l.K, N = l.N, ldo = l.ldo ? l.ldo : l.N, panels = (N + NR - 1) / NR, Kh = (K + 1) / 2;
  std::vector<uint32_t> xb(M * Kh);  // x in bf16 pairs (a zero past an odd K)
  parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t q = 0; q < Kh; ++q)
        xb[m * Kh + q] = bf16_pair(x[m * K + 2 * q], 2 * q + 1 < K ? x[m * K + 2 * q + 1] : 0.f);
  });
  parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint32_t> pack(KC / 2 * NR);
    std::vector<float> row(KC + 1), c(MR * NR);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * NR, nn = std::min<int64_t>(NR, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {  // (KC even: a block starts on a pair)
        const int64_t kk = std::min(KC, K - k0), kp = (kk + 1) / 2;
        for (int64_t j = 0; j < NR; ++j) {  // the panel: column j is weight row n0 + j (zeros past N)
          if (j < nn) {
            dequantize_row(l, n0 + j, k0, k0 + kk, row.data());
          } else {
            std::fill(row.begin(), row.begin() + kk, 0.f);
          }
          row[kk] = 0.f;
          for (int64_t q = 0; q < kp; ++q) pack[q * NR + j] = bf16_pair(row[2 * q], row[2 * q + 1]);
        }
        for (int64_t m = 0; m < M; m += MR) {
          const int rows = static_cast<int>(std::min<int64_t>(MR, M - m));
          gemm_rows_bf16(rows, xb.data() + m * Kh + k0 / 2, Kh, pack.data(), kp, c.data());
          for (int r = 0; r < rows; ++r) {
            float* o = out + (m + r) * ldo + n0;
            const float* cr = c.data() + r * NR;
            if (k0 == 0) {
              std::copy(cr, cr + nn, o);
            } else {
              for (int64_t j = 0; j < nn; ++j) o[j] += cr[j];
            }
          }
        }
      }
    }
  });
}
#else
constexpr bool HAS_GEMM_BF16 = false;
inline void gemm_bf16(const Linear& l, const float* x, int64_t M, float* out) { gemm(l, x, M, out); }
#endif

}  // namespace clrt
