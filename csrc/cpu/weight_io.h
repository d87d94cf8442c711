// The weight's side of an optimizer kernel's unit, shared by adam.cpp and
// sgd.cpp: the weight it reads (the fp32 master copy when there is one, else
// the param), the grad, and the tail that writes the weight back (the master
// copy, the param rounded to nearest or stochastically, the running average).
// `T` is a kernel's per-tensor record with param, grad, master and avg.
#pragma once
#include "dispatch.h"
#include "vec_io.h"

namespace fasttricks {
namespace cpu {

template <typename P, typename S, bool MASTER, bool SR, bool AVERAGE>
struct WeightIO {
  using PIO = VecIO<P>;
  using SIO = VecIO<S>;
  using AIO = VecIO<AverageT<P, MASTER, SR>>;
  using OVec = typename SIO::OVec;
  using O = typename OpMath<S>::type;
  static_assert(std::is_same_v<typename PIO::OVec, OVec>, "param and state must share a math type");
  static_assert(PIO::kUnit == SIO::kUnit, "param and state units differ");
  // The param is rounded stochastically where it is written from fp32 math
  // without a master copy (NOTE [stochastic rounding]).
  static constexpr bool kRoundParam = SR && !MASTER && !std::is_same_v<P, O>;

  template <typename T>
  C10_ALWAYS_INLINE static void prefetch(const T& t, int64_t j, int64_t n) {
    if constexpr (MASTER) SIO::prefetch(t.master + j, n);
    else PIO::prefetch(t.param + j, n);
    PIO::prefetch(t.grad + j, n);
    if constexpr (AVERAGE) AIO::prefetch(t.avg + j, n);
  }

  // The unit at element j: the weight into w[0], w[1] and the grad into g[0], g[1].
  template <typename T>
  C10_ALWAYS_INLINE static void load(const T& t, int64_t j, int64_t n, OVec* w, OVec* g) {
    if constexpr (MASTER) SIO::load(t.master + j, n, w[0], w[1]);
    else PIO::load(t.param + j, n, w[0], w[1]);
    PIO::load(t.grad + j, n, g[0], g[1]);
  }

  // Writes the new weight w[0], w[1] back; `draws` (word0 of the unit) rounds
  // the param with its low half when kRoundParam.
  template <typename T>
  C10_ALWAYS_INLINE static void store(const T& t, int64_t j, int64_t n, const OVec* w, const Draws& draws,
                                      O avg_coef) {
    if constexpr (MASTER) SIO::store(t.master + j, n, w[0], w[1]);
    if constexpr (kRoundParam) PIO::store_rounded(t.param + j, n, w[0], w[1], draws, 0, false);
    else PIO::store(t.param + j, n, w[0], w[1]);
    if constexpr (AVERAGE) AIO::lerp_average(t.avg + j, n, w[0], w[1], avg_coef);
  }
};

}  // namespace cpu
}  // namespace fasttricks
