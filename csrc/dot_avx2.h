// The projections' inner products with AVX2 + FMA intrinsics (included by cpu_linear.h where the building
// machine has those but not AVX-512: most laptop CPUs, AMD before Zen 4). 16 vector registers of 8 lanes: a
// tile is 3 x rows against 4 weight rows (12 accumulators, 3 x vectors, 1 weight vector).
//
// Every output is summed in one order whatever the tile: lane j of its accumulator takes k = j mod 8 in
// increasing k, then the 8 lanes are added as ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)). So a row's outputs do
// not depend on how many x rows share its tile (a verify pass scores each token exactly as a decode step).
#pragma once

#include "cpu_linear_base.h"

namespace clrt {

constexpr int XROWS = 3;       // x rows per tile (dense, int8, int4)
constexpr int INT4_XROWS = 3;  // (with a table: buffered, as dense; without: int4_linear_rows, two at a time)
constexpr int X16_XROWS = 2;   // (INT8_X16: 9 rows took ~1.3x the fp32 path's time, 1.5x that with one row a tile)
constexpr int X8_XROWS = 2;    // (INT4_X8)
// One x row against fp32 weights (decode, bound by memory bandwidth) reads the weight rows one at a time, one
// sequential stream: the 7.7M model's fp32 step took 1.7 ms instead of 2.5 on a Zen 3 EPYC (its 31 MB of
// weights come from DRAM; four rows side by side stream slower). int8 / int4 rows are bound by their
// conversion instead, where four rows side by side keep more FMAs in flight (one row at a time was slower).
constexpr bool DENSE_ROW_AT_A_TIME = true;

// Lanes below n (0 .. 8) set: a maskload mask.
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256 load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The lane sum of one vector, in the order reduce8 gives each of its lanes.
inline float reduce1(__m256 v) {
  v = _mm256_hadd_ps(v, v);  // lanes 0, 1: v0 + v1, v2 + v3; lanes 4, 5: v4 + v5, v6 + v7
  v = _mm256_hadd_ps(v, v);  // lane 0: (v0 + v1) + (v2 + v3); lane 4: (v4 + v5) + (v6 + v7)
  return _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

// The 8 lane sums of v[0..7] as one vector (lane i: the sum of v[i]'s lanes), by horizontal adds: 9
// instructions for 8 sums where 8 reduce1 take ~40.
inline __m256 reduce8(const __m256* v) {
  const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // g0: lanes 0..3 the low halves' sums of v[0..3], lanes 4..7 their high halves'
  return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}

// o[0 .. n - 1] = the lane sums of v[0 .. n - 1]: 8 at a time by reduce8, then 4 by its first half, the rest
// one by one (no masked store: vmaskmovps stores are microcoded on AMD).
inline void reduce_into(const __m256* v, int n, float* o) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, reduce8(v + i));
  if (i + 4 <= n) {
    const __m256 g = _mm256_hadd_ps(_mm256_hadd_ps(v[i], v[i + 1]), _mm256_hadd_ps(v[i + 2], v[i + 3]));
    _mm_storeu_ps(o + i, _mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1)));
    i += 4;
  }
  for (; i < n; ++i) o[i] = reduce1(v[i]);
}

// Keeps v in a register (as in dot_avx512.h: otherwise each FMA reloads x from memory).
inline void in_register(__m256& v) { asm("" : "+x"(v)); }

