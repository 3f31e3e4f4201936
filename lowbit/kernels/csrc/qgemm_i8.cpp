// Prefill GEMM on int8 activations: y = x @ W^T for weights whose code levels are integers (uint4,
// int4, fp4 e2m1 x 2, uint8, int8) or a codebook rounded to 8 bits (nf4's 16 levels; fp8's 256,
// through a 256-byte table, on CPUs with AVX512-VBMI), in groups along the input axis, read from
// lowbit's packed codes.
//
// Why int8: at prefill sizes the bf16 GEMM is compute-bound (torch's reaches about 80% of this
// CPU's vdpbf16ps peak), so dequantizing W to bf16 first can only add time. vpdpbusd multiplies 64
// unsigned bytes by 64 signed bytes into 16 int32 lanes, twice the products per instruction of
// vdpbf16ps, with the codes used as bytes (no dequantization at all).
//
//   x: each token quantized per block of BK = 64 inputs (32 for groups of 32): xs = max|x| / 127,
//      xq = round(x / xs), as the int8 decode GEMV and llama.cpp's Q8 activations do;
//   W: each code c becomes a byte u (4-bit: a 16-entry table; 8-bit codebooks: a 256-entry one;
//      int8: c + 128), its level
//      (u - off) * smul, the weight (level - z) * s per group;
//   y[m, n] = sum_groups s_g smul [sum_blocks xs_b (u . xq)_b] - s_g (off smul + z_g) gsum[m, g]
// with gsum the group sums of the quantized x (xq * xs). Integer dot products per block are exact;
// the rest is float32.
//
// Layout: 32 rows at a time (two vectors of 16 lanes) are repacked per call into a tile that
// holds, for every 4 consecutive inputs, one 32-bit word per row (the four codes as bytes): one
// vector load then feeds vpdpbusd for 16 rows, each lane summing its row's 4 products, against the
// token's 4 quantized inputs broadcast. The tile (32 x K bytes) is reused by every token; MR
// tokens at a time keep 2 x MR int32 block sums and 2 x MR float32 totals in registers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace lowbit_kernels;

enum CodeKind : int64_t { FOUR = 0, UINT8 = 2, INT8 = 3, LUT8 = 4 };

constexpr int NR = 32;  // rows per tile
constexpr int MR = 6;   // tokens per pass: 24 accumulators + 2 code vectors + 1 input in 32 registers
constexpr int64_t KC = 1024;  // inputs per chunk of K (rounded to blocks)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")

#define UNROLL _Pragma("GCC unroll 16")

// acc + the 4-byte dot products of u (unsigned) and x (signed), in place: with the intrinsic GCC
// copies every accumulator out and back around each instruction (twice the instructions).
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(x));
  return acc;
}

// Each token's x (float32 or bf16, [M, K]) -> xq [M, Kp] int8 (zero past K), xs [M, KB], and
// gsum [M, G]: the sum of the quantized values xq * xs of each group (g a multiple of BK, or K).
template <bool BF16IN>
void quantize_x(const void* x, int64_t M, int64_t K, int64_t BK, int64_t g, int64_t G, int8_t* xq, float* xs,
                float* gsum) {
  const int64_t KB = (K + BK - 1) / BK, Kp = KB * BK;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(gsum + m * G, gsum + (m + 1) * G, 0.f);
      for (int64_t b = 0; b < KB; ++b) {
        __m512 v[4];  // up to 64 values, zero past K
        __m512 amax = _mm512_setzero_ps();
        for (int i = 0; i < BK / 16; ++i) {
          const int64_t k = b * BK + 16 * i, left = std::max<int64_t>(0, std::min<int64_t>(16, K - k));
          const __mmask16 mask = left == 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
          if (BF16IN) {
            const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + m * K + k);
            v[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
          } else {
            v[i] = _mm512_maskz_loadu_ps(mask, static_cast<const float*>(x) + m * K + k);
          }
          amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
        }
        const float a = _mm512_reduce_max_ps(amax);
        const float scale = a / 127.f, inv = a > 0.f ? 127.f / a : 0.f;
        __m512i qsum = _mm512_setzero_si512();
        for (int i = 0; i < BK / 16; ++i) {
          const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(inv)));  // half to even
          qsum = _mm512_add_epi32(qsum, q);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * Kp + b * BK + 16 * i), _mm512_cvtsepi32_epi8(q));
        }
        xs[m * KB + b] = scale;
        gsum[m * G + std::min(b * BK / g, G - 1)] += float(_mm512_reduce_add_epi32(qsum)) * scale;
      }
    }
  });
}

