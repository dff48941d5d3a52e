// What the native CPU kernels' projections share: the instruction set, the weight formats (Linear) and their
// checks. cpu_linear.h puts the projections together from these and one of the dot_*.h inner products.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
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
  l.w_p = w.data_ptr();
  l.scale_p = kind == DENSE ? nullptr : scale.data_ptr<float>();
  l.zs_p = kind == INT4 ? l.zs_or_null() : nullptr;
  l.levels_p = kind == INT4 ? l.levels_or_null() : nullptr;
  return l;
}

}  // namespace clrt
