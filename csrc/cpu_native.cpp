// Native CPU kernels of codellama-rt (kernels/cpu_native.py is their Python side and holds the references):
//   linear_f32 / linear_int8 / linear_int4   x [M, K] fp32 -> [M, N] fp32 (the projections: cpu_linear.h)
//   quantize_x16 / quantize_x8               x rounded to int16 / int8 blocks, as linear_int8 with x16 / linear_int4
//                                            with x8 take it
//   Decoder                                  a whole batch decode step of a Llama model, no per-op Python
//
// Checks raise c10::Error (a Python RuntimeError) naming the argument; the Python wrappers check first and
// give ValueErrors.
#include "decoder.h"

#include <torch/extension.h>

#include <cmath>
#include <limits>

namespace {

using namespace clrt;

void check_f32(const torch::Tensor& t, const char* name, int64_t dim) {
  check(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == dim && t.is_contiguous(),
        std::string(name) + " must be a contiguous fp32 CPU tensor of " + std::to_string(dim) + " dims");
}

torch::Tensor optional_arg(const c10::optional<torch::Tensor>& t) { return t ? *t : torch::Tensor(); }

const float* f32_or_null(const torch::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// A Linear over the tensors (cpu_linear_base.h's formats), their dtypes and shapes checked; the caller keeps them
// alive as long as the Linear.
Linear make_linear(int64_t kind, const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zs,
                   int64_t N, int64_t K, int64_t group, const torch::Tensor& levels = {}) {
  check(w.device().is_cpu() && w.is_contiguous(), "weight must be a contiguous CPU tensor");
  if (kind == DENSE) {
    check_f32(w, "dense weight", 2);
    check(w.size(0) == N && w.size(1) == K, "dense weight shape");
  } else if (kind == INT8 || kind == INT8_X16) {
    check(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.size(0) == N && w.size(1) == K, "int8 weight [N, K]");
    check_f32(scale, "int8 scale", 1);
    check(scale.size(0) == N, "int8 scale [N]");
  } else if (kind == INT4 || kind == INT4_X8) {
    check(K % CHUNK == 0 && group % CHUNK == 0 && group > 0 && K % group == 0, "int4 K and group multiples of 32");
    check(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.size(0) == N && w.size(1) == K / 2,
          "int4 weight uint8 [N, K / 2]");
    check_f32(scale, "int4 scale", 2);
    check(scale.size(0) == N && scale.size(1) == K / group, "int4 scale [N, K/g]");
    if (f32_or_null(zs)) {
      check_f32(zs, "int4 zs", 2);
      check(zs.sizes() == scale.sizes(), "int4 zs [N, K/g] (or empty: no zero points)");
    }
    if (f32_or_null(levels)) {
      check_f32(levels, "int4 levels", 1);
      check(levels.size(0) == 16, "int4 levels [16] (or empty: 0 .. 15)");
    }
  }
  return linear_of(kind, w.data_ptr(), kind == DENSE ? nullptr : f32_or_null(scale), f32_or_null(zs),
                   f32_or_null(levels), N, K, group);  // (an unknown kind: linear_of says so)
}

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

torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                          const torch::Tensor& zs, int64_t group, const c10::optional<torch::Tensor>& levels, bool x8) {
  return linear(make_linear(x8 ? INT4_X8 : INT4, w, scale, zs, w.size(0), w.size(1) * 2, group, optional_arg(levels)),
                x);
}

// The fp32 matrix W [N, K] of an int4 weight (prefill: torch's GEMM then multiplies by it), rows in parallel
// (gemm.h's dequantize_int4_row).
torch::Tensor dequantize_int4(const torch::Tensor& w, const torch::Tensor& scale, const torch::Tensor& zs,
                              int64_t group, const c10::optional<torch::Tensor>& levels) {
  const Linear l = make_linear(INT4, w, scale, zs, w.size(0), w.size(1) * 2, group, optional_arg(levels));
  auto out = torch::empty({l.N, l.K}, scale.options());
  float* O = out.data_ptr<float>();
  at::parallel_for(0, l.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequantize_int4_row(l, n, 0, l.K, O + n * l.K);
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


// The torch side of DecoderCore (decoder.h): its tensors checked and kept alive here.
class Decoder {
 public:
  Decoder(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn_dim, int64_t vocab_size,
          double eps, torch::Tensor embedding, std::vector<torch::Tensor> norms, torch::Tensor final_norm,
          torch::Tensor rope_cos, torch::Tensor rope_sin)
      : kv_heads_(n_kv_heads),
        head_dim_(head_dim),
        core_(make_core(dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size, eps, embedding, norms, final_norm,
                        rope_cos, rope_sin)) {
    keep_ = norms;
    keep_.insert(keep_.end(), {embedding, final_norm, rope_cos, rope_sin});
  }

  void add_linear(int64_t kind, torch::Tensor w, torch::Tensor scale, torch::Tensor zs, int64_t N, int64_t K,
                  int64_t group, torch::Tensor levels, bool continues) {
    core_.add_linear(make_linear(kind, w, scale, zs, N, K, group, levels), continues);
    keep_.insert(keep_.end(), {w, scale, zs, levels});
  }

  void one_row_int8(bool on) { core_.one_row_int8(on); }
  bool bf16_prompt(bool on) { return core_.bf16_prompt(on); }

  // tokens, positions, slots int64 [B]; cache fp32 [layers, 2, max_batch, Hkv, S, D]; -> logits fp32 [out_rows, V]
  // of the last out_rows rows (0: all B) (DecoderCore::step; an empty slots tensor: row b at cache row b; prompt:
  // the rows are a prompt's, a packed GEMM from 16 rows, not bitwise a decode step's).
  torch::Tensor forward(torch::Tensor tokens, torch::Tensor positions, torch::Tensor cache, torch::Tensor slots,
                        int64_t out_rows, bool prompt) {
    check(tokens.scalar_type() == torch::kInt64 && tokens.dim() == 1 && tokens.is_contiguous(), "tokens int64 [B]");
    check(positions.scalar_type() == torch::kInt64 && positions.sizes() == tokens.sizes() && positions.is_contiguous(),
          "positions int64 [B]");
    check_f32(cache, "cache", 6);
    check(cache.size(0) == core_.layers() && cache.size(1) == 2 && cache.size(3) == kv_heads_ &&
          cache.size(5) == head_dim_, "cache [layers, 2, max_batch, n_kv_heads, S, head_dim]");
    const int64_t* slot = nullptr;
    if (slots.numel() != 0) {
      check(slots.scalar_type() == torch::kInt64 && slots.sizes() == tokens.sizes() && slots.is_contiguous(),
            "slots int64 [B]");
      slot = slots.data_ptr<int64_t>();
    }
    const int64_t B = tokens.size(0), S = cache.size(4), rows = cache.size(2);
    const int64_t *tok = tokens.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
    const int64_t out = out_rows == 0 ? B : out_rows;
    core_.check_step(B, tok, pos, slot, rows, S, out);
    auto logits = torch::empty({out, core_.vocab_size()}, tokens.options().dtype(torch::kFloat32));
    pybind11::gil_scoped_release nogil;
    core_.step(B, tok, pos, slot, cache.data_ptr<float>(), rows, S, logits.data_ptr<float>(), out, prompt);
    return logits;
  }

 private:
  static DecoderCore make_core(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn_dim,
                               int64_t vocab_size, double eps, const torch::Tensor& embedding,
                               const std::vector<torch::Tensor>& norms, const torch::Tensor& final_norm,
                               const torch::Tensor& rope_cos, const torch::Tensor& rope_sin) {
    check_f32(embedding, "embedding", 2);
    check(embedding.size(0) == vocab_size && embedding.size(1) == dim, "embedding [vocab, dim]");
    std::vector<const float*> norm_p;
    for (auto& t : norms) check_f32(t, "norm weight", 1), check(t.size(0) == dim, "norm weight [dim]");
    for (auto& t : norms) norm_p.push_back(t.data_ptr<float>());
    check_f32(final_norm, "final norm", 1);
    check(final_norm.size(0) == dim, "final norm [dim]");
    check_f32(rope_cos, "rope cos", 2);
    check_f32(rope_sin, "rope sin", 2);
    check(rope_cos.size(1) == head_dim / 2 && rope_sin.sizes() == rope_cos.sizes(),
          "rope tables [positions, head_dim / 2]");
    return DecoderCore(dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size, eps, embedding.data_ptr<float>(),
                       norm_p, final_norm.data_ptr<float>(), rope_cos.data_ptr<float>(), rope_sin.data_ptr<float>(),
                       rope_cos.size(0));
  }

  int64_t kv_heads_, head_dim_;
  DecoderCore core_;
  std::vector<torch::Tensor> keep_;  // every tensor core_ points into
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
      .def("bf16_prompt", &Decoder::bf16_prompt)
      .def("forward", &Decoder::forward, pybind11::arg("tokens"), pybind11::arg("positions"), pybind11::arg("cache"),
           pybind11::arg("slots"), pybind11::arg("out_rows") = 0, pybind11::arg("prompt") = false);
}