// 64 codes -> their bytes in a 256-entry table (lut: four vectors of 64). Its own target: vpermi2b
// needs AVX512-VBMI, which the rest of this file must not assume (Cascade Lake has VNNI without it).
__attribute__((target("avx512f,avx512bw,avx512vbmi"), noinline)) void lookup256(const __m512i* lut, const uint8_t* src,
                                                                              __mmask64 mask, __m512i* out) {
  const __m512i c = _mm512_maskz_loadu_epi8(mask, src);
  const __m512i lo = _mm512_permutex2var_epi8(lut[0], c, lut[1]);  // codes 0..127: bit 6 picks the vector
  const __m512i hi = _mm512_permutex2var_epi8(lut[2], c, lut[3]);  // codes 128..255
  *out = _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), lo, hi);
}

struct Weights {
  const uint8_t* codes;
  int64_t kind, N, K, G, g;
  __m128i table;  // FOUR: code -> byte
  const __m512i* lut;  // LUT8: code -> byte, 256 entries
  float off, smul;  // level = (byte - off) * smul
  const void* scales;
  int st;
  const void* zeros;  // nullptr when symmetric
  int zt;
};

// t[j] lane i <- r[i] dword j (a 16 x 16 transpose of 32-bit words).
inline void transpose16(__m512i r[16], __m512i t[16]) {
  __m512i a[16], b[16];
  UNROLL for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  UNROLL for (int i = 0; i < 4; ++i) {  // b[4i + d]: rows 4i..4i+3, in 128-bit lane L their dword d + 4L
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  UNROLL for (int d = 0; d < 4; ++d) {  // gather lane L of b[d], b[4 + d], b[8 + d], b[12 + d]
    const __m512i u01 = _mm512_shuffle_i32x4(b[d], b[4 + d], 0x44), v01 = _mm512_shuffle_i32x4(b[8 + d], b[12 + d], 0x44);
    const __m512i u23 = _mm512_shuffle_i32x4(b[d], b[4 + d], 0xEE), v23 = _mm512_shuffle_i32x4(b[8 + d], b[12 + d], 0xEE);
    t[d] = _mm512_shuffle_i32x4(u01, v01, 0x88);
    t[d + 4] = _mm512_shuffle_i32x4(u01, v01, 0xDD);
    t[d + 8] = _mm512_shuffle_i32x4(u23, v23, 0x88);
    t[d + 12] = _mm512_shuffle_i32x4(u23, v23, 0xDD);
  }
}

// Codes k0..k0+63 of one row as 64 bytes in element order, the sign bit flipped for int4/int8
// (codes past K are read as 0 and then flipped: their inputs are 0, so they add nothing).
inline __m512i row_block(const Weights& w, const uint8_t* row, int64_t k0, __m512i table, __m512i flip) {
  const bool four = w.kind == FOUR;
  const int64_t left = std::max<int64_t>(0, std::min<int64_t>(64, w.K - k0));
  if (four) {
    const int64_t bytes = (left + 1) / 2;
    const __mmask32 mask = bytes >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << bytes) - 1);
    const __m512i h = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, row + k0 / 2));  // word i = byte i
    const __m512i v = _mm512_or_si512(_mm512_and_si512(h, _mm512_set1_epi16(0x000F)),
                                      _mm512_and_si512(_mm512_slli_epi16(h, 4), _mm512_set1_epi16(0x0F00)));
    return _mm512_shuffle_epi8(table, v);  // each code's byte, 16-entry look-up per 128-bit lane
  }
  const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
  if (w.kind == LUT8) {  // codes past K read as code 0: their inputs are 0, so they add nothing
    __m512i u;
    lookup256(w.lut, row + k0, mask, &u);
    return u;
  }
  return _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, row + k0), flip);
}

