// NOTE [stochastic rounding] (docs/precision.md) in C++ and CUDA: the copy of
// fasttricks/ops/rounding.py (the reference; the
// Triton copy is in kernels/_common.py; docs/precision.md says when to use
// it). A value computed in fp32 is written to a bf16/fp16 tensor rounded
// away from zero with probability equal to the fraction of an ulp it lies
// above the value below it, using 16 random bits from a counter-based hash
// of (seed, step, param index, element index, draw). Every backend computes
// the same bits and the same rounding, integer op for integer op.
// No torch headers: the .cu files include this.
#pragma once
#include <cstdint>
#include <cstring>

#include "fasttricks/common.h"  // FT_HD: one definition, always inlined

namespace fasttricks {
namespace rounding {

// lowbias32: a bijective 32-bit integer hash.
FT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The key of one tensor in one step: step_key from the host, the param's
// index among the optimizer's params.
FT_HD uint32_t tensor_key(uint32_t step_key, int64_t param_index) {
  return mix32(step_key ^ mix32(static_cast<uint32_t>(param_index)));
}

// word0: 32 random bits for element e of a tensor. The param takes its low
// 16 bits, exp_avg / the momentum buffer its high 16; exp_avg_sq the high
// 16 of word1 = word0 * kWordMul, max_exp_avg_sq those of word2 = word1 * kWordMul.
constexpr uint32_t kWordMul = 0x9E3779B1u;

FT_HD uint32_t draw_bits(uint32_t tensor_key, int64_t e) {
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(e) >> 31) * 0x85EBCA6Bu;
  return mix32((tensor_key ^ hi) + static_cast<uint32_t>(e & 0x7FFFFFFF));
}

FT_HD uint32_t float_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, sizeof(b));
  return b;
}

FT_HD float bits_float(uint32_t b) {
  float x;
  memcpy(&x, &b, sizeof(x));
  return x;
}

// x rounded stochastically to bf16 with the random r (< 2^16): the bf16 bits.
// positive_floor: a positive x never becomes 0 (exp_avg_sq), but the
// smallest positive bf16.
FT_HD uint16_t round_bf16(float x, uint32_t r, bool positive_floor) {
  const uint32_t b = float_bits(x);
  if (x != x) return 0x7FC0;  // NaN: the canonical quiet NaN
  uint16_t out = static_cast<uint16_t>((b + r) >> 16);
  if (positive_floor && x > 0.0f && out == 0) out = 1;
  return out;
}

// x rounded stochastically to fp16 with the random r (< 2^16), as the float
// that converts to fp16 exactly (or overflows to inf): x is scaled by a power
// of two so that one fp16 ulp at x is 1, and the fraction rounds up when it
// exceeds r / 2^16.
FT_HD float round_fp16(float x, uint32_t r, bool positive_floor) {
  int e = static_cast<int>((float_bits(x) >> 23) & 0xFFu) - 127;
  e = e < -14 ? -14 : (e > 15 ? 15 : e);
  const int ulp_exp = e - 10;
  const float scale = bits_float(static_cast<uint32_t>(127 - ulp_exp) << 23);
  const float unscale = bits_float(static_cast<uint32_t>(127 + ulp_exp) << 23);
  const float q = x * scale;
#if defined(__CUDA_ARCH__)
  const float fl = floorf(q);
#else
  const float fl = __builtin_floorf(q);
#endif
  const float frac = q - fl;
  const float up = static_cast<float>(r) < frac * 65536.0f ? 1.0f : 0.0f;
  float out = (fl + up) * unscale;
  if (positive_floor && x > 0.0f && out == 0.0f) out = 5.9604644775390625e-08f;  // 2^-24
  return out;
}

}  // namespace rounding
}  // namespace fasttricks
