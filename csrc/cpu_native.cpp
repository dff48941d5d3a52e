// Native CPU kernels of codellama-rt (kernels/cpu_native.py is their Python side and holds the references):
//   linear_f32 / linear_int8 / linear_int4   x [M, K] fp32 -> [M, N] fp32 (the projections: cpu_linear.h)
//   quantize_x16 / quantize_x8               x rounded to int16 / int8 blocks, as linear_int8 with x16 / linear_int4
//                                            with x8 take it
//   Decoder                                  a whole batch decode step of a Llama model, no per-op Python
//
// Checks raise c10::Error (a Python RuntimeError) naming the argument; the Python wrappers check first and
// give ValueErrors.
#include "cpu_linear.h"

#include <cmath>
#include <limits>

namespace {

using namespace clrt;

torch::Tensor linear(const Linear& l, const torch::Tensor& x) {
  check_f32(x, "x", 2);
  check(x.size(1) == l.K, "x has " + std::to_string(x.size(1)) + " columns, the weight " + std::to_string(l.K));
  auto out = torch::empty({x.size(0), l.N}, x.options());
  apply(l, x.data_ptr<float>(), x.size(0), out.data_ptr<float>());  // (torch.ops calls release the GIL)
  return out;
}

torch::Tensor linear_f32(const torch::Tensor& x, const torch::Tensor& w) {
  return linear(make_linear(DENSE, w, {}, {}, w.size(0), w.size(1), 0), x);
}

torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, bool x16) {
  return linear(make_linear(x16 ? INT8_X16 : INT8, w, scale, {}, w.size(0), w.size(1), 0), x);
}

// quantize_x16 / quantize_x8 of x fp32 [M, K]: (int16 / int8 [M, Kp], fp32 [M, Kp / block]), Kp = K rounded up
// to the block: what INT8_X16 / INT4_X8 rows multiply (the kernels' own rounding, `rows`).
template <class T, int64_t BLOCK>
std::tuple<torch::Tensor, torch::Tensor> quantize_op(const torch::Tensor& x, torch::ScalarType dtype,
                                                     void (*rows)(const float*, int64_t, int64_t, T*, float*)) {
  check_f32(x, "x", 2);
  const int64_t M = x.size(0), Kp = blocks_width<BLOCK>(x.size(1));
  auto xq = torch::empty({M, Kp}, x.options().dtype(dtype));
  auto sx = torch::empty({M, Kp / BLOCK}, x.options());
  rows(x.data_ptr<float>(), M, x.size(1), xq.data_ptr<T>(), sx.data_ptr<float>());
  return {xq, sx};
}

std::tuple<torch::Tensor, torch::Tensor> quantize_x16_op(const torch::Tensor& x) {
  return quantize_op<int16_t, X16_BLOCK>(x, torch::kInt16, quantize_x16);
}

std::tuple<torch::Tensor, torch::Tensor> quantize_x8_op(const torch::Tensor& x) {
  return quantize_op<int8_t, X8_BLOCK>(x, torch::kInt8, quantize_x8);
}

torch::Tensor levels_arg(const c10::optional<torch::Tensor>& levels) { return levels ? *levels : torch::Tensor(); }

torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                          const torch::Tensor& zs, int64_t group, const c10::optional<torch::Tensor>& levels, bool x8) {
  return linear(make_linear(x8 ? INT4_X8 : INT4, w, scale, zs, w.size(0), w.size(1) * 2, group, levels_arg(levels)),
                x);
}

// The fp32 matrix W [N, K] of an int4 weight (prefill: torch's GEMM then multiplies by it), rows in parallel:
// levels[q] * s - zs, one rounding with a zero point (an FMA), the product's own without (NF4: bitsandbytes'
// code * absmax).
torch::Tensor dequantize_int4(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zs,
                              int64_t group, const c10::optional<torch::Tensor>& levels) {
  const Linear l = make_linear(INT4, w, scale, zs, w.size(0), w.size(1) * 2, group, levels_arg(levels));
  auto out = torch::empty({l.N, l.K}, scale.options());
  const uint8_t* W = l.w.data_ptr<uint8_t>();
  const float *S = l.scale.data_ptr<float>(), *Z = l.zs_or_null(), *L = l.levels_or_null();
  float lv[16];
  for (int j = 0; j < 16; ++j) lv[j] = L ? L[j] : static_cast<float>(j);
  float* O = out.data_ptr<float>();
  const int64_t G = l.K / group;
  at::parallel_for(0, l.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c = 0; c < l.K / CHUNK; ++c) {
        const uint8_t* b = W + n * (l.K / 2) + c * (CHUNK / 2);
        const int64_t g = c * CHUNK / group;
        const float s = S[n * G + g];
        float* o = O + n * l.K + c * CHUNK;
        if (Z) {
          const float z = Z[n * G + g];
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
  });
  return out;
}