// acc[m][r] += x[m][k] W[r][k] over k in [0, n): x rows ldx apart, weight rows ldw apart, W's elements converted
// by Load (fp32 or int8). Each weight vector loaded serves all M rows; with PF, the weight lines PREFETCH bytes
// ahead are requested once per 64 bytes.
template <int R, int M, bool PF, class T, class Load>
inline void fma_rows(const float* x, int64_t ldx, const T* w, int64_t ldw, int64_t n, __m256 (&acc)[M][R], Load load) {
  constexpr int64_t LINE = 64 / sizeof(T);  // elements per cache line
  auto step = [&](int64_t k) {
    __m256 xv[M];
    for (int m = 0; m < M; ++m) in_register(xv[m] = _mm256_loadu_ps(x + m * ldx + k));
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load(w + r * ldw + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  };
  int64_t k = 0;
  for (; k + LINE <= n; k += LINE) {
    if (PF)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k) + PREFETCH, _MM_HINT_T0);
    for (int64_t j = 0; j < LINE; j += 8) step(k + j);
  }
  for (; k + 8 <= n; k += 8) step(k);
  if (k < n) {  // the tail: missing lanes are 0 in x and in W
    const __m256i mask = lanes_below(n - k);
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm256_maskload_ps(x + m * ldx + k, mask);
    for (int r = 0; r < R; ++r) {
      alignas(32) T tail[8] = {};
      std::copy(w + r * ldw + k, w + r * ldw + n, tail);
      const __m256 wv = load(tail);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
}

template <int R, int M>
inline void zero(__m256 (&acc)[M][R]) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
}

// M x rows (stride K) against R weight rows: o[m * R + r] = sum_k x[m][k] W[r][k].
template <int R, int M>
inline void dense_dot(const float* x, const float* w, int64_t K, float* o) {
  __m256 acc[M][R];
  zero(acc);
  fma_rows<R, M, true>(x, K, w, K, K, acc, [](const float* p) { return _mm256_loadu_ps(p); });
  reduce_into(&acc[0][0], M * R, o);
}

template <int R, int M>
inline void int8_dot(const float* x, const int8_t* w, int64_t K, float* o) {
  __m256 acc[M][R];
  zero(acc);
  fma_rows<R, M, true>(x, K, w, K, K, acc, [](const int8_t* p) { return load_i8(p); });
  reduce_into(&acc[0][0], M * R, o);
}

// INT8_X16 rows: M x rows (quantize_x16: xq [M, Kp], sx [M, Kp / X16_BLOCK]) against R int8 rows (K apart):
// o[m * R + r] = sum_b sx[m][b] sum_{k in b} xq[m][k] w[r][k], without the rows' scales. 16 weights take one
// sign extension, and per x row one vpmaddwd (pairs of products, exact in int32) and one add, where the fp32
// path (int8_dot) converts 8 at a time to fp32. Lane j sums its products of each block as integers (exact: 8 of
// at most 128 * 32767), then adds sx times that to its fp32 accumulator block by block; the lanes are
// added as in reduce_into. So a row's outputs do not depend on M.
template <int R, int M>
inline void int8_x16_dot(const int16_t* xq, const float* sx, int64_t Kp, const int8_t* w, int64_t K, float* o) {
  const int64_t nb = Kp / X16_BLOCK, full = K / X16_BLOCK;
  alignas(32) int8_t tail[R][X16_BLOCK] = {};  // the last block's weights past K read as zeros (xq is zero there)
  if (full < nb)
    for (int r = 0; r < R; ++r) std::copy(w + r * K + full * X16_BLOCK, w + r * K + K, tail[r]);
  __m256 acc[M][R];
  zero(acc);
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* wb = b < full ? w + b * X16_BLOCK : &tail[0][0];  // row 0's weights of block b
    const int64_t ldw = b < full ? K : X16_BLOCK;
    for (int r = 0; r < R; ++r)  // (a block is one line of each row)
      _mm_prefetch(reinterpret_cast<const char*>(wb + r * ldw) + PREFETCH, _MM_HINT_T0);
    __m256i sum[M][R];
    for (int j = 0; j < X16_BLOCK / 16; ++j) {
      __m256i xv[M];
      for (int m = 0; m < M; ++m)
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + b * X16_BLOCK + 16 * j));
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + r * ldw + 16 * j));
        const __m256i wv = _mm256_cvtepi8_epi16(bytes);
        for (int m = 0; m < M; ++m) {
          const __m256i p = _mm256_madd_epi16(wv, xv[m]);
          sum[m][r] = j ? _mm256_add_epi32(sum[m][r], p) : p;
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      const __m256 s = _mm256_broadcast_ss(sx + m * nb + b);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m][r]), s, acc[m][r]);
    }
  }
  reduce_into(&acc[0][0], M * R, o);
}

