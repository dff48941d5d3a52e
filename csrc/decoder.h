// A whole Llama decode step over the projections of cpu_linear.h, fp32 activations and KV cache, on plain
// pointers: DecoderCore. Both builds hold one: the torch extension's Decoder (cpu_native.cpp, tensors checked
// and kept alive there) and the lite library (lite.cpp, numpy arrays kept by codellama_rt.lite).
#pragma once

#include "attention.h"
#include "gemm.h"
#include "vmath.h"

#include <cmath>
#include <string>
#include <vector>

namespace clrt {

// A Llama decode step over the module graph's weights (the formats of cpu_linear_base.h). The arrays are the
// owner's: embedding fp32 [V, dim], norms fp32 [dim] each (per layer attention then MLP), final_norm fp32 [dim],
// rope cos / sin fp32 [rope_positions, head_dim / 2].
class DecoderCore {
 public:
  static constexpr int64_t GEMM_MIN_ROWS = 16;  // prompt rows from which the projections run as a packed GEMM

  DecoderCore(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn_dim, int64_t vocab_size,
              double eps, const float* embedding, std::vector<const float*> norms, const float* final_norm,
              const float* rope_cos, const float* rope_sin, int64_t rope_positions)
      : dim_(dim), H_(n_heads), Hkv_(n_kv_heads), D_(head_dim), F_(ffn_dim), V_(vocab_size), eps_(eps),
        embedding_(embedding), norms_(std::move(norms)), final_norm_(final_norm), cos_(rope_cos), sin_(rope_sin),
        rope_positions_(rope_positions) {
    check(dim_ > 0 && H_ > 0 && Hkv_ > 0 && D_ > 0 && F_ > 0 && V_ > 0 && rope_positions_ > 0,
          "dimensions must be positive");
    check(H_ % Hkv_ == 0 && D_ % 2 == 0, "heads: n_heads a multiple of n_kv_heads, head_dim even");
    check(!norms_.empty() && norms_.size() % 2 == 0, "two norm weights per layer");
  }

  int64_t layers() const { return static_cast<int64_t>(norms_.size()) / 2; }
  int64_t vocab_size() const { return V_; }

  // The projections in graph order: per layer wqkv, wo, w13, w2, then the lm_head. `continues`: this weight is
  // the next rows of the previous projection's output (a checkpoint's q, k, v parts), not a new projection.
  void add_linear(const Linear& l, bool continues) {
    if (!continues) {
      check(static_cast<int64_t>(projections_.size()) < 4 * layers() + 1, "the decoder has every projection");
      projections_.push_back({});
    } else {
      check(!projections_.empty() && projections_.back().parts.front().K == l.K,
            "a continuing part needs a previous projection of the same input width");
    }
    Projection& p = projections_.back();
    p.offsets.push_back(p.N);
    p.parts.push_back(l);
    p.N += l.N;
    for (auto& part : p.parts) part.ldo = p.parts.size() > 1 ? p.N : 0;
  }

  // Prompt rows (step's `prompt`) of int8 / int4 weights multiply in bf16 (gemm_bf16: activations and weights
  // rounded to bf16) where the CPU has AVX512-BF16; returns whether it does.
  bool bf16_prompt(bool on) {
    bf16_prompt_ = on && HAS_GEMM_BF16;
    return bf16_prompt_;
  }

  // Decode rows (one x row) of every int8 projection (fp32 products) read their weight rows one at a time (on) or
  // four side by side (off, the default): see Linear::one_row.
  void one_row_int8(bool on) {
    for (auto& p : projections_)
      for (auto& part : p.parts)
        if (part.kind == INT8) part.one_row = on;
  }

