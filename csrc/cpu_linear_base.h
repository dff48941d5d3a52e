// What the native CPU kernels' projections share: the instruction set, the weight formats (Linear) and their
// checks. cpu_linear.h puts the projections together from these and one of the dot_*.h inner products.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

// The instruction set the kernels are written for, by what the compiler targets (-march=native).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define CLRT_AVX512 1
#define CLRT_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CLRT_AVX512 0
#define CLRT_AVX2 1
#else
#define CLRT_AVX512 0
#define CLRT_AVX2 0
#endif

namespace clrt {

constexpr int64_t CHUNK = 32;  // int4: 32 weights per 16 bytes (byte j: k = j low nibble, k = 16 + j high)
constexpr int64_t ROWS = 4;    // weight rows per block: independent accumulators, one x load for all
#ifndef CLRT_PREFETCH
#define CLRT_PREFETCH 4096
#endif
constexpr int64_t PREFETCH = CLRT_PREFETCH;  // bytes ahead in a weight row to request (DRAM latency cover)

enum Kind : int64_t { DENSE = 0, INT8 = 1, INT4 = 2, INT8_X16 = 3 };

// INT8_X16: int8 weights against activations rounded to int16 in blocks of X16_BLOCK (quantize_x16): the
// products are integers, summed exactly within a block, then scaled by the block's scale in fp32.
constexpr int64_t X16_BLOCK = 64;
constexpr float X16_MAX = 32767.f;

inline int64_t x16_width(int64_t K) { return (K + X16_BLOCK - 1) / X16_BLOCK * X16_BLOCK; }

// One block of quantize_x16: n (<= X16_BLOCK) values at x -> X16_BLOCK codes at q (zeros past n); returns s.
inline float quantize_x16_block(const float* x, int64_t n, int16_t* q) {
  float amax = 0.f;
  bool finite = true;
#if CLRT_AVX2 || CLRT_AVX512
  if (n == X16_BLOCK) {  // (the same IEEE division and rounding, 8 lanes at a time; the tail block as below)
    const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(std::numeric_limits<float>::max());
    __m256 v[X16_BLOCK / 8], m = _mm256_setzero_ps();
    int ok = 0xff;
    for (int j = 0; j < X16_BLOCK / 8; ++j) {
      v[j] = _mm256_loadu_ps(x + 8 * j);
      const __m256 a = _mm256_andnot_ps(sign, v[j]);
      ok &= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ));  // (false for NaN and infinity)
      m = _mm256_max_ps(m, a);
    }
    if (ok == 0xff) {
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
      const float s = amax == 0.f ? 1.f : amax / X16_MAX;
      const __m256 sv = _mm256_set1_ps(s), hi = _mm256_set1_ps(X16_MAX), lo = _mm256_set1_ps(-X16_MAX);
      for (int j = 0; j < X16_BLOCK / 8; j += 2) {
        __m256i c[2];
        for (int h2 = 0; h2 < 2; ++h2) {
          const __m256 r = _mm256_round_ps(_mm256_div_ps(v[j + h2], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          c[h2] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8);  // (packs is per lane)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 8 * j), packed);
      }
      return s;
    }
  }
#endif
  for (int64_t k = 0; k < n; ++k) {
    const float a = std::fabs(x[k]);
    finite &= a <= std::numeric_limits<float>::max();  // (false for NaN and infinity)
    amax = std::max(amax, a);
  }
  const float s = !finite ? std::numeric_limits<float>::quiet_NaN() : amax == 0.f ? 1.f : amax / X16_MAX;
  for (int64_t k = 0; k < n; ++k)
    q[k] = finite ? static_cast<int16_t>(std::min(std::max(std::nearbyint(x[k] / s), -X16_MAX), X16_MAX)) : 0;
  std::fill(q + n, q + X16_BLOCK, int16_t{0});
  return s;
}

// x [M, K] fp32 -> xq [M, Kp] int16 (Kp = x16_width(K), zeros past K) and sx [M, Kp / X16_BLOCK]: each block
// of a row has the scale s = max|x| / 32767 and q = x / s rounded half to even (within +-32767). An all-zero
// block has s = 1; a block holding a NaN or an infinity has s = NaN and q = 0, so its outputs are NaN.
// Exactly kernels/int8_format.quantize_x16 (IEEE division, the default rounding mode).
inline void quantize_x16(const float* x, int64_t M, int64_t K, int16_t* xq, float* sx) {
  const int64_t Kp = x16_width(K), nb = Kp / X16_BLOCK;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b)
      sx[m * nb + b] = quantize_x16_block(x + m * K + b * X16_BLOCK, std::min(X16_BLOCK, K - b * X16_BLOCK),
                                          xq + m * Kp + b * X16_BLOCK);
}

// One projection W [N, K] in one of the formats:
//   DENSE: w fp32 [N, K]
//   INT8:  w int8 [N, K], scale fp32 [N]                   W[n, k] = w[n, k] * scale[n]
//   INT4:  w uint8 [N, K / 2] in CHUNK order, scale and zs fp32 [N, K / group], levels fp32 [16]
//          W[n, k] = levels[q[n, k]] * scale[n, g] - zs[n, g], g = k / group (zs = zero * scale);
//          levels 0 .. 15 (int4) unless given (NF4: its codebook), zs 0 when empty (NF4: absmax scales only)
//   INT8_X16: as INT8, with x rounded by quantize_x16
struct Linear {
  int64_t kind = DENSE, N = 0, K = 0, group = 0;
  torch::Tensor w, scale, zs, levels;
  int64_t ldo = 0;  // out's row stride when this is one part of a wider output (0: N, the output its own)
  // The tensors' data, read once by make_linear (data_ptr<T>() checks the dtype at every call: ~8% of a decode
  // step of the 7.7M model when each 4-row tile asked for them). zs_p, levels_p: null when not given.
  const void* w_p = nullptr;
  const float *scale_p = nullptr, *zs_p = nullptr, *levels_p = nullptr;

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
  } else if (kind == INT8 || kind == INT8_X16) {
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
  l.w_p = w.data_ptr();
  l.scale_p = kind == DENSE ? nullptr : scale.data_ptr<float>();  // (INT8_X16: the weight rows' scales)
  l.zs_p = kind == INT4 ? l.zs_or_null() : nullptr;
  l.levels_p = kind == INT4 ? l.levels_or_null() : nullptr;
  return l;
}

}  // namespace clrt
