// y = x @ W^T straight from lowbit's packed weight codes (QTensor layout, read as stored).
//
// W [N, K] is a QTensor whose codes are packed LSB first in row-major order (core/packing.py),
// so row r starts at byte r*K*bits/8 and element k of a 4-bit row sits in the low nibble of
// byte k/2 when k is even, the high nibble when odd. Scales and zero points are [N, G] with
// G = ceil(K / group): a group size that does not divide K leaves a shorter last group.
//
//   decoder TABLE4   any 4-bit format: a 16-entry float table (int4, uint4, nf4, fp4_e2m1)
//           INT8     int8 codes (two's complement bytes)
//           UINT8    uint8 codes
//           FP8_E4M3 fp8 e4m3 codes, widened exactly through fp16 (value = fp16(...) * 256)
//           FP8_E5M2 fp8 e5m2 codes (the top byte of an fp16)
//
//   value(k) = (decode(code_k) - z_j) * s_j for k in group j  (z_j = 0 when symmetric)
//   y[m, r]  = sum_j s_j * (sum_{k in j} decode(code_k) x[m,k]) - sum_j s_j z_j sum_{k in j} x[m,k]
//
// Groups of 16 (nvfp4) are read 32 codes at a time like the others, with two scales per 32-code
// step, one for each half of the vector lanes (G16 below; 4-bit codes with float32 scales only).
//
// Output-axis groups (HQQ's layout: one scale per column and block of rg rows) become an input
// per row group: W[r, k] = (q - z[g, k]) s[g, k] with g = r / rg, so
//   y[m, r] = sum_k q[r, k] (s[g, k] x[m, k]) - sum_k z[g, k] s[g, k] x[m, k].
// The caller passes x already scaled, one [M, K] block per row group (row_group = rg), the kernel
// runs with unit scales and each block of rows reads its group's block; the caller subtracts the
// second sum (kernels/qmatmul.py).
//
// Sums run in float32 with FMA, one group at a time, so the error is that of a float32 dot
// product (tests/test_qmatmul.py states the bound against float64). The AVX-512 code is
// compiled for that target only (pragma below) and runs only when the CPU reports
// AVX-512 F/BW/VL/DQ; otherwise available() is false and lowbit runs its torch path.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <immintrin.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace lowbit_kernels;

enum Decoder : int64_t { TABLE4 = 0, INT8 = 1, UINT8 = 2, FP8_E4M3 = 3, FP8_E5M2 = 4 };
// Codes bytes per row, and the bytes element k starts in.
inline int64_t row_bytes(int64_t decoder, int64_t K) { return decoder == TABLE4 ? K / 2 : K; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")

// Loops over the template constants R and MB are unrolled so the accumulators stay in registers.
#define UNROLL _Pragma("GCC unroll 16")

template <int ST>
inline float scale_at(const void* p, int64_t i) {
  if (ST == F32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return ST == F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

// Up to 16 consecutive scales (the lanes in mask) as float32; the other lanes are 0.
template <int ST>
inline __m512 scales16(const void* p, int64_t i, __mmask16 mask) {
  if (ST == F32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i);
  if (ST == F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// fp8 byte -> the fp16 pattern whose value is the fp8 value (e5m2), or the fp8 value / 256 (e4m3).
template <int D>
inline __m256i fp8_to_f16_bits(__m256i v) {
  if (D == FP8_E5M2) return _mm256_slli_epi16(v, 8);
  const __m256i mag = _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), 7);
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8);
  return _mm256_or_si256(mag, sign);
}

// 32 codes of one row starting at element k0 (a multiple of 32) -> two vectors of 16 values.
// TABLE4 gives the even elements in w0 and the odd ones in w1 (x is de-interleaved to match);
// the byte formats give elements k0..k0+15 and k0+16..k0+31.
template <int D>
inline void decode32(const uint8_t* row, int64_t k0, __m512 table, __m512& w0, __m512& w1) {
  if (D == TABLE4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 / 2)));
    w0 = _mm512_permutexvar_ps(v, table);  // uses the low 4 bits of each index: the low nibble
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  } else {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 + 16));
    if (D == INT8) {
      w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a));
      w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    } else if (D == UINT8) {
      w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(a));
      w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
    } else {
      w0 = _mm512_cvtph_ps(fp8_to_f16_bits<D>(_mm256_cvtepu8_epi16(a)));
      w1 = _mm512_cvtph_ps(fp8_to_f16_bits<D>(_mm256_cvtepu8_epi16(b)));
    }
  }
}

// Ask for the codes a later block of rows reads at this offset, once per 64-byte line, into L2:
// a decode step streams the weights from memory, and with the hardware prefetcher alone the
// GEMV read about half the copy bandwidth (rows of 1 KB are short streams). The distance is a
// whole number of R-row blocks (the same offset in a later block), at least 32 KB: measured on
// Zen 4, 1 block (4 KB for K = 2048) gained 1.3x, 32 KB another 1.7x; 64 KB no more.
inline int64_t prefetch_distance(int64_t block_bytes) {
  return block_bytes * ((32768 + block_bytes - 1) / block_bytes);
}

inline void prefetch_next(const uint8_t* row, int64_t byte, int64_t ahead) {
  if ((byte & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + byte + ahead), _MM_HINT_T1);
}

// One code (any k) -> its decoded value, for the tail that is not a multiple of 32.
template <int D>
inline float decode1(const uint8_t* row, int64_t k, const float* table) {
  if (D == TABLE4) return table[(row[k / 2] >> (4 * (k & 1))) & 15];
  const uint8_t b = row[k];
  if (D == INT8) return float(int8_t(b));
  if (D == UINT8) return float(b);
  const uint16_t h = uint16_t(D == FP8_E5M2 ? b << 8 : ((b & 0x7F) << 7) | ((b & 0x80) << 8));
  return f16_to_f32(h);
}