// Each row's first index of its largest value, or `nonfinite` where that value is not finite (the row holds
// NaN or +inf, or only -inf): x fp32 [B, V] -> int64 [B]. One pass in place of torch's argmax (which compares
// one value at a time: ~100 us for 9 rows of a 32k vocabulary here, ~9% of a verify pass) and its
// isfinite(amax) check.
int64_t argmax_row(const float* x, int64_t V, int64_t nonfinite) {
  int64_t i = 0, best_i = 0;
  float best = x[0];
  bool nan = false;
#if CLRT_AVX512
  if (V >= 16) {
    // per lane: the largest value seen and its first index (strictly greater replaces: the earliest stays)
    __m512 vmax = _mm512_loadu_ps(x);
    __mmask16 unordered = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
    __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i vidx = lane;
    const __m512i step = _mm512_set1_epi32(16);
    for (i = 16; i + 16 <= V; i += 16) {
      lane = _mm512_add_epi32(lane, step);
      const __m512 v = _mm512_loadu_ps(x + i);
      unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_mov_ps(vmax, gt, v);
      vidx = _mm512_mask_mov_epi32(vidx, gt, lane);
    }
    alignas(64) float m[16];
    alignas(64) int32_t k[16];
    _mm512_store_ps(m, vmax);
    _mm512_store_epi32(k, vidx);
    best = m[0], best_i = k[0];
    for (int j = 1; j < 16; ++j)
      if (m[j] > best || (m[j] == best && k[j] < best_i)) best = m[j], best_i = k[j];
    nan = unordered != 0;
  }
#elif CLRT_AVX2
  if (V >= 8) {  // (as above, 8 lanes)
    __m256 vmax = _mm256_loadu_ps(x);
    __m256 unordered = _mm256_cmp_ps(vmax, vmax, _CMP_UNORD_Q);
    __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i vidx = lane;
    const __m256i step = _mm256_set1_epi32(8);
    for (i = 8; i + 8 <= V; i += 8) {
      lane = _mm256_add_epi32(lane, step);
      const __m256 v = _mm256_loadu_ps(x + i);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);
      vmax = _mm256_blendv_ps(vmax, v, gt);
      vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(lane), gt));
    }
    alignas(32) float m[8];
    alignas(32) int32_t k[8];
    _mm256_store_ps(m, vmax);
    _mm256_store_si256(reinterpret_cast<__m256i*>(k), vidx);
    best = m[0], best_i = k[0];
    for (int j = 1; j < 8; ++j)
      if (m[j] > best || (m[j] == best && k[j] < best_i)) best = m[j], best_i = k[j];
    nan = _mm256_movemask_ps(unordered) != 0;
  }
#endif
  for (; i < V; ++i) {
    nan |= std::isnan(x[i]);
    if (x[i] > best) best = x[i], best_i = i;
  }
  return nan || !std::isfinite(best) ? nonfinite : best_i;
}

torch::Tensor argmax_rows(const torch::Tensor& x, int64_t nonfinite) {
  check_f32(x, "x", 2);
  check(x.size(1) > 0 && x.size(1) < (int64_t{1} << 31), "x must have 1 .. 2^31 - 1 columns");
  const int64_t B = x.size(0), V = x.size(1);
  auto out = torch::empty({B}, x.options().dtype(torch::kInt64));
  const float* X = x.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) O[b] = argmax_row(X + b * V, V, nonfinite);
  });
  return out;
}

