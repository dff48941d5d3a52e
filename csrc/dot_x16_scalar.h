// INT8_X16 rows in plain C++, for builds without the AVX2 kernel (dot_avx2.h's int8_x16_dot): the same
// integer sums per block, then sx times each in fp32, summed in block order. Correct everywhere, not tuned:
// the cpu backend asks for INT8_X16 only where the AVX2 kernel runs (kernels/cpu_native.py).
#pragma once

#include "cpu_linear_base.h"

namespace clrt {

constexpr int X16_XROWS = 1;

template <int R, int M>
inline void int8_x16_dot(const int16_t* xq, const float* sx, int64_t Kp, const int8_t* w, int64_t K, float* o) {
  const int64_t nb = Kp / X16_BLOCK;
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * X16_BLOCK, k1 = std::min(K, k0 + X16_BLOCK);
        int32_t sum = 0;
        for (int64_t k = k0; k < k1; ++k) sum += int32_t{xq[m * Kp + k]} * w[r * K + k];
        acc += static_cast<float>(sum) * sx[m * nb + b];
      }
      o[m * R + r] = acc;
    }
}

}  // namespace clrt