  // Checks the projections' widths and a step's arguments (step's, below); slot: null for row b at cache row b.
  // (Each message is built only on failure: this runs every step.)
  void check_step(int64_t B, const int64_t* tok, const int64_t* pos, const int64_t* slot, int64_t rows,
                  int64_t S, int64_t out_rows) const {
    const int64_t L = layers();
    if (static_cast<int64_t>(projections_.size()) != 4 * L + 1) check(false, "decoder has not every projection");
    const int64_t widths[4] = {(H_ + 2 * Hkv_) * D_, dim_, 2 * F_, dim_};  // wqkv, wo, w13, w2
    const int64_t inputs[4] = {dim_, H_ * D_, dim_, F_};
    for (int64_t i = 0; i <= 4 * L; ++i) {
      const int64_t N = projections_[i].N, K = projections_[i].parts.front().K;
      if (N != (i < 4 * L ? widths[i % 4] : V_))
        check(false, "projection " + std::to_string(i) + " is " + std::to_string(N) + " wide, not the model's");
      if (K != (i < 4 * L ? inputs[i % 4] : dim_))
        check(false, "projection " + std::to_string(i) + " takes " + std::to_string(K) + " inputs, not the model's");
    }
    check(B > 0, "a step needs at least one token");
    check(out_rows >= 1 && out_rows <= B, "logits for 1 .. B rows");
    if (slot == nullptr && rows < B)
      check(false, "cache has " + std::to_string(rows) + " rows for " + std::to_string(B) + " tokens");
    for (int64_t b = 0; b < B; ++b) {
      if (tok[b] < 0 || tok[b] >= V_) check(false, "token id " + std::to_string(tok[b]) + " outside the vocabulary");
      if (pos[b] < 0 || pos[b] >= S || pos[b] >= rope_positions_)
        check(false, "position " + std::to_string(pos[b]) + " outside the cache (" + std::to_string(S) +
              ") or the rope tables");
      if (slot && (slot[b] < 0 || slot[b] >= rows))
        check(false, "slot " + std::to_string(slot[b]) + " outside the cache's " + std::to_string(rows) + " rows");
    }
  }

