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

// W[n, k0 .. k1) of an int8 or int4 weight in fp32 (int4: k0, k1 multiples of CHUNK; dense rows are read in place).
inline void dequantize_row(const Linear& l, int64_t n, int64_t k0, int64_t k1, float* out) {
  if (l.kind == INT8 || l.kind == INT8_X16) {
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

// r[i] lane c -> r[c] lane i (a 16 x 16 block of 32-bit values transposed in registers).
inline void transpose16(__m512* r) {
  __m512 t[16], s[16];
  for (int i = 0; i < 8; ++i) {  // t[2i], t[2i + 1]: rows 2i, 2i + 1 interleaved within each 128-bit lane
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // s[4i + c]: in 128-bit lane L, column 4L + c of rows 4i .. 4i + 3
    s[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of s[c], s[4 + c], s[8 + c], s[12 + c]
    const __m512 abe = _mm512_shuffle_f32x4(s[c], s[4 + c], 0x88), abo = _mm512_shuffle_f32x4(s[c], s[4 + c], 0xDD);
    const __m512 cde = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0x88);
    const __m512 cdo = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(abe, cde, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(abo, cdo, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(abe, cde, 0xDD);
    r[12 + c] = _mm512_shuffle_f32x4(abo, cdo, 0xDD);
  }
}

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1); }
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

// The micro-kernel for 1 .. MR rows.
template <class X, class P, template <int> class Micro>
inline void micro_rows(int rows, const X* x, int64_t ldx, const P* p, int64_t kk, float* c) {
  switch (rows) {
    case 1: Micro<1>::run(x, ldx, p, kk, c); break;
    case 2: Micro<2>::run(x, ldx, p, kk, c); break;
    case 3: Micro<3>::run(x, ldx, p, kk, c); break;
    case 4: Micro<4>::run(x, ldx, p, kk, c); break;
    case 5: Micro<5>::run(x, ldx, p, kk, c); break;
    default: Micro<MR>::run(x, ldx, p, kk, c); break;
  }
}

template <int R>
struct MicroF32 {
  static void run(const float* x, int64_t ldx, const float* p, int64_t kk, float* c) {
    gemm_micro<R>(x, ldx, p, kk, c);
  }
};

// rows[j]: weight row n0 + j at inputs k0 .. k0 + kk in fp32, j < NR: the weights themselves where dense,
// else dequantized into buf [NR, KC]; `zeros` (KC + 32 zeros) past N.
inline void panel_rows(const Linear& l, int64_t n0, int64_t nn, int64_t k0, int64_t kk, float* buf,
                       const float* zeros, const float** rows) {
  for (int64_t j = 0; j < NR; ++j) {
    if (j >= nn) {
      rows[j] = zeros;
    } else if (l.kind == DENSE) {
      rows[j] = static_cast<const float*>(l.w_p) + (n0 + j) * l.K + k0;
    } else {
      dequantize_row(l, n0 + j, k0, k0 + kk, buf + j * KC);
      rows[j] = buf + j * KC;
    }
  }
}

// The packed panel p [kk, NR] of the rows: p[k * NR + j] = rows[j][k].
inline void pack_f32(const float* const* rows, int64_t kk, float* p) {
#if CLRT_AVX512
  for (int64_t kb = 0; kb < kk; kb += 16) {
    const int64_t n = std::min<int64_t>(16, kk - kb);
    for (int jb = 0; jb < NR; jb += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = _mm512_maskz_loadu_ps(first_lanes(n), rows[jb + j] + kb);
      transpose16(r);
      for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(p + (kb + i) * NR + jb, r[i]);
    }
  }
#else
  for (int64_t j = 0; j < NR; ++j)
    for (int64_t k = 0; k < kk; ++k) p[k * NR + j] = rows[j][k];
#endif
}

// out [M, N] (rows l.ldo apart where set) = x [M, K] W^T, in parallel over panels of NR outputs: per panel and
// block of KC inputs, pack(rows, kk, panel) then micro(rows, m, k0, panel, kk, c) for MR rows at a time, c [MR, NR]
// added into out.
template <class P, class Pack, class Micro>
inline void gemm_panels(const Linear& l, int64_t M, float* out, int64_t panel_size, Pack pack, Micro micro) {
  const int64_t K = l.K, N = l.N, ldo = l.ldo ? l.ldo : l.N, panels = (N + NR - 1) / NR;
  parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<P> panel(panel_size);
    std::vector<float> buf(l.kind == DENSE ? 0 : NR * KC), zeros(KC + 32, 0.f), c(MR * NR);
    const float* rows[NR];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * NR, nn = std::min<int64_t>(NR, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kk = std::min(KC, K - k0);
        panel_rows(l, n0, nn, k0, kk, buf.data(), zeros.data(), rows);
        pack(rows, kk, panel.data());
        for (int64_t m = 0; m < M; m += MR) {
          const int r_count = static_cast<int>(std::min<int64_t>(MR, M - m));
          micro(r_count, m, k0, panel.data(), kk, c.data());
          for (int r = 0; r < r_count; ++r) {
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

inline void gemm(const Linear& l, const float* x, int64_t M, float* out) {
  const int64_t K = l.K;
  gemm_panels<float>(l, M, out, KC * NR, pack_f32,
                     [&](int rows, int64_t m, int64_t k0, const float* panel, int64_t kk, float* c) {
                       micro_rows<float, float, MicroF32>(rows, x + m * K + k0, K, panel, kk, c);
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

// 32 floats at src (n <= 32 of them, zeros past n) as 16 lanes of bf16 pairs: lane q = (src[2q], src[2q + 1]).
inline __m512 bf16_pairs(const float* src, int64_t n) {
  const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(n), src);
  const __m512 hi = _mm512_maskz_loadu_ps(first_lanes(std::max<int64_t>(n - 16, 0)), src + 16);
  return (__m512)_mm512_cvtne2ps_pbh(hi, lo);
}

// c [R, NR] = x [R, 2 kp] (bf16 pairs, rows ldx pairs apart) times the packed panel p [kp, NR] of bf16 pairs.
template <int R>
struct MicroBf16 {
  static void run(const uint32_t* x, int64_t ldx, const uint32_t* p, int64_t kk, float* c) {
    const int64_t kp = (kk + 1) / 2;
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
};

// The packed panel of bf16 pairs p [kp, NR]: p[q * NR + j] = rows[j][2q], rows[j][2q + 1] (a zero past kk).
inline void pack_bf16(const float* const* rows, int64_t kk, uint32_t* p) {
  for (int64_t kb = 0; kb < kk; kb += 32) {
    const int64_t n = std::min<int64_t>(32, kk - kb), pairs = (n + 1) / 2;
    for (int jb = 0; jb < NR; jb += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = bf16_pairs(rows[jb + j] + kb, n);
      transpose16(r);
      for (int64_t i = 0; i < pairs; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(p + (kb / 2 + i) * NR + jb), r[i]);
    }
  }
}

inline void gemm_bf16(const Linear& l, const float* x, int64_t M, float* out) {
  const int64_t K = l.K, Kh = (K + 1) / 2;
  std::vector<uint32_t> xb(M * Kh);  // x in bf16 pairs (a zero past an odd K)
  parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t kb = 0; kb < K; kb += 32) {
        const int64_t n = std::min<int64_t>(32, K - kb);
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(xb.data() + m * Kh + kb / 2), first_lanes((n + 1) / 2),
                              bf16_pairs(x + m * K + kb, n));
      }
  });
  gemm_panels<uint32_t>(l, M, out, KC / 2 * NR, pack_bf16,  // (KC even: a block starts on a pair)
                        [&](int rows, int64_t m, int64_t k0, const uint32_t* panel, int64_t kk, float* c) {
                          micro_rows<uint32_t, uint32_t, MicroBf16>(rows, xb.data() + m * Kh + k0 / 2, Kh, panel,
                                                                    kk, c);
                        });
}
#else
constexpr bool HAS_GEMM_BF16 = false;
inline void gemm_bf16(const Linear& l, const float* x, int64_t M, float* out) { gemm(l, x, M, out); }
#endif

}  // namespace clrt