struct Args {
  const uint8_t* codes;
  int64_t rb;  // bytes per row
  const void* scales;
  int st;
  const void* zeros;  // nullptr when symmetric
  int zt;
  int64_t G, g, K, N;
  const float* table;
  float smul;  // folded into every scale (256 for fp8 e4m3, else 1)
  int64_t rg = 0;  // > 0: x holds one [M, K] block per rg rows (output-axis groups)
};

// The scales of one 32-code step of groups of 16, as lanes: the TABLE4 decoder gives even and
// odd elements, so lanes 0-7 hold elements of the step's first group and lanes 8-15 the second's.
inline __m512 pair_scales(const Args& a, int64_t row, int64_t step) {
  const int64_t j = 2 * step;
  const float* s = static_cast<const float*>(a.scales) + row * a.G;
  const float hi = j + 1 < a.G ? s[j + 1] : 0.f;
  return _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(s[j] * a.smul), _mm512_set1_ps(hi * a.smul));
}

// The scale element k of a row takes (groups of 16, float32 scales).
inline float scale16_at(const Args& a, int64_t row, int64_t k) {
  return static_cast<const float*>(a.scales)[row * a.G + k / 16] * a.smul;
}

// R rows x MB tokens: y[m, r0 + r] for r < R, m < MB. xd: [MB, K] (de-interleaved for TABLE4),
// x: [MB, K] as given (for the tail), gsum: [MB, G] group sums of x (affine only).
// One token sums each group apart and scales the sum (acc); several tokens scale the decoded
// weights once and share them, so the R x MB accumulators are all the registers they need.
// sum_j s_j (z_j - b) gsum[m, j] for one row (the affine term), 16 groups at a time; z_j = 0
// without zero points; b: a constant the codes were shifted by (the int8-activation kernel).
template <int ST, int MB>
inline void zero_term(const Args& a, int64_t row, const float* gsum, float* corr, float b = 0.f) {
  __m512 c[MB];
  UNROLL for (int m = 0; m < MB; ++m) c[m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < a.G; j += 16) {
    const __mmask16 mask = a.G - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.G - j)) - 1);
    const __m512 z = a.zeros ? scales16<ST>(a.zeros, row * a.G + j, mask) : _mm512_setzero_ps();
    const __m512 sz = _mm512_mul_ps(scales16<ST>(a.scales, row * a.G + j, mask), _mm512_sub_ps(z, _mm512_set1_ps(b)));
    UNROLL for (int m = 0; m < MB; ++m) c[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mask, gsum + m * a.G + j), c[m]);
  }
  UNROLL for (int m = 0; m < MB; ++m) corr[m] = _mm512_reduce_add_ps(c[m]) * a.smul;
}

template <int D, int ST, int R, int MB, bool G16>
void rows_kernel(const Args& a, int64_t r0, const float* xd, const float* x, const float* gsum, float* y) {
  constexpr bool SCALED = MB > 1;
  const __m512 table = _mm512_loadu_ps(a.table);
  const int64_t K = a.K, K32 = K & ~int64_t(31);
  const uint8_t* rows[R];
  UNROLL for (int r = 0; r < R; ++r) rows[r] = a.codes + (r0 + r) * a.rb;
  const int64_t ahead = prefetch_distance(R * a.rb);
  __m512 tot[R][MB];
  float tail[R][MB], corr[R][MB];  // the ragged end; the affine term
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_setzero_ps(), tail[r][m] = 0.f, corr[r][m] = 0.f;
  const int64_t steps = G16 ? (K + 31) / 32 : a.G;  // groups, or 32-code steps of two groups of 16
  for (int64_t j = 0; j < steps; ++j) {
    float s[R];
    __m512 sv[R], acc[R][MB];
    UNROLL for (int r = 0; r < R; ++r) {
      s[r] = G16 ? 1.f : scale_at<ST>(a.scales, (r0 + r) * a.G + j) * a.smul;
      sv[r] = G16 ? pair_scales(a, r0 + r, j) : _mm512_set1_ps(s[r]);
      UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    const int64_t kbeg = G16 ? 32 * j : j * a.g;
    const int64_t kend = std::min(K32, G16 ? kbeg + 32 : (j + 1) * a.g);
    for (int64_t k0 = kbeg; k0 < kend; k0 += 32) {
      __m512 w0[R], w1[R];
      UNROLL for (int r = 0; r < R; ++r) {
        prefetch_next(rows[r], D == TABLE4 ? k0 / 2 : k0, ahead);
        decode32<D>(rows[r], k0, table, w0[r], w1[r]);
        if (SCALED) w0[r] = _mm512_mul_ps(w0[r], sv[r]), w1[r] = _mm512_mul_ps(w1[r], sv[r]);
      }
      // x is read from L1 at each use: holding MB tokens of it in registers would spill
      UNROLL for (int m = 0; m < MB; ++m) {
        const __m512 x0 = _mm512_loadu_ps(xd + m * K + k0), x1 = _mm512_loadu_ps(xd + m * K + k0 + 16);
        UNROLL for (int r = 0; r < R; ++r) {
          __m512& t = SCALED ? tot[r][m] : acc[r][m];
          t = _mm512_fmadd_ps(w0[r], x0, t);
          t = _mm512_fmadd_ps(w1[r], x1, t);
        }
      }
    }
    const bool last = j == steps - 1;
    UNROLL for (int r = 0; r < R; ++r) {
      if (!SCALED) UNROLL for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv[r], tot[r][m]);
      if (last && K32 < K) {  // the ragged end of the row: fewer than 32 values
        UNROLL for (int m = 0; m < MB; ++m) {
          float t = 0.f;
          for (int64_t k = K32; k < K; ++k)
            t += decode1<D>(rows[r], k, a.table) * x[m * K + k] * (G16 ? scale16_at(a, r0 + r, k) : 1.f);
          tail[r][m] += s[r] * t;
        }
      }
    }
  }
  if (a.zeros) UNROLL for (int r = 0; r < R; ++r) zero_term<ST, MB>(a, r0 + r, gsum, corr[r]);
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int m = 0; m < MB; ++m) y[m * a.N + r0 + r] = _mm512_reduce_add_ps(tot[r][m]) + tail[r][m] - corr[r][m];
}

