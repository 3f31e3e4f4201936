// What the kernel sources share: CPU feature checks and scale storage (float32, float16, bfloat16).
#pragma once

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace lowbit_kernels {

enum ScaleType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

inline bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
}

inline bool cpu_has_avx512_vbmi() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vbmi");
}

inline bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}

inline int scale_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return F32;
    case at::kHalf: return F16;
    case at::kBFloat16: return BF16;
    default: TORCH_CHECK(false, "lowbit qmatmul: scales and zero points must be float32, float16 or bfloat16");
  }
  return F32;
}

__attribute__((target("f16c"))) inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

inline float bf16_to_f32(uint16_t h) {
  uint32_t b = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

__attribute__((target("f16c"))) inline float load_scalar(const void* p, int type, int64_t i) {
  if (type == F32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return type == F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

}  // namespace lowbit_kernels