// INT4_X8 rows (levels 0 .. 15): M x rows rounded by quantize_x8 (xq [M, K] int8, sx [M, K / 32]) against R int4
// rows (K / 2 bytes each, CHUNK order): o[m * R + r] = sum_g s[r][g] sum_{chunks c of g} sx[m][c] sum_{k in c}
// q[r][k] xq[m][k], the zero points' term left to the caller. A chunk's 32 codes become one vector of bytes (an
// and, a shift and an and, an insert: k order), vpmaddubsw multiplies them by the 32 x codes (pairs, exact in
// int16), vpmaddwd by ones sums pairs into 8 int32 lanes (exact), then FMA by sx into the group's fp32 lanes and
// the group's scale once per group, lane by lane (as llama.cpp's q4_0 x q8_0). So a row's outputs do not depend
// on M.
template <int R, int M>
inline void int4_x8_dot(const int8_t* xq, const float* sx, const uint8_t* w, int64_t K, int64_t group, const float* S,
                        float* o) {
  const int64_t G = K / group, nb = K / X8_BLOCK, rowbytes = K / 2;
  const __m128i low4 = _mm_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[M][R], part[M][R];
  zero(acc);
  for (int64_t g = 0; g < G; ++g) {
    zero(part);
    for (int64_t k = g * group; k < (g + 1) * group; k += CHUNK) {
      const uint8_t* b = w + k / 2;  // this chunk's 16 bytes in row 0
      if ((k & 127) == 0)  // a line of codes per 128 weights
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(b + r * rowbytes) + PREFETCH, _MM_HINT_T0);
      __m256i xv[M];
      __m256 sxv[M];
      for (int m = 0; m < M; ++m) {
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
        sxv[m] = _mm256_broadcast_ss(sx + m * nb + k / X8_BLOCK);
      }
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + r * rowbytes));
        const __m256i codes =
            _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
        for (int m = 0; m < M; ++m) {
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv[m]), ones);
          part[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sxv[m], part[m][r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(S[r * G + g]);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(s, part[m][r], acc[m][r]);
    }
  }
  reduce_into(&acc[0][0], M * R, o);
}

constexpr int64_t SPAN = 256;  // int4 with a table: weights of each row dequantized into L1 at a time (R x 1 KiB)

// The 32 codes of one chunk (16 bytes at b, CHUNK order) as 4 vectors of 8: k = 0-7, 8-15, 16-23, 24-31.
inline void chunk_codes(const uint8_t* b, __m256i (&q)[4]) {
  const __m256i low4 = _mm256_set1_epi32(15);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m256i lo = _mm256_cvtepu8_epi32(bytes), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));  // 0-7, 8-15
  q[0] = _mm256_and_si256(lo, low4), q[1] = _mm256_and_si256(hi, low4);
  q[2] = _mm256_srli_epi32(lo, 4), q[3] = _mm256_srli_epi32(hi, 4);
}

// A group's 16 weights levels[j] s - z (one rounding, as dot_avx512.h's tables) as two vectors: j = 0-7, 8-15.
inline void level_table(const float* L, __m256 s, __m256 z, __m256& t0, __m256& t1) {
  t0 = _mm256_fmsub_ps(_mm256_loadu_ps(L), s, z), t1 = _mm256_fmsub_ps(_mm256_loadu_ps(L + 8), s, z);
}

// The weights of 8 codes q, looked up in level_table's t0 / t1 (the code's bit 3 picks one).
inline __m256 weights_of(__m256i q, __m256 t0, __m256 t1) {
  const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));  // bit 3 to the sign
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, q), _mm256_permutevar8x32_ps(t1, q), pick);
}