constexpr int MB_MAX = 4;  // tokens per pass; more tokens take more passes over the rows (in cache)

template <int D, int ST, int R, bool G16>
void rows_any_mb(const Args& a, int64_t r0, int64_t M, const float* xd, const float* x, const float* gsum, float* y) {
  for (int64_t m0 = 0; m0 < M; m0 += MB_MAX) {
    const float* xd0 = xd + m0 * a.K;
    const float* x0 = x + m0 * a.K;
    const float* gs = gsum ? gsum + m0 * a.G : nullptr;
    float* y0 = y + m0 * a.N;
    switch (std::min<int64_t>(MB_MAX, M - m0)) {
      case 1: rows_kernel<D, ST, R, 1, G16>(a, r0, xd0, x0, gs, y0); break;
      case 2: rows_kernel<D, ST, R, 2, G16>(a, r0, xd0, x0, gs, y0); break;
      case 3: rows_kernel<D, ST, R, 3, G16>(a, r0, xd0, x0, gs, y0); break;
      default: rows_kernel<D, ST, R, 4, G16>(a, r0, xd0, x0, gs, y0); break;
    }
  }
}

template <int D, int ST, bool G16 = false>
void gemv(const Args& a, int64_t M, const float* xd, const float* x, const float* gsum, float* y) {
  constexpr int R = 4;  // rows at a time: independent accumulators that hide the FMA latency
  const int64_t blocks = a.N / R;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (a.K * R * M));  // ~64K MACs
  // with output-axis groups, rows r0.. read their group's block of x (rg is a multiple of R)
  auto at_row = [&](int64_t r0, const float* p, int64_t width) { return a.rg ? p + (r0 / a.rg) * M * width : p; };
  auto run = [&](auto rows, int64_t r0) {
    constexpr int RR = decltype(rows)::value;
    rows_any_mb<D, ST, RR, G16>(a, r0, M, at_row(r0, xd, a.K), at_row(r0, x, a.K),
                                gsum ? at_row(r0, gsum, a.G) : nullptr, y);
  };
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) run(std::integral_constant<int, R>{}, b * R);
  });
  for (int64_t r = blocks * R; r < a.N; ++r) run(std::integral_constant<int, 1>{}, r);  // N % R rows
}

// Dequantize rows [r0, r1) to float32 or bfloat16 (round to nearest even), computing
// (decode - z) * s exactly as QTensor.dequantize does, so the values are bit for bit the same.
template <int D, bool BF16OUT>
void dequant_rows(const Args& a, int64_t r0, int64_t r1, void* out) {
  const __m512 table = _mm512_loadu_ps(a.table);
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const int64_t K = a.K, K32 = K & ~int64_t(31);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.codes + r * a.rb;
    float* of = static_cast<float*>(out) + r * K;
    uint16_t* ob = static_cast<uint16_t*>(out) + r * K;
    auto store16 = [&](int64_t k, __m512 v) {
      if (BF16OUT) {
        __m512i b = _mm512_castps_si512(v);  // round to nearest even on the top 16 bits
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ob + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
      } else {
        _mm512_storeu_ps(of + k, v);
      }
    };
    // group index of element k: groups of 16 step 32 codes (two groups) at a time
    auto scale_of = [&](int64_t grp) { return load_scalar(a.scales, a.st, r * a.G + grp) * a.smul; };
    auto zero_of = [&](int64_t grp) { return a.zeros ? load_scalar(a.zeros, a.zt, r * a.G + grp) : 0.f; };
    const int64_t steps = a.g == 16 ? (K + 31) / 32 : a.G, span = a.g == 16 ? 32 : a.g;
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t g0 = a.g == 16 ? 2 * j : j, g1 = a.g == 16 ? std::min(2 * j + 1, a.G - 1) : j;
      const __m512 s0 = _mm512_set1_ps(scale_of(g0)), z0 = _mm512_set1_ps(zero_of(g0));
      const __m512 s1 = _mm512_set1_ps(scale_of(g1)), z1 = _mm512_set1_ps(zero_of(g1));
      const int64_t kend = std::min(K32, (j + 1) * span);
      for (int64_t k0 = j * span; k0 < kend; k0 += 32) {
        __m512 w0, w1;
        decode32<D>(row, k0, table, w0, w1);
        if (D == TABLE4) {  // even/odd -> natural order
          const __m512 e = w0;
          w0 = _mm512_permutex2var_ps(e, lo_idx, w1);
          w1 = _mm512_permutex2var_ps(e, hi_idx, w1);
        }
        if (a.zeros) w0 = _mm512_sub_ps(w0, z0), w1 = _mm512_sub_ps(w1, z1);
        store16(k0, _mm512_mul_ps(w0, s0));
        store16(k0 + 16, _mm512_mul_ps(w1, s1));
      }
      if (j == steps - 1)
        for (int64_t k = K32; k < K; ++k) {
          const int64_t grp = std::min(k / a.g, a.G - 1);
          const float v = (decode1<D>(row, k, a.table) - zero_of(grp)) * scale_of(grp);
          if (BF16OUT) {
            uint32_t b;
            std::memcpy(&b, &v, 4);
            ob[k] = uint16_t((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
          } else {
            of[k] = v;
          }
        }
    }
  }
}

// 4-bit codes to bfloat16, a group's 16 possible values at a time: each group's table
// (table[c] - z) * s is computed in float32 as dequant_rows computes each value, rounded to bf16
// once, and then 32 codes become 32 bf16 values in natural order with one vpermw (decode_bf16's
// BLK 32 indexing: word 2i is byte i, word 2i+1 is byte i >> 4, the table duplicated in both
// halves). The values are bit for bit dequant_rows' at about a quarter of the instructions:
// this is the prefill route's cost for bf16 activations. Groups that are multiples of 32.
inline __m512i round_bf16(__m512 v) {  // float32 -> bf16 in the low half of each dword, round half to even
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  return _mm512_srli_epi32(b, 16);
}

