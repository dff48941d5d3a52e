// The torch-free build of the native decode step (codellama_rt._cpu_lite): DecoderCore (decoder.h) behind a C
// interface that codellama_rt.lite calls through ctypes on numpy arrays, so a process running it never imports
// torch. Built with CLRT_LITE: OpenMP threads, checks as std::invalid_argument, caught here and returned as a
// message (every function returning int gives 0 on success, 1 with `err` filled).
#include "decoder.h"

#include <Python.h>

#include <cstring>
#include <exception>

using clrt::DecoderCore;

namespace {

int fail(const std::exception& e, char* err, int64_t err_len) {
  if (err && err_len > 0) {
    std::strncpy(err, e.what(), static_cast<size_t>(err_len - 1));
    err[err_len - 1] = '\0';
  }
  return 1;
}

}  // namespace

extern "C" {

// The instruction set the kernels were built for: "avx512", "avx2" or "plain".
const char* clrt_isa() {
  static const std::string isa = clrt::isa();
  return isa.c_str();
}

// The thread count of later steps on every thread of the process (n >= 1; 0 leaves it); returns the count in
// force after the call.
int clrt_set_threads(int n) {
  if (n >= 1) clrt::lite_threads() = n;
  return static_cast<int>(clrt::max_threads());
}

// A decoder over the arrays (DecoderCore's constructor; norms: 2 * layers pointers, copied); null with `err` on
// failure. The arrays are the caller's, alive until clrt_decoder_free.
void* clrt_decoder_new(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn_dim,
                       int64_t vocab_size, double eps, const float* embedding, const float* const* norms,
                       int64_t n_norms, const float* final_norm, const float* rope_cos, const float* rope_sin,
                       int64_t rope_positions, char* err, int64_t err_len) {
  try {
    return new DecoderCore(dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size, eps, embedding,
                           std::vector<const float*>(norms, norms + n_norms), final_norm, rope_cos, rope_sin,
                           rope_positions);
  } catch (const std::exception& e) {
    fail(e, err, err_len);
    return nullptr;
  }
}

void clrt_decoder_free(void* d) { delete static_cast<DecoderCore*>(d); }

// DecoderCore::add_linear of clrt::linear_of(kind, w, scale, zs, levels, N, K, group); null pointers: not given.
int clrt_decoder_add_linear(void* d, int64_t kind, const void* w, const float* scale, const float* zs,
                            const float* levels, int64_t N, int64_t K, int64_t group, int continues, char* err,
                            int64_t err_len) {
  try {
    static_cast<DecoderCore*>(d)->add_linear(clrt::linear_of(kind, w, scale, zs, levels, N, K, group), continues != 0);
    return 0;
  } catch (const std::exception& e) {
    return fail(e, err, err_len);
  }
}

// DecoderCore::bf16_prompt: 1 where prompt rows of int8 / int4 weights now multiply in bf16, 0 where not.
int clrt_decoder_bf16_prompt(void* d, int on) { return static_cast<DecoderCore*>(d)->bf16_prompt(on != 0); }

int clrt_decoder_one_row_int8(void* d, int on) {
  static_cast<DecoderCore*>(d)->one_row_int8(on != 0);
  return 0;
}

// DecoderCore::check_step then step: tokens, positions, slots int64 [B] (slots null: row b at cache row b),
// cache fp32 [layers, 2, rows, n_kv_heads, S, head_dim], logits fp32 [out_rows, vocab] of the last out_rows rows
// written; prompt: the rows are a prompt's (DecoderCore::step).
int clrt_decoder_step(void* d, int64_t B, const int64_t* tokens, const int64_t* positions, const int64_t* slots,
                      float* cache, int64_t rows, int64_t S, float* logits, int64_t out_rows, int prompt, char* err,
                      int64_t err_len) {
  try {
    const DecoderCore& core = *static_cast<const DecoderCore*>(d);
    core.check_step(B, tokens, positions, slots, rows, S, out_rows);
    core.step(B, tokens, positions, slots, cache, rows, S, logits, out_rows, prompt != 0);
    return 0;
  } catch (const std::exception& e) {
    return fail(e, err, err_len);
  }
}

// A module object, so that `import codellama_rt._cpu_lite` finds (and checks) the library ctypes then loads.
static struct PyModuleDef lite_module = {PyModuleDef_HEAD_INIT, "_cpu_lite",
                                         "codellama-rt's torch-free native decode step (a C library for ctypes: "
                                         "see codellama_rt.lite)", -1, nullptr};

PyMODINIT_FUNC PyInit__cpu_lite(void) { return PyModule_Create(&lite_module); }

}  // extern "C"