// Chunks c0 .. c1 - 1 of one int4 row (16 bytes each, CHUNK order) as fp32 into out: levels[q] s - zs of each
// chunk's group (weights_of the table L). Z null: no zero points.
inline void dequantize_chunks(const uint8_t* w, int64_t c0, int64_t c1, int64_t group, const float* S, const float* Z,
                              const float* L, float* out) {
  const int64_t per_group = group / CHUNK;
  int64_t g = c0 / per_group, left = (g + 1) * per_group - c0;  // chunks of group g from c0 on
  __m256 t0, t1;
  level_table(L, _mm256_set1_ps(S[g]), _mm256_set1_ps(Z ? Z[g] : 0.f), t0, t1);
  for (int64_t c = c0; c < c1; ++c, out += CHUNK) {
    if (left-- == 0) {
      ++g, left = per_group - 1;
      level_table(L, _mm256_set1_ps(S[g]), _mm256_set1_ps(Z ? Z[g] : 0.f), t0, t1);
    }
    __m256i q[4];
    chunk_codes(w + c * (CHUNK / 2), q);
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, weights_of(q[v], t0, t1));
  }
}

// One x row against R int4 rows with a table of levels: the weights looked up in registers, chunk by chunk,
// with no buffer (a store and a load fewer per 8 weights). The same weights (weights_of) and the same FMA order
// as the buffered path of int4_dot, so the same sums: a decode step's row equals that row of a verify pass.
template <int R>
inline void int4_one_row(const float* x, const uint8_t* w, int64_t K, int64_t group, const float* S, const float* Z,
                         const float* L, __m256 (&acc)[1][R]) {
  const int64_t G = K / group, per_group = group / CHUNK, rowbytes = K / 2;
  alignas(32) float table[R][16];  // each row's 16 weights of the group (in L1: registers are short)
  for (int64_t g = 0; g < G; ++g) {
    for (int r = 0; r < R; ++r) {
      __m256 t0, t1;
      level_table(L, _mm256_set1_ps(S[r * G + g]), _mm256_set1_ps(Z ? Z[r * G + g] : 0.f), t0, t1);
      _mm256_store_ps(table[r], t0), _mm256_store_ps(table[r] + 8, t1);
    }
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      if ((c & 3) == 0)  // four chunks per cache line
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * rowbytes + c * (CHUNK / 2)) + PREFETCH, _MM_HINT_T0);
      __m256 xv[4];
      for (int v = 0; v < 4; ++v) in_register(xv[v] = _mm256_loadu_ps(x + c * CHUNK + 8 * v));
      for (int r = 0; r < R; ++r) {
        __m256i q[4];
        chunk_codes(w + r * rowbytes + c * (CHUNK / 2), q);
        for (int v = 0; v < 4; ++v) {
          const __m256 wv = weights_of(q[v], _mm256_load_ps(table[r]), _mm256_load_ps(table[r] + 8));
          acc[0][r] = _mm256_fmadd_ps(wv, xv[v], acc[0][r]);
        }
      }
    }
  }
}

// int4 with the levels 0 .. 15 (no table): sum_k x[k] (q[k] s - zs) = sum_g (s_g sum_{k in g} q[k] x[k] - zs_g
// sum_{k in g} x[k]). The codes convert exactly, one FMA per 8 weights and x row; s and zs are applied once
// per group, lane by lane, so each output is summed in one order whatever M (a decode step's row equals that
// row of a verify pass). ZS: zero points given (else zs = 0). M <= 2: the group's partial sums, x sums and
// accumulators of M = 3 would not fit the 16 registers (spilled, a verify pass took 1.5x as long as two tiles).
template <int R, int M, bool ZS>
inline void int4_linear_dot(const float* x, const uint8_t* w, int64_t K, int64_t group, const float* S, const float* Z,
                            float* o) {
  static_assert(M <= 2, "int4_linear_dot: at most 2 x rows");
  const int64_t G = K / group, rowbytes = K / 2;
  const __m256i low4 = _mm256_set1_epi32(15);
  __m256 acc[M][R];
  zero(acc);
  for (int64_t g = 0; g < G; ++g) {
    __m256 part[M][R], xs[M];
    zero(part);
    for (int m = 0; m < M; ++m) xs[m] = _mm256_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += CHUNK) {
      const uint8_t* b = w + k / 2;  // this chunk's 16 bytes in row 0
      if ((k & 127) == 0)  // a line of codes per 128 weights
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(b + r * rowbytes) + PREFETCH, _MM_HINT_T0);
      for (int v = 0; v < 4; ++v) {  // weights k + 8v ..: low nibbles of bytes 0-7, 8-15, then the high ones
        __m256 xv[M];
        for (int m = 0; m < M; ++m) {
          in_register(xv[m] = _mm256_loadu_ps(x + m * K + k + 8 * v));
          if (ZS) xs[m] = _mm256_add_ps(xs[m], xv[m]);
        }
        for (int r = 0; r < R; ++r) {
          const __m256i bytes =
              _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + r * rowbytes + (v & 1) * 8)));
          const __m256 wv = _mm256_cvtepi32_ps(v < 2 ? _mm256_and_si256(bytes, low4) : _mm256_srli_epi32(bytes, 4));
          for (int m = 0; m < M; ++m) part[m][r] = _mm256_fmadd_ps(wv, xv[m], part[m][r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(S[r * G + g]);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(s, part[m][r], acc[m][r]);
      if (ZS) {
        const __m256 z = _mm256_set1_ps(Z[r * G + g]);
        for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fnmadd_ps(z, xs[m], acc[m][r]);
      }
    }
  }
  reduce_into(&acc[0][0], M * R, o);
}

