// NOTE [stochastic rounding] on vector lanes: the rounding of
// fasttricks/rounding.h for the CPU kernels, on int32 lanes of the ISA a
// module is built for.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <array>
#include <cstdint>

#include "fasttricks/common.h"
#include "fasttricks/rounding.h"

namespace fasttricks {

using at::vec::Vectorized;

namespace cpu {

// NOTE [stochastic rounding], vectorised: the integer ops of
// fasttricks/rounding.h on int32 lanes (wrapping multiplies; a logical shift
// is an arithmetic one masked).
namespace vround {
using FVec = Vectorized<float>;
using IVec = Vectorized<int32_t>;

// Bit casts and logical shifts: single instructions where the ISA has them
// (at::vec's generic cast goes through memory; int32 >> is arithmetic).
C10_ALWAYS_INLINE IVec as_int(const FVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(x);
#else
  return at::vec::cast<int32_t>(x);
#endif
}

C10_ALWAYS_INLINE FVec as_float(const IVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(x);
#else
  return at::vec::cast<float>(x);
#endif
}

C10_ALWAYS_INLINE IVec srl(const IVec& x, int s) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_srli_epi32(x, static_cast<unsigned>(s));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_srli_epi32(x, s);
#else
  return (x >> IVec(s)) & IVec(static_cast<int32_t>(0xFFFFFFFFu >> s));
#endif
}

C10_ALWAYS_INLINE IVec mix32(IVec x) {
  x = x ^ srl(x, 16);
  x = x * IVec(static_cast<int32_t>(0x7FEB352Du));
  x = x ^ srl(x, 15);
  x = x * IVec(static_cast<int32_t>(0x846CA68Bu));
  return x ^ srl(x, 16);
}

// draw_bits of rounding.h for elements e, e + 1, ..., e + size - 1. A unit
// never spans a multiple of 2^31 (units start at multiples of their size),
// so the high part of the index is one scalar.
C10_ALWAYS_INLINE IVec draw(uint32_t tensor_key, int64_t e) {
  const uint32_t base = tensor_key ^ (static_cast<uint32_t>(static_cast<uint64_t>(e) >> 31) * 0x85EBCA6Bu);
  const uint32_t lo = static_cast<uint32_t>(e & 0x7FFFFFFF);
  return mix32(IVec(static_cast<int32_t>(base)) + IVec(static_cast<int32_t>(lo)) + IVec::arange(0, 1));
}

C10_ALWAYS_INLINE IVec next_word(const IVec& w) { return w * IVec(static_cast<int32_t>(rounding::kWordMul)); }

// Stores the low 16 bits of the lanes of a, then b, to p[0, n).
C10_ALWAYS_INLINE void store_low16(void* p, int64_t n, const IVec& a, const IVec& b) {
  constexpr int64_t kW = IVec::size();
#if defined(CPU_CAPABILITY_AVX2)
  if (n >= 2 * kW) {  // the lanes hold 0..65535, so the saturating pack keeps them
    const __m256i packed = _mm256_packus_epi32(a, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
    return;
  }
#endif
  alignas(64) int32_t lanes[2 * kW];
  a.store(lanes);
  b.store(lanes + kW);
  uint16_t* out = static_cast<uint16_t*>(p);
  for (int64_t k = 0; k < std::min(n, 2 * kW); ++k) out[k] = static_cast<uint16_t>(lanes[k]);
}

// round_bf16 of rounding.h: the bf16 bits in the low half of each lane.
// (AVX-512 has round_bf16_high and store_high16 below instead.)
C10_ALWAYS_INLINE IVec round_bf16(const FVec& x, const IVec& r, bool positive_floor) {
  IVec out = srl(as_int(x) + r, 16);
  out = IVec::blendv(out, IVec(0x7FC0), as_int(x != x));  // NaN: the canonical quiet NaN
  if (positive_floor) {
    out = IVec::blendv(out, IVec(1), as_int(x > FVec(0.0f)) & (out == IVec(0)));
  }
  return out;
}

#if defined(CPU_CAPABILITY_AVX512)
// round_bf16 before its shift, on mask registers: the rounded bf16 bits in the
// HIGH half of each lane (NaN: 0x7FC00000; the positive floor: 0x00010000).
C10_ALWAYS_INLINE __m512i round_bf16_high(const FVec& x, const IVec& r, bool positive_floor) {
  __m512i out = _mm512_add_epi32(_mm512_castps_si512(x), r);
  out = _mm512_mask_mov_epi32(out, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  if (positive_floor) {  // (out >> 16) == 0 for a positive x
    const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ) &
                           _mm512_cmplt_epu32_mask(out, _mm512_set1_epi32(0x10000));
    out = _mm512_mask_mov_epi32(out, zero, _mm512_set1_epi32(0x10000));
  }
  return out;
}

// Stores the high 16 bits of the lanes of a, then b, to p[0, n): one word
// permute and one (masked) store, where shifting and narrowing each vector
// took four instructions more per unit (the rounding is ALU-bound).
C10_ALWAYS_INLINE void store_high16(void* p, int64_t n, __m512i a, __m512i b) {
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                             31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i packed = _mm512_permutex2var_epi16(a, odd_words, b);
  if (n >= 32) {
    _mm512_storeu_si512(p, packed);
  } else {
    _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint64_t(1) << n) - 1), packed);
  }
}
#endif

C10_ALWAYS_INLINE IVec half(const IVec& bits, int shift) {
  return shift ? srl(bits, 16) : (bits & IVec(0xFFFF));
}

// round_fp16 of rounding.h, as the fp32 values (exact in fp16) that the
// store then converts.
C10_ALWAYS_INLINE FVec round_fp16(const FVec& x, const IVec& r, bool positive_floor) {
  IVec e = srl(as_int(x), 23) & IVec(0xFF);
  e = at::vec::minimum(at::vec::maximum(e - IVec(127), IVec(-14)), IVec(15)) - IVec(10);  // ulp exponent
  const FVec scale = as_float((IVec(127) - e) << IVec(23));
  const FVec unscale = as_float((IVec(127) + e) << IVec(23));
  const FVec q = x * scale;
  const FVec fl = q.floor();
  const FVec r_f = at::vec::convert_to_fp_of_same_size<float>(r);
  FVec out = (fl + FVec::blendv(FVec(0.0f), FVec(1.0f), r_f < (q - fl) * FVec(65536.0f))) * unscale;
  if (positive_floor) {
    out = FVec::blendv(out, FVec(5.9604644775390625e-08f), (x > FVec(0.0f)) & (out == FVec(0.0f)));
  }
  return out;
}
}  // namespace vround

}  // namespace cpu
}  // namespace fasttricks