// Rows n0.. n0+31 -> tile [Kp / 4][NR] words (row n's codes 4k4..4k4+3 as bytes at [k4][n - n0]),
// st [G][NR] the scales and sz [G][NR] the scales times (zero + offset); rows past N are 0.
void pack_tile(const Weights& w, int64_t n0, int64_t Kp, uint32_t* tile, float* st, float* sz) {
  const bool four = w.kind == FOUR;
  const __m512i flip = _mm512_set1_epi8(char(w.kind == INT8 ? 0x80 : 0));
  const __m512i table = _mm512_broadcast_i32x4(w.table);
  const int64_t rb = four ? w.K / 2 : w.K;
  for (int h = 0; h < NR / 16; ++h) {
    for (int64_t k0 = 0; k0 < Kp; k0 += 64) {
      __m512i r[16], t[16];
      UNROLL for (int i = 0; i < 16; ++i) {
        const int64_t n = n0 + 16 * h + i;
        r[i] = n < w.N ? row_block(w, w.codes + n * rb, k0, table, flip) : _mm512_setzero_si512();
      }
      transpose16(r, t);
      const int64_t words = std::min<int64_t>(16, (Kp - k0) / 4);  // Kp is a multiple of 32, not 64
      for (int j = 0; j < words; ++j) _mm512_storeu_si512(tile + (k0 / 4 + j) * NR + 16 * h, t[j]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + r;
    for (int64_t j = 0; j < w.G; ++j) {
      const float s = n < w.N ? load_scalar(w.scales, w.st, n * w.G + j) : 0.f;
      const float z = n < w.N && w.zeros ? load_scalar(w.zeros, w.zt, n * w.G + j) : 0.f;
      st[j * NR + r] = s * w.smul, sz[j * NR + r] = s * (w.off * w.smul + z);
    }
  }
}

// Tokens m0..m0+T-1 (T <= MR) against one tile, blocks [b0, b1) of the row: y[m, n0..n0+31] gets
// these blocks' terms (added to what it holds unless first), and each group that ends here its
// zero-point term.
template <int T>
void tile_kernel(const uint32_t* tile, const float* st, const float* sz, const int8_t* xq, const float* xs,
                 const float* gsum, int64_t Kp, int64_t KB, int64_t BK, int64_t G, int64_t bpg, int64_t b0,
                 int64_t b1, bool first, float* y, int64_t ldy, __mmask16 mk0, __mmask16 mk1) {
  __m512 tot[T][2];
  UNROLL for (int t = 0; t < T; ++t) {
    tot[t][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk0, y + t * ldy);
    tot[t][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk1, y + t * ldy + 16);
  }
  const int64_t words = BK / 4;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t j = std::min(b / bpg, G - 1);
    __m512i acc[T][2];
    UNROLL for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    const uint32_t* tb = tile + b * words * NR;
    const int8_t* xb = xq + b * BK;
    for (int64_t i = 0; i < words; ++i) {
      const __m512i w0 = _mm512_loadu_si512(tb + i * NR), w1 = _mm512_loadu_si512(tb + i * NR + 16);
      UNROLL for (int t = 0; t < T; ++t) {
        int32_t four;
        std::memcpy(&four, xb + t * Kp + 4 * i, 4);
        const __m512i xv = _mm512_set1_epi32(four);
        acc[t][0] = dpbusd(acc[t][0], w0, xv);
        acc[t][1] = dpbusd(acc[t][1], w1, xv);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(st + j * NR), s1 = _mm512_loadu_ps(st + j * NR + 16);
    UNROLL for (int t = 0; t < T; ++t) {
      const __m512 x = _mm512_set1_ps(xs[t * KB + b]);
      tot[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][0]), _mm512_mul_ps(s0, x), tot[t][0]);
      tot[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][1]), _mm512_mul_ps(s1, x), tot[t][1]);
    }
    if ((b + 1) % bpg == 0 || b + 1 == KB) {  // group j ends: its zero-point (and code offset) term
      const __m512 z0 = _mm512_loadu_ps(sz + j * NR), z1 = _mm512_loadu_ps(sz + j * NR + 16);
      UNROLL for (int t = 0; t < T; ++t) {
        const __m512 gs = _mm512_set1_ps(gsum[t * G + j]);
        tot[t][0] = _mm512_fnmadd_ps(z0, gs, tot[t][0]);
        tot[t][1] = _mm512_fnmadd_ps(z1, gs, tot[t][1]);
      }
    }
  }
  UNROLL for (int t = 0; t < T; ++t) {
    _mm512_mask_storeu_ps(y + t * ldy, mk0, tot[t][0]);
    _mm512_mask_storeu_ps(y + t * ldy + 16, mk1, tot[t][1]);
  }
}

#pragma GCC pop_options