// A greedy verify pass's outcome, in place: what verify_graph.VerifyStep's torch ops do for rows that are
// all greedy, without a repetition penalty or logprobs. logits fp32 [B * T, V]: the B rows' T = k + 1
// positions; proposals int64 [B, >= k] (row b's first proposed[b] count). Per row: the model's token at each
// position (argmax_row over the first `vocab_limit` ids, `nonfinite` where those logits are not finite),
// n = how many leading proposals equal
// them; out[b, 0] = n, out[b, 1 .. T] = the T tokens; the row's next input token (the one after the n
// accepted; 0 where not finite), position (+ n + 1, at most `last`) and sampling counter (+ n + 1).
void accept_greedy(const torch::Tensor& logits, const torch::Tensor& proposals, const torch::Tensor& proposed,
                   torch::Tensor out, torch::Tensor tokens, torch::Tensor positions, torch::Tensor counters,
                   int64_t last, int64_t vocab_limit, int64_t nonfinite) {
  check_f32(logits, "logits", 2);
  const torch::Tensor* ints[] = {&proposals, &proposed, &out, &tokens, &positions, &counters};
  for (const torch::Tensor* t : ints)
    check(t->device().is_cpu() && t->scalar_type() == torch::kInt64, "proposals, proposed, out, tokens, positions "
          "and counters must be int64 CPU tensors");
  check(proposals.dim() == 2 && out.dim() == 2 && proposed.dim() == 1 && tokens.dim() == 1 && positions.dim() == 1 &&
        counters.dim() == 1, "proposals and out must be 2-d, proposed, tokens, positions and counters 1-d");
  const int64_t B = proposals.size(0), V = logits.size(1);
  check(B > 0 && logits.size(0) % B == 0 && logits.size(0) / B >= 1, "logits must have B * T rows");
  const int64_t T = logits.size(0) / B, k = T - 1;
  check(V < (int64_t{1} << 31) && vocab_limit >= 1 && vocab_limit <= V, "vocab_limit must be in [1, V] (V < 2^31)");
  check(proposals.size(1) >= k && out.size(0) >= B && out.size(1) >= T + 1 && proposed.size(0) >= B &&
        tokens.size(0) >= B && positions.size(0) >= B && counters.size(0) >= B,
        "proposals [B, >= k], out [>= B, >= k + 2] and proposed, tokens, positions, counters [>= B]");
  std::vector<int64_t> target(B * T);
  const float* X = logits.data_ptr<float>();
  at::parallel_for(0, B * T, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) target[r] = argmax_row(X + r * V, vocab_limit, nonfinite);
  });
  auto P = proposals.accessor<int64_t, 2>();
  auto O = out.accessor<int64_t, 2>();
  auto n_proposed = proposed.accessor<int64_t, 1>();
  auto tok = tokens.accessor<int64_t, 1>();
  auto pos = positions.accessor<int64_t, 1>();
  auto ctr = counters.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* t = target.data() + b * T;
    const int64_t live = std::min(n_proposed[b], k);
    int64_t n = 0;
    while (n < live && t[n] == P[b][n]) ++n;
    O[b][0] = n;
    for (int64_t i = 0; i < T; ++i) O[b][1 + i] = t[i];
    tok[b] = std::max<int64_t>(t[n], 0);
    pos[b] = std::min(pos[b] + n + 1, last);
    ctr[b] += n + 1;
  }
}

// Shapes only (torch.compile / torch.export trace through the ops with meta tensors).
torch::Tensor linear_meta(const torch::Tensor& x, int64_t N) { return torch::empty({x.size(0), N}, x.options()); }

// ---- the decode step ---------------------------------------------------------------------------------

void rms_norm(const float* h, const float* weight, float eps, int64_t dim, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < dim; ++i) ss += h[i] * h[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) y[i] = (h[i] * r) * weight[i];
}

#if CLRT_AVX512
// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial (about 1 ulp), times 2^n by
// vscalefps; x clamped to [-87.3, 88.7] (finite results; e^-87.3 is already 0 next to 1 in silu).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact to fp32
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#elif CLRT_AVX2
// e^x for 8 lanes: exp16's polynomial, x clamped to [-87.3, 88.3] so that 2^n (n in -126 .. 127) is built
// directly in the exponent bits.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i]
void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
#if CLRT_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)),
                                                   _mm512_maskz_loadu_ps(m, up + i)));
  }