void dequant_rows_table4_bf16(const Args& a, int64_t r0, int64_t r1, uint16_t* out) {
  const __m512 table = _mm512_loadu_ps(a.table);
  const int64_t K = a.K, K32 = K & ~int64_t(31);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.codes + r * a.rb;
    uint16_t* o = out + r * K;
    for (int64_t j = 0; j < a.G; ++j) {
      const float s = load_scalar(a.scales, a.st, r * a.G + j) * a.smul;
      const float z = a.zeros ? load_scalar(a.zeros, a.zt, r * a.G + j) : 0.f;
      __m512 v = table;
      if (a.zeros) v = _mm512_sub_ps(v, _mm512_set1_ps(z));
      const __m256i t16 = _mm512_cvtepi32_epi16(round_bf16(_mm512_mul_ps(v, _mm512_set1_ps(s))));
      const __m512i t = _mm512_inserti64x4(_mm512_castsi256_si512(t16), t16, 1);
      const int64_t kend = std::min(K32, (j + 1) * a.g);
      for (int64_t k0 = j * a.g; k0 < kend; k0 += 32) {
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 / 2)));
        _mm512_storeu_si512(o + k0, _mm512_permutexvar_epi16(_mm512_or_si512(c, _mm512_slli_epi32(c, 12)), t));
      }
      if (j == a.G - 1)
        for (int64_t k = K32; k < K; ++k) {
          const float x = (decode1<TABLE4>(row, k, a.table) - z) * s;
          uint32_t b;
          std::memcpy(&b, &x, 4);
          o[k] = uint16_t((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
        }
    }
  }
}

template <int D>
void dequant(const Args& a, bool bf16, void* out) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / a.K);
  const bool table_bf16 = D == TABLE4 && bf16 && (a.G == 1 || a.g % 32 == 0);
  at::parallel_for(0, a.N, grain, [&](int64_t r0, int64_t r1) {
    if (table_bf16) dequant_rows_table4_bf16(a, r0, r1, static_cast<uint16_t*>(out));
    else if (bf16) dequant_rows<D, true>(a, r0, r1, out);
    else dequant_rows<D, false>(a, r0, r1, out);
  });
}

// x [M, K] -> x with each 32-block's even elements first, then its odd ones (TABLE4's order).
void deinterleave(const float* x, int64_t M, int64_t K, float* xd) {
  const int64_t K32 = K & ~int64_t(31);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 < K32; k0 += 32) {
      const __m512 a = _mm512_loadu_ps(x + m * K + k0), b = _mm512_loadu_ps(x + m * K + k0 + 16);
      _mm512_storeu_ps(xd + m * K + k0, _mm512_permutex2var_ps(a, even, b));
      _mm512_storeu_ps(xd + m * K + k0 + 16, _mm512_permutex2var_ps(a, odd, b));
    }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")

// bf16 input, 4-bit codes whose table values bf16 holds exactly (int4, uint4, fp4_e2m1; not nf4):
// vdpbf16ps multiplies 32 bf16 code values by 32 bf16 inputs and adds pairs into 16 float32
// lanes. Each product of two bf16 values is exact in float32, so the sums are float32 sums as in
// the float32 kernel, at half the instructions per MAC. The pairs are adjacent elements, which is
// how a byte holds two nibbles: lane i gets element 2i (low nibble) and 2i+1 (high nibble), so x
// is read in its natural order. (The instruction flushes bf16 subnormals, |x| < 1.2e-38, to 0.)
//
// Two decoders. BLK 32: 16 bytes of one row (32 codes) -> 32 bf16 values in natural order, one
// vpermw: word 2i's index is byte i (its low 5 bits pick the table entry, which is duplicated in
// both halves so bit 4 does not matter), word 2i+1's index is byte i >> 4. BLK 64: 32 bytes (64
// codes) -> the even elements (low nibbles) and the odd ones (high nibbles), two vpermw and no
// shuffling; x is de-interleaved per 64-block to match (deinterleave_bf16). Fewer instructions
// per code, used where every group is a multiple of 64 codes.
template <int BLK>
inline void decode_bf16(const uint8_t* p, __m512i table, __m512i& w0, __m512i& w1) {
  if (BLK == 32) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w0 = _mm512_permutexvar_epi16(_mm512_or_si512(v, _mm512_slli_epi32(v, 12)), table);
  } else {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    w0 = _mm512_permutexvar_epi16(b, table);
    w1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
  }
}

