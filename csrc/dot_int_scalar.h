// INT8_X16 and INT4_X8 rows in plain C++, for builds without the AVX2 kernels (dot_avx2.h): the same integer
// sums per block, then scaled in fp32. Correct everywhere, not tuned: the cpu backend asks for them only where
// the AVX2 kernels run (kernels/cpu_native.py).
#pragma once

#include "cpu_linear_base.h"

namespace clrt {

constexpr int X16_XROWS = 1, X8_XROWS = 1;

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

// INT4_X8 rows (see dot_avx2.h's int4_x8_dot): integer sums per chunk, sx times each summed per group in fp32,
// then the group's scale, in group order.
template <int R, int M>
inline void int4_x8_dot(const int8_t* xq, const float* sx, const uint8_t* w, int64_t K, int64_t group, const float* S,
                        float* o) {
  const int64_t G = K / group, nb = K / X8_BLOCK, rowbytes = K / 2;
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        float part = 0.f;
        for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += CHUNK) {
          const uint8_t* b = w + r * rowbytes + k0 / 2;  // byte j: codes k0 + j (low nibble), k0 + 16 + j (high)
          int32_t sum = 0;
          for (int j = 0; j < CHUNK / 2; ++j)
            sum += (b[j] & 15) * int32_t{xq[m * K + k0 + j]} + (b[j] >> 4) * int32_t{xq[m * K + k0 + 16 + j]};
          part += static_cast<float>(sum) * sx[m * nb + k0 / X8_BLOCK];
        }
        acc += S[r * G + g] * part;
      }
      o[m * R + r] = acc;
    }
}

}  // namespace clrt