#elif CLRT_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// s [M, n] = q [M, D] K[0..n)^T: the projections' tiles (M query rows against 4 key rows at a time).
template <int R>
void scores_tile(const float* q, int64_t M, const float* K, int64_t D, float* o) {
  switch (M) {
    case 1: dense_dot<R, 1>(q, K, D, o); break;
    case 2: dense_dot<R, 2>(q, K, D, o); break;
    case 3: dense_dot<R, 3>(q, K, D, o); break;
    case 4: dense_dot<R, 4>(q, K, D, o); break;
    case 5: dense_dot<R, 5>(q, K, D, o); break;
    default: dense_dot<R, XROWS>(q, K, D, o); break;
  }
}

void scores(const float* q, int64_t G, const float* K, int64_t n, int64_t D, float* s) {
  float o[XROWS * 4];
  for (int64_t m0 = 0; m0 < G; m0 += XROWS) {
    const int64_t M = std::min<int64_t>(XROWS, G - m0);
    const float* qm = q + m0 * D;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
      scores_tile<4>(qm, M, K + t * D, D, o);
      for (int64_t m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) s[(m0 + m) * n + t + r] = o[m * 4 + r];
    }
    for (; t < n; ++t) {
      scores_tile<1>(qm, M, K + t * D, D, o);
      for (int64_t m = 0; m < M; ++m) s[(m0 + m) * n + t] = o[m];
    }
  }
}

// p[0..n) <- e^(scale p - max(scale p)); returns their sum.
float softmax_scaled(float* p, int64_t n, float scale) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, p[t] * scale);
  float sum = 0.f;
  int64_t t = 0;
#if CLRT_AVX512
  const __m512 sc = _mm512_set1_ps(scale), m = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p + t), sc), m));
    _mm512_storeu_ps(p + t, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#elif CLRT_AVX2
  const __m256 sc = _mm256_set1_ps(scale), m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p + t), sc), m));
    _mm256_storeu_ps(p + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = reduce1(acc);
#endif
  for (; t < n; ++t) sum += (p[t] = std::exp(p[t] * scale - mx));
  return sum;
}