// R rows x MB tokens, as rows_kernel; x: bf16 [MB, K] (de-interleaved per 64-block for BLK 64;
// the ragged end past the last whole block as given); one float32 sum per group and (row, token),
// scaled at the group's end (bf16 weights cannot be pre-scaled exactly).
template <int ST, int BLK, int R, int MB>
void rows_kernel_bf16(const Args& a, const __m512i table, int64_t r0, const uint16_t* x, const float* gsum,
                      float* y) {
  const int64_t K = a.K, KB = K / BLK * BLK;
  const uint8_t* rows[R];
  UNROLL for (int r = 0; r < R; ++r) rows[r] = a.codes + (r0 + r) * a.rb;
  __m512 tot[R][MB];
  float tail[R][MB], corr[R][MB];
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_setzero_ps(), tail[r][m] = 0.f, corr[r][m] = 0.f;
  const int64_t ahead = prefetch_distance(R * a.rb);
  alignas(64) float sbuf[R][16];  // the next 16 groups' scales as float32, widened 16 at a time
  for (int64_t j = 0; j < a.G; ++j) {
    if (j % 16 == 0) {
      const __mmask16 mask = a.G - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.G - j)) - 1);
      UNROLL for (int r = 0; r < R; ++r) _mm512_store_ps(sbuf[r], scales16<ST>(a.scales, (r0 + r) * a.G + j, mask));
    }
    __m512 acc[R][MB];
    UNROLL for (int r = 0; r < R; ++r) UNROLL for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t kend = std::min(KB, (j + 1) * a.g);
    for (int64_t k0 = j * a.g; k0 < kend; k0 += BLK) {
      __m512i w0[R], w1[R];
      UNROLL for (int r = 0; r < R; ++r) {
        prefetch_next(rows[r], k0 / 2, ahead);
        decode_bf16<BLK>(rows[r] + k0 / 2, table, w0[r], w1[r]);
      }
      UNROLL for (int m = 0; m < MB; ++m) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + m * K + k0);
        UNROLL for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w0[r], x0);
        if (BLK == 64) {
          const __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + m * K + k0 + 32);
          UNROLL for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)w1[r], x1);
        }
      }
    }
    const bool last = j == a.G - 1;
    UNROLL for (int r = 0; r < R; ++r) {
      const float s = sbuf[r][j % 16];  // 4-bit codes: no factor folded into the scales (smul 1)
      const __m512 sv = _mm512_set1_ps(s);
      UNROLL for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
      if (last && KB < K) {  // the ragged end of the row: fewer than BLK values (in the last group)
        UNROLL for (int m = 0; m < MB; ++m) {
          float t = 0.f;
          for (int64_t k = KB; k < K; ++k) t += decode1<TABLE4>(rows[r], k, a.table) * bf16_to_f32(x[m * K + k]);
          tail[r][m] += s * t;
        }
      }
    }
  }
  if (a.zeros) UNROLL for (int r = 0; r < R; ++r) zero_term<ST, MB>(a, r0 + r, gsum, corr[r]);
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int m = 0; m < MB; ++m) y[m * a.N + r0 + r] = _mm512_reduce_add_ps(tot[r][m]) + tail[r][m] - corr[r][m];
}

// Rows [r0, r1) for tokens [0, MB).
template <int ST, int BLK, int R, int MB>
void rows_range_bf16(const Args& a, const __m512i table, int64_t r0, int64_t r1, const uint16_t* x, const float* gsum,
                     float* y) {
  int64_t r = r0;
  for (; r + R <= r1; r += R) rows_kernel_bf16<ST, BLK, R, MB>(a, table, r, x, gsum, y);
  for (; r < r1; ++r) rows_kernel_bf16<ST, BLK, 1, MB>(a, table, r, x, gsum, y);
}

template <int ST, int BLK>
void gemv_bf16(const Args& a, int64_t M, const uint16_t* x, const float* gsum, float* y) {
  alignas(64) uint16_t words[32];
  for (int i = 0; i < 32; ++i) {  // the table as bf16 (exact: checked by the caller), twice
    uint32_t b;
    std::memcpy(&b, a.table + (i & 15), 4);
    words[i] = uint16_t(b >> 16);
  }
  const __m512i table = _mm512_load_si512(words);
  constexpr int64_t RB = 4;  // rows per parallel block
  const int64_t blocks = (a.N + RB - 1) / RB;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (a.K * RB * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * RB, r1 = std::min(a.N, b1 * RB);
    for (int64_t m0 = 0; m0 < M; m0 += 2) {  // 2 tokens a pass: 4 rows x 3-4 tokens measured slower
      const uint16_t* xm = x + m0 * a.K;
      const float* gs = gsum ? gsum + m0 * a.G : nullptr;
      float* ym = y + m0 * a.N;
      if (M - m0 == 1) rows_range_bf16<ST, BLK, 4, 1>(a, table, r0, r1, xm, gs, ym);
      else rows_range_bf16<ST, BLK, 4, 2>(a, table, r0, r1, xm, gs, ym);
    }
  });
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")

// int8 activations (opt-in: kernels/qmatmul.py), 4-bit codes whose table is u + b with u the code
// (uint4: b = 0) or the code with its top bit flipped (int4: b = -8), groups that are multiples
// of 64 or span the row. Each token's x is quantized per 64-block: xs = max|x| / 127, xq =
// round(x / xs) (as llama.cpp's Q8 activations, which are blocks of 32). vpdpbusd multiplies 64
// unsigned codes by 64 int8 activations and adds fours into 16 int32 lanes, exactly; each
// 128-code step is one 64-byte load of codes, the low nibbles (even elements) and the high ones
// (odd elements) against xq laid out to match: per step, the 64 even elements, then the 64 odd.
// Lanes 0-7 then hold the first 64-block's sums and lanes 8-15 the second's, each scaled by its
// weight scale times its activation scale in float32.
//   y = sum_steps (dot_int32 * s * xs) + tail - sum_j s_j (z_j - b) gsum_j
// with gsum_j the sum of the quantized activations (xq * xs) in group j. The ragged end of a row
// (K % 128 codes) is summed in float32 with x as given.
struct I8Input {
  const int8_t* xq;   // [M][steps][128]
  const float* xsv;   // [M][steps][16]: lanes 0-7 the first 64-block's scale, 8-15 the second's
  const float* x;     // [M][K] as given (the ragged end)
  const float* gsum;  // [M][G]
  int64_t steps;
  uint8_t flip;       // 0x88: int4 codes, read as code ^ 8 (then the value is u - 8)
  float b;
};