  // tokens, positions, slots [B] (slot null: row b at cache row b); cache fp32 [layers, 2, rows, Hkv, S, D];
  // -> logits fp32 [out_rows, V] of the last out_rows rows (1 .. B; a prompt needs its last). Row b is at cache
  // row slot[b], position pos[b]: every row's K/V is written before any row attends, so rows sharing a slot at
  // consecutive positions (a speculative verify block, a prompt) attend causally. Row b attends to its slot's
  // positions 0 .. pos[b]. prompt: the rows are a prompt's, their projections a packed GEMM where there are
  // enough of them (gemm.h: another summation order than a decode step's, so not for rows whose logits must
  // equal decode steps'). Call check_step first.
  void step(int64_t B, const int64_t* tok, const int64_t* pos, const int64_t* slot, float* cache, int64_t rows,
            int64_t S, float* logits, int64_t out_rows, bool prompt = false) const {
    const bool packed = prompt && HAS_GEMM && B >= GEMM_MIN_ROWS;
    std::vector<int64_t> own;
    if (!slot) {
      own.resize(B);
      for (int64_t b = 0; b < B; ++b) own[b] = b;
      slot = own.data();
    }
    const int64_t L = layers(), QKV = (H_ + 2 * Hkv_) * D_, G = H_ / Hkv_;
    std::vector<float> h(B * dim_), y(B * std::max(dim_, H_ * D_)), qkv(B * QKV), attn(B * H_ * D_),
        o(B * dim_), g(B * 2 * F_), a(B * F_);
    // A packed step's per-row work (norms, residuals, SiLU, rotations) in parallel too; a decode step's few rows on
    // this thread.
    const auto over_rows = [packed](int64_t b0, int64_t b1, const auto& f) {
      if (packed) {
        parallel_for(b0, b1, 8, f);
      } else {
        f(b0, b1);
      }
    };
    const auto norm = [&](const float* weight, int64_t b0) {
      over_rows(b0, B, [&](int64_t r0, int64_t r1) {
        for (int64_t b = r0; b < r1; ++b) rms_norm(h.data() + b * dim_, weight, eps_, dim_, y.data() + b * dim_);
      });
    };
    const auto add_residual = [&](int64_t b0) {
      over_rows(b0, B, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0 * dim_; i < r1 * dim_; ++i) h[i] += o[i];
      });
    };
    over_rows(0, B, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b)
        std::copy(embedding_ + tok[b] * dim_, embedding_ + (tok[b] + 1) * dim_, h.data() + b * dim_);
    });
    for (int64_t l = 0; l < L; ++l) {
      norm(norms_[2 * l], 0);
      project(projections_[4 * l], y.data(), B, qkv.data(), packed);
      attend(l, B, S, rows, pos, slot, cache, qkv.data(), attn.data(), G, QKV, packed);
      // After the last layer's attention only the logits' rows go on (the others' K / V are written); a row's
      // result does not depend on the other rows, so these are the same either way.
      const int64_t b0 = l == L - 1 ? B - out_rows : 0, M = B - b0;
      const bool gemm_rows = packed && M >= GEMM_MIN_ROWS;
      project(projections_[4 * l + 1], attn.data() + b0 * H_ * D_, M, o.data() + b0 * dim_, gemm_rows);
      add_residual(b0);
      norm(norms_[2 * l + 1], b0);
      project(projections_[4 * l + 2], y.data() + b0 * dim_, M, g.data() + b0 * 2 * F_, gemm_rows);
      over_rows(b0, B, [&](int64_t r0, int64_t r1) {
        for (int64_t b = r0; b < r1; ++b)
          silu_mul(g.data() + b * 2 * F_, g.data() + b * 2 * F_ + F_, a.data() + b * F_, F_);
      });
      project(projections_[4 * l + 3], a.data() + b0 * F_, M, o.data() + b0 * dim_, gemm_rows);
      add_residual(b0);
    }
    norm(final_norm_, B - out_rows);
    project(projections_[4 * L], y.data() + (B - out_rows) * dim_, out_rows, logits,
            packed && out_rows >= GEMM_MIN_ROWS);
  }

 private:
  // Rotate q and k of each row at its position, write k and v into layer l's cache at (its slot, its position),
  // then attend over the slot's 0..pos (prompt: a packed step's rows, attend_prompt). rows: the cache's max_batch
  // (its row count, part of its strides).
  void attend(int64_t l, int64_t B, int64_t S, int64_t rows, const int64_t* pos, const int64_t* slot, float* cache,
              float* qkv, float* out, int64_t G, int64_t QKV, bool prompt) const {
    const int64_t half = D_ / 2, maxB = rows;
    const float* C = cos_;
    const float* Sn = sin_;
    float* kc = cache + l * 2 * maxB * Hkv_ * S * D_;
    float* vc = kc + maxB * Hkv_ * S * D_;
    const auto rotate_and_write = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* row = qkv + b * QKV;
        const float *c = C + pos[b] * half, *s = Sn + pos[b] * half;
        for (int64_t hd = 0; hd < H_ + Hkv_; ++hd) rotate_half(row + hd * D_, c, s, half);
        for (int64_t kv = 0; kv < Hkv_; ++kv) {
          const int64_t at = ((slot[b] * Hkv_ + kv) * S + pos[b]) * D_;
          std::copy(row + (H_ + kv) * D_, row + (H_ + kv + 1) * D_, kc + at);
          std::copy(row + (H_ + Hkv_ + kv) * D_, row + (H_ + Hkv_ + kv + 1) * D_, vc + at);
        }
      }
    };
    if (prompt) {
      parallel_for(0, B, 8, rotate_and_write);
    } else {
      rotate_and_write(0, B);
    }
    const AttentionShape shape{H_, Hkv_, G, D_, QKV, S};
    (prompt ? attend_prompt : attend_rows)(shape, B, pos, slot, kc, vc, qkv, out);
  }


  int64_t dim_, H_, Hkv_, D_, F_, V_;
  float eps_;
  const float* embedding_;
  std::vector<const float*> norms_;
  const float *final_norm_, *cos_, *sin_;
  int64_t rope_positions_;
  bool bf16_prompt_ = false;
  // One projection: its weights' outputs side by side (parts[i] writes columns offsets[i] ..), N wide in all.
  struct Projection {
    std::vector<Linear> parts;
    std::vector<int64_t> offsets;
    int64_t N = 0;
  };

  void project(const Projection& p, const float* x, int64_t M, float* out, bool packed) const {
    for (size_t i = 0; i < p.parts.size(); ++i) {
      const Linear& l = p.parts[i];
      (!packed ? apply : bf16_prompt_ && l.kind != DENSE ? gemm_bf16 : gemm)(l, x, M, out + p.offsets[i]);
    }
  }

  std::vector<Projection> projections_;
};

}  // namespace clrt
