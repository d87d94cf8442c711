// Vector loads and stores per dtype: a unit of two opmath vectors moved
// between memory of type S and registers, with the stochastic-rounding draws
// of a unit.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>

#include "vec_round.h"

namespace fasttricks {

using at::vec::Vectorized;

namespace cpu {

using Draws = std::array<vround::IVec, 2>;

template <typename S> struct OpMath { using type = S; };
template <> struct OpMath<c10::BFloat16> { using type = float; };
template <> struct OpMath<c10::Half> { using type = float; };

// Moves kUnit = 2 * Vectorized<opmath>::size() elements of type S between
// memory and two opmath vectors; n < kUnit handles a tensor's tail.
template <typename S>
struct VecIO {
  using O = typename OpMath<S>::type;
  using OVec = Vectorized<O>;
  static constexpr int64_t kWidth = OVec::size();
  static constexpr int64_t kUnit = 2 * kWidth;

  static inline void load(const S* p, int64_t n, OVec& a, OVec& b) {
    if constexpr (std::is_same_v<S, O>) {
      if (n >= kUnit) {
        a = OVec::loadu(p);
        b = OVec::loadu(p + kWidth);
      } else {
        a = OVec::loadu(p, std::min(n, kWidth));
        b = n > kWidth ? OVec::loadu(p + kWidth, n - kWidth) : OVec(O(0));
      }
    } else {
      auto lp = n >= kUnit ? Vectorized<S>::loadu(p) : Vectorized<S>::loadu(p, n);
      std::tie(a, b) = at::vec::convert_to_float<S>(lp);
    }
  }

  // Asks for the unit kPrefetchBytes ahead of p to be brought into L2. The
  // hardware prefetchers alone keep too few lines in flight for the 3-7
  // streams of an optimizer step on one core. Measured on a 2-core Xeon
  // (AVX-512), ResNet-50 shapes out of cache: 3% (Adam) to 6% (SGD) faster;
  // 2-6 KiB ahead all gain, into L2 or L1 alike. Prefetches never fault, so
  // running past a tensor's end is harmless.
  static constexpr int64_t kPrefetchBytes = 4096;
  // A tail (n < kUnit) ends its tensor: nothing of it lies ahead, and for the
  // many one-element tensors of a small model the prefetches only cost TLB walks.
  static inline void prefetch(const S* p, int64_t n) {
    if (n < kUnit) return;
    const char* c = reinterpret_cast<const char*>(p) + kPrefetchBytes;
    for (int64_t b = 0; b < kUnit * int64_t(sizeof(S)); b += 64) __builtin_prefetch(c + b, 0, 2);
  }

  // NOTE [weight averaging lerp]: avg[0, n) <- avg + c (w - avg), w given as two vectors.
  static inline void lerp_average(S* avg, int64_t n, const OVec& w0, const OVec& w1, O coef) {
    OVec a0, a1;
    load(avg, n, a0, a1);
    average_update(a0, w0, coef);
    average_update(a1, w1, coef);
    store(avg, n, a0, a1);
  }

  // NOTE [stochastic rounding]: stores a unit of a 16-bit S rounded
  // stochastically with the random bits of `draws` (shift 0: their low half,
  // 16: their high half); a wider S is stored as store() does. bf16 is
  // packed from the rounded bits; fp16 rounded values are exact in fp16, so
  // the conversion of store() writes them as they are.
  C10_ALWAYS_INLINE static void store_rounded(S* p, int64_t n, const OVec& a, const OVec& b, const Draws& draws,
                                              int shift, bool positive_floor) {
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
      vround::store_high16(p, n, vround::round_bf16_high(a, vround::half(draws[0], shift), positive_floor),
                           vround::round_bf16_high(b, vround::half(draws[1], shift), positive_floor));
#else
      vround::store_low16(p, n, vround::round_bf16(a, vround::half(draws[0], shift), positive_floor),
                          vround::round_bf16(b, vround::half(draws[1], shift), positive_floor));
#endif
    } else if constexpr (std::is_same_v<S, c10::Half>) {
      store(p, n, vround::round_fp16(a, vround::half(draws[0], shift), positive_floor),
            vround::round_fp16(b, vround::half(draws[1], shift), positive_floor));
    } else {
      store(p, n, a, b);
    }
  }

  static inline void store(S* p, int64_t n, const OVec& a, const OVec& b) {
    if constexpr (std::is_same_v<S, O>) {
      if (n >= kUnit) {
        a.store(p);
        b.store(p + kWidth);
      } else {
        a.store(p, std::min(n, kWidth));
        if (n > kWidth) b.store(p + kWidth, n - kWidth);
      }
    } else {
      auto lp = at::vec::convert_from_float<S>(a, b);
      if (n >= kUnit) lp.store(p); else lp.store(p, n);
    }
  }
};

// word0 of the random bits of the 2 * Vectorized<float>::size() elements of
// a unit starting at element e of a tensor (NOTE [stochastic rounding]).
C10_ALWAYS_INLINE Draws draw_unit(uint32_t tensor_key, int64_t e) {
  constexpr int64_t kW = vround::IVec::size();
  return {vround::draw(tensor_key, e), vround::draw(tensor_key, e + kW)};
}

// The next word: each lane times rounding::kWordMul.
C10_ALWAYS_INLINE Draws next_word(const Draws& d) { return {vround::next_word(d[0]), vround::next_word(d[1])}; }

}  // namespace cpu
}  // namespace fasttricks
