// What the native CPU kernels' projections share: the instruction set, the weight formats (Linear), their
// checks and the thread pool. cpu_linear.h puts the projections together from these and one of the dot_*.h
// inner products. Two builds: the torch extension (cpu_native.cpp: torch's thread pool, c10::Error) and, with
// CLRT_LITE defined, the torch-free library (lite.cpp: OpenMP directly, std::invalid_argument). Nothing here
// holds a tensor: the weights are pointers whose owners (the torch Decoder, the lite model's arrays) keep them.
#pragma once

#ifdef CLRT_LITE
#include <omp.h>

#include <atomic>
#include <stdexcept>
#else
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#endif

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

enum Kind : int64_t { DENSE = 0, INT8 = 1, INT4 = 2, INT8_X16 = 3, INT4_X8 = 4 };

// INT8_X16: int8 weights against activations rounded to int16 in blocks of X16_BLOCK (quantize_x16); INT4_X8:
// int4 weights (levels 0 .. 15) against activations rounded to int8 in blocks of X8_BLOCK (quantize_x8, as
// llama.cpp's q4_0 x q8_0). The products are integers, summed exactly within a block, then scaled in fp32.
constexpr int64_t X16_BLOCK = 64, X8_BLOCK = 32;
static_assert(X8_BLOCK == CHUNK, "INT4_X8: one x block per int4 chunk (the kernels index x by K)");

// K rounded up to whole blocks: the width of a row of codes (zeros past K).
template <int64_t BLOCK>
inline int64_t blocks_width(int64_t K) { return (K + BLOCK - 1) / BLOCK * BLOCK; }

// One block of activations rounded to integers: n (<= BLOCK) values at x -> BLOCK codes at q (zeros past n);
// returns the block's scale s = max|x| / QMAX, q = x / s rounded half to even (within +-QMAX). An all-zero
// block has s = 1; a block holding a NaN or an infinity has s = NaN and q = 0, so its outputs are NaN.
// Exactly kernels/int8_format.quantize_x16 / quantize_x8 (IEEE division, the default rounding mode).
template <class T, int64_t BLOCK, int QMAX>
inline float quantize_block(const float* x, int64_t n, T* q) {
  const float qmax = static_cast<float>(QMAX);
  float amax = 0.f;
  bool finite = true;
#if CLRT_AVX2 || CLRT_AVX512
  if (n == BLOCK) {  // (the same division and rounding, 8 lanes at a time; a tail block as below)
    const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(std::numeric_limits<float>::max());
    __m256 v[BLOCK / 8], m = _mm256_setzero_ps();
    int ok = 0xff;
    for (int j = 0; j < BLOCK / 8; ++j) {
      v[j] = _mm256_loadu_ps(x + 8 * j);
      const __m256 a = _mm256_andnot_ps(sign, v[j]);
      ok &= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ));  // (false for NaN and infinity)
      m = _mm256_max_ps(m, a);
    }
    if (ok == 0xff) {
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
      const float s = amax == 0.f ? 1.f : amax / qmax;
      const __m256 sv = _mm256_set1_ps(s), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
      alignas(32) int32_t c[BLOCK];
      for (int j = 0; j < BLOCK / 8; ++j) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(v[j], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i code = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        _mm256_store_si256(reinterpret_cast<__m256i*>(c + 8 * j), code);
      }
      for (int64_t k = 0; k < BLOCK; ++k) q[k] = static_cast<T>(c[k]);
      return s;
    }
  }
#endif
  for (int64_t k = 0; k < n; ++k) {
    const float a = std::fabs(x[k]);
    finite &= a <= std::numeric_limits<float>::max();  // (false for NaN and infinity)
    amax = std::max(amax, a);
  }
  const float s = !finite ? std::numeric_limits<float>::quiet_NaN() : amax == 0.f ? 1.f : amax / qmax;
  for (int64_t k = 0; k < n; ++k)
    q[k] = finite ? static_cast<T>(std::min(std::max(std::nearbyint(x[k] / s), -qmax), qmax)) : T{0};
  std::fill(q + n, q + BLOCK, T{0});
  return s;
}

// x [M, K] fp32 -> q [M, Kp] (Kp = K rounded up to BLOCK, zeros past K) and s [M, Kp / BLOCK], block by block
// (quantize_block).
template <class T, int64_t BLOCK, int QMAX>
inline void quantize_rows(const float* x, int64_t M, int64_t K, T* q, float* s) {
  const int64_t Kp = blocks_width<BLOCK>(K), nb = Kp / BLOCK;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b)
      s[m * nb + b] = quantize_block<T, BLOCK, QMAX>(x + m * K + b * BLOCK, std::min(BLOCK, K - b * BLOCK),
                                                     q + m * Kp + b * BLOCK);
}