void rotate_half(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// A Llama decode step over the module graph's weights (the formats above), fp32 activations and KV cache.
class Decoder {
 public:
  Decoder(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn_dim, int64_t vocab_size,
          double eps, torch::Tensor embedding, std::vector<torch::Tensor> norms, torch::Tensor final_norm,
          torch::Tensor rope_cos, torch::Tensor rope_sin)
      : dim_(dim), H_(n_heads), Hkv_(n_kv_heads), D_(head_dim), F_(ffn_dim), V_(vocab_size), eps_(eps),
        embedding_(embedding), norms_(norms), final_norm_(final_norm), cos_(rope_cos), sin_(rope_sin) {
    check_f32(embedding, "embedding", 2);
    check(embedding.size(0) == V_ && embedding.size(1) == dim_, "embedding [vocab, dim]");
    check(H_ % Hkv_ == 0 && D_ % 2 == 0, "heads: n_heads a multiple of n_kv_heads, head_dim even");
    for (auto& t : norms_) check_f32(t, "norm weight", 1), check(t.size(0) == dim_, "norm weight [dim]");
    check_f32(final_norm, "final norm", 1);
    check_f32(rope_cos, "rope cos", 2);
    check_f32(rope_sin, "rope sin", 2);
    check(rope_cos.size(1) == D_ / 2 && rope_sin.sizes() == rope_cos.sizes(), "rope tables [positions, head_dim / 2]");
  }

  // The projections in graph order: per layer wqkv, wo, w13, w2, then the lm_head. `continues`: this weight is
  // the next rows of the previous projection's output (a checkpoint's q, k, v parts), not a new projection.
  void add_linear(int64_t kind, torch::Tensor w, torch::Tensor scale, torch::Tensor zs, int64_t N, int64_t K,
                  int64_t group, torch::Tensor levels, bool continues) {
    Linear l = make_linear(kind, w, scale, zs, N, K, group, levels);
    if (!continues) {
      projections_.push_back({});
    } else {
      check(!projections_.empty() && projections_.back().parts.front().K == K,
            "a continuing part needs a previous projection of the same input width");
    }
    Projection& p = projections_.back();
    p.offsets.push_back(p.N);
    p.parts.push_back(l);
    p.N += N;
    for (auto& part : p.parts) part.ldo = p.parts.size() > 1 ? p.N : 0;
  }

  // Decode rows (one x row) of every int8 projection (fp32 products) read their weight rows one at a time (on) or
  // four side by side (off, the default): see Linear::one_row.
  void one_row_int8(bool on) {
    for (auto& p : projections_)
      for (auto& part : p.parts)
        if (part.kind == INT8) part.one_row = on;
  }

  // tokens, positions, slots int64 [B]; cache fp32 [layers, 2, max_batch, Hkv, S, D]; -> logits fp32 [B, V].
  // Row b is at cache row slots[b] (an empty slots tensor: row b), position positions[b]: every row's K/V is
  // written before any row attends, so rows sharing a slot at consecutive positions (a speculative verify
  // block) attend causally. Row b attends to its slot's positions 0 .. positions[b].
  torch::Tensor forward(torch::Tensor tokens, torch::Tensor positions, torch::Tensor cache, torch::Tensor slots) {
    const int64_t L = static_cast<int64_t>(norms_.size()) / 2;
    check(static_cast<int64_t>(projections_.size()) == 4 * L + 1, "decoder has not every projection");
    const int64_t widths[4] = {(H_ + 2 * Hkv_) * D_, dim_, 2 * F_, dim_};  // wqkv, wo, w13, w2
    for (int64_t i = 0; i <= 4 * L; ++i)
      check(projections_[i].N == (i < 4 * L ? widths[i % 4] : V_), "projection " + std::to_string(i) +
            " is " + std::to_string(projections_[i].N) + " wide, not the model's");
    check(tokens.scalar_type() == torch::kInt64 && tokens.dim() == 1 && tokens.is_contiguous(), "tokens int64 [B]");
    check(positions.scalar_type() == torch::kInt64 && positions.sizes() == tokens.sizes() && positions.is_contiguous(),
          "positions int64 [B]");
    check_f32(cache, "cache", 6);
    const int64_t B = tokens.size(0), S = cache.size(4), rows = cache.size(2);
    check(cache.size(0) == L && cache.size(1) == 2 && cache.size(3) == Hkv_ && cache.size(5) == D_,
          "cache [layers, 2, max_batch, n_kv_heads, S, head_dim]");
    std::vector<int64_t> slot(B);
    if (slots.numel() == 0) {
      check(rows >= B, "cache has " + std::to_string(rows) + " rows for " + std::to_string(B) + " tokens");
      for (int64_t b = 0; b < B; ++b) slot[b] = b;
    } else {
      check(slots.scalar_type() == torch::kInt64 && slots.sizes() == tokens.sizes() && slots.is_contiguous(),
            "slots int64 [B]");
      const int64_t* sl = slots.data_ptr<int64_t>();
      for (int64_t b = 0; b < B; ++b) {
        check(sl[b] >= 0 && sl[b] < rows, "slot " + std::to_string(sl[b]) + " outside the cache's " +
              std::to_string(rows) + " rows");
        slot[b] = sl[b];
      }
    }
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      check(tok[b] >= 0 && tok[b] < V_, "token id " + std::to_string(tok[b]) + " outside the vocabulary");
      check(pos[b] >= 0 && pos[b] < S && pos[b] < cos_.size(0), "position " + std::to_string(pos[b]) +
            " outside the cache (" + std::to_string(S) + ") or the rope tables");
    }
    auto logits = torch::empty({B, V_}, tokens.options().dtype(torch::kFloat32));
    pybind11::gil_scoped_release nogil;
    step(B, S, rows, tok, pos, slot.data(), cache.data_ptr<float>(), logits.data_ptr<float>());
    return logits;
  }

 private:
  void step(int64_t B, int64_t S, int64_t rows, const int64_t* tok, const int64_t* pos, const int64_t* slot, float* cache,
            float* logits) {
    const int64_t L = static_cast<int64_t>(norms_.size()) / 2, QKV = (H_ + 2 * Hkv_) * D_, G = H_ / Hkv_;
    std::vector<float> h(B * dim_), y(B * std::max(dim_, H_ * D_)), qkv(B * QKV), attn(B * H_ * D_),
        o(B * dim_), g(B * 2 * F_), a(B * F_);
    const float* E = embedding_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) std::copy(E + tok[b] * dim_, E + (tok[b] + 1) * dim_, h.data() + b * dim_);
    for (int64_t l = 0; l < L; ++l) {
      const float* an = norms_[2 * l].data_ptr<float>();
      const float* mn = norms_[2 * l + 1].data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) rms_norm(h.data() + b * dim_, an, eps_, dim_, y.data() + b * dim_);
      project(projections_[4 * l], y.data(), B, qkv.data());
      attend(l, B, S, rows, pos, slot, cache, qkv.data(), attn.data(), G, QKV);
      project(projections_[4 * l + 1], attn.data(), B, o.data());
      for (int64_t i = 0; i < B * dim_; ++i) h[i] += o[i];
      for (int64_t b = 0; b < B; ++b) rms_norm(h.data() + b * dim_, mn, eps_, dim_, y.data() + b * dim_);
      project(projections_[4 * l + 2], y.data(), B, g.data());
      for (int64_t b = 0; b < B; ++b) silu_mul(g.data() + b * 2 * F_, g.data() + b * 2 * F_ + F_, a.data() + b * F_, F_);
      project(projections_[4 * l + 3], a.data(), B, o.data());
      for (int64_t i = 0; i < B * dim_; ++i) h[i] += o[i];
    }
    const float* fn = final_norm_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) rms_norm(h.data() + b * dim_, fn, eps_, dim_, y.data() + b * dim_);
    project(projections_[4 * L], y.data(), B, logits);
  }

  // Rotate q and k of each row at its position, write k and v into layer l's cache at (its slot, its position),
  // then attend over the slot's 0..pos. rows: the cache's max_batch (its row count, part of its strides).
  void attend(int64_t l, int64_t B, int64_t S, int64_t rows, const int64_t* pos, const int64_t* slot, float* cache,
              float* qkv, float* out, int64_t G, int64_t QKV) {
    const int64_t half = D_ / 2, maxB = rows;
    const float* C = cos_.data_ptr<float>();
    const float* Sn = sin_.data_ptr<float>();
    float* kc = cache + l * 2 * maxB * Hkv_ * S * D_;
    float* vc = kc + maxB * Hkv_ * S * D_;
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkv + b * QKV;
      const float *c = C + pos[b] * half, *s = Sn + pos[b] * half;
      for (int64_t hd = 0; hd < H_ + Hkv_; ++hd) rotate_half(row + hd * D_, c, s, half);
      for (int64_t kv = 0; kv < Hkv_; ++kv) {
        const int64_t at = ((slot[b] * Hkv_ + kv) * S + pos[b]) * D_;
        std::copy(row + (H_ + kv) * D_, row + (H_ + kv + 1) * D_, kc + at);
        std::copy(row + (H_ + Hkv_ + kv) * D_, row + (H_ + Hkv_ + kv + 1) * D_, vc + at);
      }
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(D_));
    // one task per (row, kv head): its G query heads against the slot's keys 0..pos as one small product
    at::parallel_for(0, B * Hkv_, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> p;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv_, kv = i % Hkv_, n = pos[b] + 1;
        const float* q = qkv + b * QKV + kv * G * D_;  // the G heads reading this kv head: contiguous
        const float* K = kc + (slot[b] * Hkv_ + kv) * S * D_;
        const float* Vv = vc + (slot[b] * Hkv_ + kv) * S * D_;
        p.resize(G * n);
        scores(q, G, K, n, D_, p.data());
        for (int64_t h = 0; h < G; ++h) {
          float* ph = p.data() + h * n;
          const float sum = softmax_scaled(ph, n, scale);
          float* o = out + b * H_ * D_ + (kv * G + h) * D_;
          std::fill(o, o + D_, 0.f);
          for (int64_t t = 0; t < n; ++t) {
            const float w = ph[t] / sum;
            const float* vt = Vv + t * D_;
#pragma omp simd
            for (int64_t e = 0; e < D_; ++e) o[e] += w * vt[e];
          }
        }
      }
    });
  }

 private:
  int64_t dim_, H_, Hkv_, D_, F_, V_;
  float eps_;
  torch::Tensor embedding_;
  std::vector<torch::Tensor> norms_;
  torch::Tensor final_norm_, cos_, sin_;
  // One projection: its weights' outputs side by side (parts[i] writes columns offsets[i] ..), N wide in all.
  struct Projection {
    std::vector<Linear> parts;
    std::vector<int64_t> offsets;
    int64_t N = 0;
  };

  static void project(const Projection& p, const float* x, int64_t M, float* out) {
    for (size_t i = 0; i < p.parts.size(); ++i) apply(p.parts[i], x, M, out + p.offsets[i]);
  }

  std::vector<Projection> projections_;
};

}  // namespace