// int4_linear_dot of M x rows (o[m * R + r]), two at a time.
template <int R, int M, bool ZS>
inline void int4_linear_rows(const float* x, const uint8_t* w, int64_t K, int64_t group, const float* S,
                             const float* Z, float* o) {
  if constexpr (M > 2) {
    int4_linear_dot<R, 2, ZS>(x, w, K, group, S, Z, o);
    int4_linear_rows<R, M - 2, ZS>(x + 2 * K, w, K, group, S, Z, o + 2 * R);
  } else {
    int4_linear_dot<R, M, ZS>(x, w, K, group, S, Z, o);
  }
}

// int4 rows (K / 2 bytes each, CHUNK order): o[m * R + r] = sum_k x[m][k] W[r][k] with W = levels[q] s - zs.
// L null (levels 0 .. 15): int4_linear_dot. With a table (NF4), SPAN weights of the R rows are dequantized into
// a buffer, then multiplied as dense rows: the accumulators stay the same across spans, so the sum order is
// dense_dot's (one x row: int4_one_row, the same sums). Z null: no zero points.
template <int R, int M>
inline void int4_dot(const float* x, const uint8_t* w, int64_t K, int64_t group, const float* S, const float* Z,
                     const float* L, float* o) {
  if (!L) {
    if (Z) {
      int4_linear_rows<R, M, true>(x, w, K, group, S, Z, o);
    } else {
      int4_linear_rows<R, M, false>(x, w, K, group, S, Z, o);
    }
    return;
  }
  const int64_t G = K / group, rowbytes = K / 2;
  __m256 acc[M][R];
  zero(acc);
  if constexpr (M == 1) {
    int4_one_row<R>(x, w, K, group, S, Z, L, acc);
    reduce_into(&acc[0][0], R, o);
    return;
  }
  alignas(32) float buf[R][SPAN];
  for (int64_t k0 = 0; k0 < K; k0 += SPAN) {
    const int64_t n = std::min(SPAN, K - k0);  // a multiple of CHUNK
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * rowbytes;
      for (int64_t b = k0 / 2; b < (k0 + n) / 2; b += 64)  // (the codes' lines PREFETCH bytes ahead)
        _mm_prefetch(reinterpret_cast<const char*>(wr + b) + PREFETCH, _MM_HINT_T0);
      const float* Zr = Z ? Z + r * G : nullptr;
      dequantize_chunks(wr, k0 / CHUNK, (k0 + n) / CHUNK, group, S + r * G, Zr, L, buf[r]);
    }
    fma_rows<R, M, false>(x + k0, K, &buf[0][0], SPAN, n, acc, [](const float* p) { return _mm256_load_ps(p); });
  }
  reduce_into(&acc[0][0], M * R, o);
}

}  // namespace clrt