// INT8_X16's rounding: int16 in blocks of X16_BLOCK (kernels/int8_format.quantize_x16).
inline void quantize_x16(const float* x, int64_t M, int64_t K, int16_t* xq, float* sx) {
  quantize_rows<int16_t, X16_BLOCK, 32767>(x, M, K, xq, sx);
}

// INT4_X8's rounding: int8 in blocks of X8_BLOCK, one per int4 chunk (kernels/int8_format.quantize_x8).
inline void quantize_x8(const float* x, int64_t M, int64_t K, int8_t* xq, float* sx) {
  quantize_rows<int8_t, X8_BLOCK, 127>(x, M, K, xq, sx);
}

// One projection W [N, K] in one of the formats:
//   DENSE: w fp32 [N, K]
//   INT8:  w int8 [N, K], scale fp32 [N]                   W[n, k] = w[n, k] * scale[n]
//   INT4:  w uint8 [N, K / 2] in CHUNK order, scale and zs fp32 [N, K / group], levels fp32 [16]
//          W[n, k] = levels[q[n, k]] * scale[n, g] - zs[n, g], g = k / group (zs = zero * scale);
//          levels 0 .. 15 (int4) unless given (NF4: its codebook), zs 0 when empty (NF4: absmax scales only)
//   INT8_X16, INT4_X8: as INT8 / INT4 (no levels), with x rounded by quantize_x16 / quantize_x8
struct Linear {
  int64_t kind = DENSE, N = 0, K = 0, group = 0;
  // The weight's data: w_p the codes (or fp32 values), scale_p (null for DENSE), zs_p and levels_p (INT4 /
  // INT4_X8 and INT4 only; null when not given).
  const void* w_p = nullptr;
  const float *scale_p = nullptr, *zs_p = nullptr, *levels_p = nullptr;
  int64_t ldo = 0;  // out's row stride when this is one part of a wider output (0: N, the output its own)
  // One x row (decode) reads the weight rows one at a time, one sequential stream, as dense weights do where
  // DENSE_ROW_AT_A_TIME: faster where the weights come from DRAM, slower from cache (one FMA chain). Set for int8
  // weights by DecoderCore::one_row_int8; the same sums either way.
  bool one_row = false;
};

#ifdef CLRT_LITE
inline void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("codellama_rt native CPU kernels: " + what);
}

// The lite library's thread count for every thread of the process (0: OpenMP's default, every core), set by
// clrt_set_threads: omp_set_num_threads holds only for the thread that calls it, and a model made on one thread
// is often run from another (a server's worker).
inline std::atomic<int>& lite_threads() {
  static std::atomic<int> n{0};
  return n;
}

inline int64_t max_threads() {
  const int n = lite_threads().load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}

// [begin, end) in at most one contiguous chunk per thread, no chunk under `grain` (at::parallel_for's split).
template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int64_t threads = omp_in_parallel() ? 1 : std::min<int64_t>(max_threads(), (n + grain - 1) / grain);
  if (threads <= 1) {
    f(begin, end);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t b0 = begin + omp_get_thread_num() * chunk;
    if (b0 < end) f(b0, std::min(end, b0 + chunk));
  }
}
#else
inline void check(bool ok, const std::string& what) { TORCH_CHECK(ok, "codellama_rt native CPU kernels: ", what); }

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}
#endif

// A Linear of the given data, its format's shape rules checked (the callers check the arrays' dtypes and
// shapes: make_linear in cpu_native.cpp, the lite model's loader). scale, zs, levels: null where not given.
inline Linear linear_of(int64_t kind, const void* w, const float* scale, const float* zs, const float* levels,
                        int64_t N, int64_t K, int64_t group) {
  check(N > 0 && K > 0 && w != nullptr, "a weight needs N, K > 0 and data");
  if (kind == INT8 || kind == INT8_X16) {
    check(scale != nullptr, "int8 weights need their scales");
  } else if (kind == INT4 || kind == INT4_X8) {
    check(K % CHUNK == 0 && group % CHUNK == 0 && group > 0 && K % group == 0, "int4 K and group multiples of 32");
    check(scale != nullptr, "int4 weights need their scales");
    check(kind == INT4 || levels == nullptr,
          "int4 with int8 activations takes no levels (its codes multiply as integers)");
  } else {
    check(kind == DENSE, "unknown weight kind " + std::to_string(kind));
  }
  Linear l;
  l.kind = kind, l.N = N, l.K = K, l.group = group, l.w_p = w;
  l.scale_p = kind == DENSE ? nullptr : scale;
  l.zs_p = kind == INT4 || kind == INT4_X8 ? zs : nullptr;
  l.levels_p = kind == INT4 ? levels : nullptr;
  return l;
}

}  // namespace clrt