// The projections as torch ops: torch.ops.codellama_rt_cpu.linear_f32 / linear_int8 / linear_int4 (and
// quantize_x16 / quantize_x8, what linear_int8 with x16 / linear_int4 with x8 multiply).
TORCH_LIBRARY(codellama_rt_cpu, m) {
  m.def("linear_f32(Tensor x, Tensor w) -> Tensor");          // x fp32 [M, K] @ w fp32 [N, K]^T -> [M, N]
  // w int8 [N, K], scale fp32 [N]; x16: x rounded to int16 in blocks of 64 (INT8_X16)
  m.def("linear_int8(Tensor x, Tensor w, Tensor scale, bool x16=False) -> Tensor");
  m.def("quantize_x16(Tensor x) -> (Tensor, Tensor)");
  // see Linear (zs empty: no zero points; levels: the 16 code values, default 0 .. 15)
  // x8: x rounded to int8 in blocks of 32 (INT4_X8; no levels)
  m.def("linear_int4(Tensor x, Tensor w, Tensor scale, Tensor zs, int group, Tensor? levels=None, bool x8=False) -> "
        "Tensor");
  m.def("quantize_x8(Tensor x) -> (Tensor, Tensor)");
  m.def("dequantize_int4(Tensor w, Tensor scale, Tensor zs, int group, Tensor? levels=None) -> Tensor");  // fp32
}