template <int ST, int R, int MB>
void rows_kernel_i8(const Args& a, const I8Input& in, int64_t r0, float* y) {
  const int64_t K = a.K, K128 = in.steps * 128;
  const uint8_t* rows[R];
  UNROLL for (int r = 0; r < R; ++r) rows[r] = a.codes + (r0 + r) * a.rb;
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(char(in.flip));
  const int64_t ahead = prefetch_distance(R * a.rb);
  __m512 tot[R][MB];
  UNROLL for (int r = 0; r < R; ++r) UNROLL for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < in.steps; ++c) {
    const int64_t k0 = 128 * c;
    __m512i lo[R], hi[R];
    __m512 sv[R];
    UNROLL for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + k0 / 2 + ahead), _MM_HINT_T1);
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(rows[r] + k0 / 2), flip);
      lo[r] = _mm512_and_si512(v, low4);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const float s0 = scale_at<ST>(a.scales, (r0 + r) * a.G + k0 / a.g);
      const float s1 = scale_at<ST>(a.scales, (r0 + r) * a.G + (k0 + 64) / a.g);
      sv[r] = _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(s0), _mm512_set1_ps(s1));
    }
    UNROLL for (int m = 0; m < MB; ++m) {
      const int8_t* xq = in.xq + (m * in.steps + c) * 128;
      const __m512i even = _mm512_loadu_si512(xq), odd = _mm512_loadu_si512(xq + 64);
      const __m512 xs = _mm512_loadu_ps(in.xsv + (m * in.steps + c) * 16);
      UNROLL for (int r = 0; r < R; ++r) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], even), hi[r], odd);
        tot[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv[r], xs), tot[r][m]);
      }
    }
  }
  float tail[R][MB], corr[R][MB];
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int m = 0; m < MB; ++m) {
      float t = 0.f;
      for (int64_t k = K128; k < K; ++k) {
        const int u = ((rows[r][k / 2] >> (4 * (k & 1))) & 15) ^ (in.flip & 15);
        t += float(u) * in.x[m * K + k] * scale_at<ST>(a.scales, (r0 + r) * a.G + k / a.g);
      }
      tail[r][m] = t;
    }
    zero_term<ST, MB>(a, r0 + r, in.gsum, corr[r], in.b);
  }
  UNROLL for (int r = 0; r < R; ++r)
    UNROLL for (int m = 0; m < MB; ++m) y[m * a.N + r0 + r] = _mm512_reduce_add_ps(tot[r][m]) + tail[r][m] - corr[r][m];
}

// Tokens two at a time (the registers hold 4 rows x 2 tokens of sums besides the codes).
template <int ST, int R>
void rows_i8(const Args& a, const I8Input& in, int64_t M, int64_t r0, float* y) {
  for (int64_t m0 = 0; m0 < M; m0 += 2) {
    I8Input at = in;
    at.xq += m0 * in.steps * 128, at.xsv += m0 * in.steps * 16, at.x += m0 * a.K, at.gsum += m0 * a.G;
    if (M - m0 == 1) rows_kernel_i8<ST, R, 1>(a, at, r0, y + m0 * a.N);
    else rows_kernel_i8<ST, R, 2>(a, at, r0, y + m0 * a.N);
  }
}

template <int ST>
void gemv_i8(const Args& a, const I8Input& in, int64_t M, float* y) {
  constexpr int R = 4;
  const int64_t blocks = a.N / R;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (a.K * R * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows_i8<ST, R>(a, in, M, b * R, y);
  });
  for (int64_t r = blocks * R; r < a.N; ++r) rows_i8<ST, 1>(a, in, M, r, y);
}

// x [M, K] -> per 64-block scales and int8 codes in the step layout, and gsum of what they stand for.
void quantize_x_i8(const float* x, int64_t M, int64_t K, int64_t G, int64_t g, int64_t steps, int8_t* xq,
                   float* xsv, float* gsum) {
  const int64_t K128 = steps * 128;
  std::fill(gsum, gsum + M * G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    for (int64_t k0 = 0; k0 < K128; k0 += 64) {
      float amax = 0.f;
      for (int64_t k = k0; k < k0 + 64; ++k) amax = std::max(amax, std::fabs(xm[k]));
      const float xs = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      const int64_t c = k0 / 128, half = (k0 / 64) % 2;
      int8_t* e = xq + (m * steps + c) * 128;
      for (int i = 0; i < 8; ++i) xsv[(m * steps + c) * 16 + 8 * half + i] = xs;
      for (int64_t k = k0; k < k0 + 64; ++k) {
        const int q = int(std::nearbyint(xm[k] * inv));  // round half to even (the default mode)
        const int64_t i = k - 128 * c;                   // element within the step
        e[(i % 2) * 64 + i / 2] = int8_t(q);
        gsum[m * G + k / g] += float(q) * xs;
      }
    }
    for (int64_t k = K128; k < K; ++k) gsum[m * G + k / g] += xm[k];
  }
}

#pragma GCC pop_options

Args make_args(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
               const at::Tensor& table, int64_t N, int64_t K, int64_t group, int64_t decoder, double scale_mul) {
  TORCH_CHECK(decoder >= TABLE4 && decoder <= FP8_E5M2, "lowbit qmatmul: unknown decoder ", decoder);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "lowbit qmatmul: codes must be contiguous uint8");
  TORCH_CHECK(decoder != TABLE4 || K % 2 == 0, "lowbit qmatmul: 4-bit rows need an even K");
  TORCH_CHECK(codes.numel() >= N * row_bytes(decoder, K), "lowbit qmatmul: codes hold fewer bytes than [N, K] needs");
  const int64_t G = (K + group - 1) / group;
  TORCH_CHECK(G == 1 || group % 32 == 0 || (group == 16 && decoder == TABLE4 && scales.scalar_type() == at::kFloat),
              "lowbit qmatmul: the group size must be a multiple of 32 (or span the row), or 16 for 4-bit codes "
              "with float32 scales");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == N * G, "lowbit qmatmul: scales must be contiguous [N, G]");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == 16,
              "lowbit qmatmul: table must be 16 contiguous float32 values");
  Args a{codes.data_ptr<uint8_t>(), row_bytes(decoder, K), scales.data_ptr(), scale_type(scales), nullptr, F32,
         G, G == 1 ? K : group, K, N, table.data_ptr<float>(), float(scale_mul)};
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->is_contiguous() && zeros->numel() == N * G, "lowbit qmatmul: zeros must be contiguous [N, G]");
    TORCH_CHECK(zeros->scalar_type() == scales.scalar_type(), "lowbit qmatmul: zeros must have the scales' dtype");
    a.zeros = zeros->data_ptr();
    a.zt = scale_type(*zeros);
  }
  return a;
}