at::Tensor gemm_i8_op(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& table, int64_t N,
                      int64_t group, int64_t kind, double offset, double scale_mul) {
  TORCH_CHECK(cpu_has_avx512_vnni(), "lowbit qgemm_i8: this CPU lacks AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "lowbit qgemm_i8: x must be contiguous float32 or bfloat16 [M, K]");
  TORCH_CHECK(kind == FOUR || kind == UINT8 || kind == INT8 || kind == LUT8, "lowbit qgemm_i8: unknown code kind ",
              kind);
  TORCH_CHECK(kind != LUT8 || cpu_has_avx512_vbmi(), "lowbit qgemm_i8: 8-bit codebooks need AVX512-VBMI");
  TORCH_CHECK(kind != LUT8 || (table.has_value() && table->scalar_type() == at::kByte && table->is_contiguous() &&
                               table->numel() == 256),
              "lowbit qgemm_i8: 8-bit codebooks need their byte table, 256 contiguous uint8");
  TORCH_CHECK(kind != FOUR || (table.has_value() && table->scalar_type() == at::kByte && table->is_contiguous() &&
                               table->numel() == 16),
              "lowbit qgemm_i8: 4-bit codes need their byte table, 16 contiguous uint8");
  const int64_t M = x.size(0), K = x.size(1);
  const bool four = kind == FOUR;
  const int64_t G = (K + group - 1) / group;
  TORCH_CHECK(!four || K % 2 == 0, "lowbit qgemm_i8: 4-bit rows need an even K");
  TORCH_CHECK(G == 1 || group % 32 == 0, "lowbit qgemm_i8: groups must be multiples of 32 or span the row");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() >= N * (four ? K / 2 : K),
              "lowbit qgemm_i8: codes must be contiguous uint8 holding [N, K]");
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == N * G, "lowbit qgemm_i8: scales must be contiguous [N, G]");
  Weights w{codes.data_ptr<uint8_t>(), kind, N, K, G, G == 1 ? K : group,
            four ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(table->data_ptr<uint8_t>())) : _mm_setzero_si128(),
            nullptr, float(offset), float(scale_mul), scales.data_ptr(), scale_type(scales), nullptr, F32};
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->is_contiguous() && zeros->numel() == N * G, "lowbit qgemm_i8: zeros must be contiguous [N, G]");
    w.zeros = zeros->data_ptr(), w.zt = scale_type(*zeros);
  }
  __m512i lut[4];
  if (kind == LUT8) {
    std::memcpy(lut, table->data_ptr<uint8_t>(), 256);
    w.lut = lut;
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  const int64_t BK = (G == 1 || w.g % 64 == 0) ? 64 : 32;
  const int64_t KB = (K + BK - 1) / BK, Kp = KB * BK, bpg = G == 1 ? KB : w.g / BK;
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> xs(M * KB), gsum(M * G);
  if (x.scalar_type() == at::kBFloat16) quantize_x<true>(x.data_ptr(), M, K, BK, w.g, G, xq.data(), xs.data(), gsum.data());
  else quantize_x<false>(x.data_ptr(), M, K, BK, w.g, G, xq.data(), xs.data(), gsum.data());
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + NR - 1) / NR, KC_BLOCKS = std::max<int64_t>(1, KC / BK);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> tile(Kp / 4 * NR);
    std::vector<float> st(G * NR), sz(G * NR);
    for (int64_t tt = t0; tt < t1; ++tt) {
      const int64_t n0 = tt * NR, left = std::min<int64_t>(NR, N - n0);
      pack_tile(w, n0, Kp, tile.data(), st.data(), sz.data());
      const __mmask16 mk0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __mmask16 mk1 = left >= 32 ? __mmask16(0xFFFF) : left <= 16 ? __mmask16(0) : __mmask16((1u << (left - 16)) - 1);
      // K in chunks of KC_BLOCKS blocks, so that a chunk of MR tokens' inputs stays in L1 and the
      // tile's chunk in L2 while every token passes over it
      for (int64_t c0 = 0; c0 < KB; c0 += KC_BLOCKS) {
        const int64_t c1 = std::min(KB, c0 + KC_BLOCKS);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
          const int8_t* xm = xq.data() + m0 * Kp;
          const float* sm = xs.data() + m0 * KB;
          const float* gm = gsum.data() + m0 * G;
          float* ym = yp + m0 * N + n0;
          switch (std::min<int64_t>(MR, M - m0)) {
#define TK(T) tile_kernel<T>(tile.data(), st.data(), sz.data(), xm, sm, gm, Kp, KB, BK, G, bpg, c0, c1, c0 == 0, ym, N, mk0, mk1)
            case 1: TK(1); break;
            case 2: TK(2); break;
            case 3: TK(3); break;
            case 4: TK(4); break;
            case 5: TK(5); break;
            default: TK(6); break;
#undef TK
          }
        }
      }
    }
  });
  return y;
}

bool available_lut8() { return cpu_has_avx512_vnni() && cpu_has_avx512_vbmi(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_qmatmul, m) {
  m.def("available_lut8() -> bool", &available_lut8);
  m.def("gemm_i8(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? table, int N, int group, int kind, "
        "float offset, float scale_mul) -> Tensor",
        &gemm_i8_op);
}