TORCH_LIBRARY_IMPL(codellama_rt_cpu, CPU, m) {
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_int8", &linear_int8);
  m.impl("quantize_x16", &quantize_x16_op);
  m.impl("quantize_x8", &quantize_x8_op);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequantize_int4", &dequantize_int4);
}

TORCH_LIBRARY_IMPL(codellama_rt_cpu, Meta, m) {
  m.impl("linear_f32", [](const torch::Tensor& x, const torch::Tensor& w) { return linear_meta(x, w.size(0)); });
  m.impl("linear_int8", [](const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor&, bool) {
    return linear_meta(x, w.size(0));
  });
  m.impl("linear_int4", [](const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor&, const torch::Tensor&,
                           int64_t, const c10::optional<torch::Tensor>&, bool) { return linear_meta(x, w.size(0)); });
  m.impl("dequantize_int4", [](const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor&, int64_t,
                               const c10::optional<torch::Tensor>&) {
    return torch::empty({w.size(0), w.size(1) * 2}, scale.options());
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "codellama-rt native CPU kernels (see kernels/cpu_native.py); the projections are torch ops";
  m.def("avx512", &clrt::avx512, "whether the kernels were built with AVX-512 intrinsics");
  m.def("isa", &clrt::isa, "the instruction set the kernels were built for: avx512, avx2 or plain");
  m.def("argmax_rows", &argmax_rows, "each row's first index of its largest value (`nonfinite` where that is not "
        "finite): fp32 [B, V] -> int64 [B]", pybind11::arg("x"), pybind11::arg("nonfinite"));
  m.def("accept_greedy", &accept_greedy, "a greedy verify pass's accepted proposals and tokens, written in place "
        "(see csrc/cpu_native.cpp)");
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, torch::Tensor,
                          std::vector<torch::Tensor>, torch::Tensor, torch::Tensor, torch::Tensor>())
      .def("add_linear", &Decoder::add_linear)
      .def("one_row_int8", &Decoder::one_row_int8)
      .def("forward", &Decoder::forward);
}