bool available() { return cpu_has_avx512(); }

// x: float32 [M, K] contiguous -> y: float32 [M, N].
void gemv_dispatch(const Args& a, int64_t decoder, int64_t M, const float* xd, const float* xp, const float* gs,
                   float* yp) {
  TORCH_CHECK(decoder == TABLE4 || a.st == F32, "lowbit qmatmul: 8-bit codes take float32 scales");
  if (a.g == 16 && a.G > 1) {
    gemv<TABLE4, F32, true>(a, M, xd, xp, gs, yp);
    return;
  }
  switch (decoder * 3 + a.st) {
    case TABLE4 * 3 + F32: gemv<TABLE4, F32>(a, M, xd, xp, gs, yp); break;
    case TABLE4 * 3 + F16: gemv<TABLE4, F16>(a, M, xd, xp, gs, yp); break;
    case TABLE4 * 3 + BF16: gemv<TABLE4, BF16>(a, M, xd, xp, gs, yp); break;
    case INT8 * 3: gemv<INT8, F32>(a, M, xd, xp, gs, yp); break;
    case UINT8 * 3: gemv<UINT8, F32>(a, M, xd, xp, gs, yp); break;
    case FP8_E4M3 * 3: gemv<FP8_E4M3, F32>(a, M, xd, xp, gs, yp); break;
    default: gemv<FP8_E5M2, F32>(a, M, xd, xp, gs, yp); break;
  }
}

// Output-axis groups of row_group rows (see the top): col_scales and col_shift (z * s) are
// [ceil(N / row_group), K] float32; the codes are read with `scales` (ones) and no zeros.
at::Tensor gemv_op(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                const c10::optional<at::Tensor>& zeros, const at::Tensor& table, int64_t N, int64_t group,
                int64_t decoder, double scale_mul, int64_t row_group, const c10::optional<at::Tensor>& col_scales,
                const c10::optional<at::Tensor>& col_shift) {
  TORCH_CHECK(cpu_has_avx512(), "lowbit qmatmul: this CPU lacks AVX-512");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.is_contiguous(), "lowbit qmatmul: x must be contiguous float32 [M, K]");
  TORCH_CHECK(row_group >= 0 && row_group % 4 == 0, "lowbit qmatmul: row_group must be a multiple of 4");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const int64_t blocks = row_group ? (N + row_group - 1) / row_group : 1, MX = M * blocks;
  TORCH_CHECK(!row_group || (col_scales.has_value() && col_scales->scalar_type() == at::kFloat &&
                             col_scales->is_contiguous() && col_scales->numel() == blocks * K),
              "lowbit qmatmul: output-axis groups need col_scales, contiguous float32 [groups, K]");
  TORCH_CHECK(!col_shift.has_value() || (col_shift->scalar_type() == at::kFloat && col_shift->is_contiguous() &&
                                         col_shift->numel() == blocks * K),
              "lowbit qmatmul: col_shift must be contiguous float32 [groups, K]");
  Args a = make_args(codes, scales, zeros, table, N, K, group, decoder, scale_mul);
  a.rg = row_group;
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  std::vector<float> xs_buf;  // output-axis groups: x scaled by each row group's column scales
  if (row_group) {
    xs_buf.resize(MX * K);
    const float* cs = col_scales->data_ptr<float>();
    const float* x0 = x_in.data_ptr<float>();
    for (int64_t g = 0; g < blocks; ++g)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xs_buf[(g * M + m) * K + k] = cs[g * K + k] * x0[m * K + k];
  }
  const float* xp = row_group ? xs_buf.data() : x_in.data_ptr<float>();
  std::vector<float> xd_buf, gsum_buf;
  const float* xd = xp;
  if (decoder == TABLE4) {
    xd_buf.resize(MX * K);
    deinterleave(xp, MX, K, xd_buf.data());
    xd = xd_buf.data();
  }
  if (a.zeros) {
    gsum_buf.assign(MX * a.G, 0.f);
    for (int64_t m = 0; m < MX; ++m)
      for (int64_t j = 0; j < a.G; ++j)
        for (int64_t k = j * a.g; k < std::min(K, (j + 1) * a.g); ++k) gsum_buf[m * a.G + j] += xp[m * K + k];
  }
  const float* gs = a.zeros ? gsum_buf.data() : nullptr;
  float* yp = y.data_ptr<float>();
  if (row_group && col_shift.has_value()) {  // the zero points' term: (z s)_g . x per token and row group
    const float* cz = col_shift->data_ptr<float>();
    const float* x0 = x_in.data_ptr<float>();
    std::vector<float> shift(M * blocks, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < blocks; ++g) {
        float t = 0.f;
        for (int64_t k = 0; k < K; ++k) t += cz[g * K + k] * x0[m * K + k];
        shift[m * blocks + g] = t;
      }
    gemv_dispatch(a, decoder, M, xd, xp, gs, yp);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < N; ++r) yp[m * N + r] -= shift[m * blocks + r / row_group];
    return y;
  }
  gemv_dispatch(a, decoder, M, xd, xp, gs, yp);
  return y;
}



bool available_i8() { return cpu_has_avx512_vnni(); }

// x: float32 [M, K] contiguous, 4-bit codes, table[c] = (c ^ flip) + b with flip 0 or 8 (uint4,
// int4) -> y: float32 [M, N], with x quantized to int8 per 64-block (see gemv_i8).
at::Tensor gemv_i8_op(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& zeros, const at::Tensor& table, int64_t N, int64_t group) {
  TORCH_CHECK(cpu_has_avx512_vnni(), "lowbit qmatmul: this CPU lacks AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "lowbit qmatmul: x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  const Args a = make_args(codes, scales, zeros, table, N, K, group, TABLE4, 1.0);
  TORCH_CHECK(a.G == 1 || a.g % 64 == 0, "lowbit qmatmul: int8 activations take groups that are multiples of 64");
  const float* t = table.data_ptr<float>();
  const int flip = t[8] == 8.f ? 0 : 8;  // uint4 codes stand for themselves; int4's 8 is -8
  for (int c = 0; c < 16; ++c)
    TORCH_CHECK(t[c] == float((c ^ flip) - flip), "lowbit qmatmul: int8 activations take uint4 or int4 codes");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t steps = K / 128;
  std::vector<int8_t> xq(std::max<int64_t>(1, M * steps * 128));
  std::vector<float> xsv(std::max<int64_t>(1, M * steps * 16)), gsum(M * a.G);
  quantize_x_i8(x.data_ptr<float>(), M, K, a.G, a.g, steps, xq.data(), xsv.data(), gsum.data());
  const I8Input in{xq.data(), xsv.data(), x.data_ptr<float>(), gsum.data(), steps, uint8_t(flip ? 0x88 : 0),
                   float(-flip)};
  float* yp = y.data_ptr<float>();
  switch (a.st) {
    case F32: gemv_i8<F32>(a, in, M, yp); break;
    case F16: gemv_i8<F16>(a, in, M, yp); break;
    default: gemv_i8<BF16>(a, in, M, yp); break;
  }
  return y;
}

bool available_bf16() { return cpu_has_avx512_bf16(); }

// x: bfloat16 [M, K] contiguous, 4-bit codes whose table bf16 holds exactly -> y: float32 [M, N].
at::Tensor gemv_bf16_op(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& zeros, const at::Tensor& table, int64_t N, int64_t group) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "lowbit qmatmul: this CPU lacks AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "lowbit qmatmul: x must be contiguous bfloat16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  const Args a = make_args(codes, scales, zeros, table, N, K, group, TABLE4, 1.0);
  TORCH_CHECK(a.g % 32 == 0 || a.G == 1, "lowbit qmatmul: the bf16 kernel takes groups that are multiples of 32");
  const float* t = table.data_ptr<float>();
  for (int i = 0; i < 16; ++i) {
    uint32_t b;
    std::memcpy(&b, t + i, 4);
    TORCH_CHECK(bf16_to_f32(uint16_t(b >> 16)) == t[i],
                "lowbit qmatmul: the bf16 kernel needs a table bf16 holds exactly");
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<float> gsum_buf;
  if (a.zeros) {
    gsum_buf.assign(M * a.G, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < a.G; ++j)
        for (int64_t k = j * a.g; k < std::min(K, (j + 1) * a.g); ++k)
          gsum_buf[m * a.G + j] += bf16_to_f32(xp[m * K + k]);
  }
  const float* gs = a.zeros ? gsum_buf.data() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool blk64 = a.g % 64 == 0 || a.G == 1;  // every 64-block lies in one group
  std::vector<uint16_t> xd;
  if (blk64) {  // each 64-block: its even elements, then its odd ones (the BLK 64 decoder's order)
    xd.assign(xp, xp + M * K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k0 = 0; k0 + 64 <= K; k0 += 64)
        for (int t = 0; t < 32; ++t)
          xd[m * K + k0 + t] = xp[m * K + k0 + 2 * t], xd[m * K + k0 + 32 + t] = xp[m * K + k0 + 2 * t + 1];
    xp = xd.data();
  }
  switch (a.st * 2 + blk64) {
    case F32 * 2: gemv_bf16<F32, 32>(a, M, xp, gs, yp); break;
    case F32 * 2 + 1: gemv_bf16<F32, 64>(a, M, xp, gs, yp); break;
    case F16 * 2: gemv_bf16<F16, 32>(a, M, xp, gs, yp); break;
    case F16 * 2 + 1: gemv_bf16<F16, 64>(a, M, xp, gs, yp); break;
    case BF16 * 2: gemv_bf16<BF16, 32>(a, M, xp, gs, yp); break;
    default: gemv_bf16<BF16, 64>(a, M, xp, gs, yp); break;
  }
  return y;
}

// out [N, K] float32 or bfloat16 <- the dequantized weight.
void dequantize_op(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                   const at::Tensor& table, int64_t N, int64_t K, int64_t group, int64_t decoder, double scale_mul,
                   const at::Tensor& out) {
  TORCH_CHECK(cpu_has_avx512(), "lowbit qmatmul: this CPU lacks AVX-512");
  const Args a = make_args(codes, scales, zeros, table, N, K, group, decoder, scale_mul);
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == at::kFloat) && out.is_contiguous() && out.numel() == N * K,
              "lowbit qmatmul: out must be a contiguous float32 or bfloat16 [N, K]");
  void* p = out.data_ptr();
  switch (decoder) {
    case TABLE4: dequant<TABLE4>(a, bf16, p); break;
    case INT8: dequant<INT8>(a, bf16, p); break;
    case UINT8: dequant<UINT8>(a, bf16, p); break;
    case FP8_E4M3: dequant<FP8_E4M3>(a, bf16, p); break;
    default: dequant<FP8_E5M2>(a, bf16, p); break;
  }
}

}  // namespace

TORCH_LIBRARY(lowbit_qmatmul, m) {
  m.def("available() -> bool", &available);
  m.def("available_bf16() -> bool", &available_bf16);
  m.def("available_i8() -> bool", &available_i8);
  m.def("gemv_i8(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor table, int N, int group) -> Tensor",
        &gemv_i8_op);
  m.def("gemv_bf16(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor table, int N, int group) -> Tensor",
        &gemv_bf16_op);
  m.def("gemv(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor table, int N, int group, int decoder, "
        "float scale_mul, int row_group=0, Tensor? col_scales=None, Tensor? col_shift=None) -> Tensor", &gemv_op);
  m.def("dequantize(Tensor codes, Tensor scales, Tensor? zeros, Tensor table, int N, int K, int group, "
        "int decoder, float scale_mul, Tensor(a!) out) -> ()", &dequantize_op);
}
