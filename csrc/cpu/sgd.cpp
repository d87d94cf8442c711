// Fused SGD/SGDW step on the CPU: one pass over param, grad, momentum buffer,
// optional fp32 master and optional running average, in one parallel region.
#include "multi_tensor.h"
#include "weight_io.h"
#include "host/plans.h"
#include "fasttricks/sgd_math.h"

namespace fasttricks {
namespace cpu {
namespace {

template <typename P, typename S, typename A>
struct SgdPtrs {
  P* param;
  const P* grad;
  S *master, *buf;
  A* avg;
  bool first_step;
  uint32_t key;  // NOTE [stochastic rounding]: the tensor's key this step

  void prefetch() const { prefetch_first_lines(param, grad, master, buf, avg); }
};

template <typename P, typename S, bool MASTER, bool SR, bool MOMENTUM, bool NESTEROV, bool DECOUPLED, bool AVERAGE>
void sgd_kernel(const std::vector<SgdPtrs<P, S, AverageT<P, MASTER, SR>>>& ptrs, const std::vector<int64_t>& numels,
                const SgdCoefs<typename OpMath<S>::type>& c, typename OpMath<S>::type avg_coef) {
  using WIO = WeightIO<P, S, MASTER, SR, AVERAGE>;
  using SIO = VecIO<S>;
  using OVec = typename WIO::OVec;
  constexpr int64_t kUnit = SIO::kUnit;
  constexpr bool ROUND_S = SR && MOMENTUM && !std::is_same_v<S, typename WIO::O>;

  // U units per call (for_units), all loads before any store (see adam.cpp).
  auto units = [&](const SgdPtrs<P, S, AverageT<P, MASTER, SR>>& t, int64_t i, int64_t n, auto u_tag) {
    constexpr int U = decltype(u_tag)::value;
    OVec w[2 * U], g[2 * U], b[2 * U];
    for (int u = 0; u < U; ++u) {
      const int64_t j = i + u * kUnit;
      WIO::prefetch(t, j, n);
      if constexpr (MOMENTUM) SIO::prefetch(t.buf + j, n);
    }
    for (int u = 0; u < U; ++u) {
      const int64_t j = i + u * kUnit;
      WIO::load(t, j, n, w + 2 * u, g + 2 * u);
      if constexpr (MOMENTUM) {
        if (!t.first_step) SIO::load(t.buf + j, n, b[2 * u], b[2 * u + 1]);
      }
    }
    for (int k = 0; k < 2 * U; ++k) sgd_update<MOMENTUM, NESTEROV, DECOUPLED>(w[k], g[k], b[k], t.first_step, c);
    for (int u = 0; u < U; ++u) {
      const int64_t j = i + u * kUnit;
      // word0: param (low half), momentum buffer (high)
      const Draws d0 = ROUND_S || WIO::kRoundParam ? draw_unit(t.key, j) : Draws{};
      if constexpr (ROUND_S) SIO::store_rounded(t.buf + j, n, b[2 * u], b[2 * u + 1], d0, 16, false);
      else if constexpr (MOMENTUM) SIO::store(t.buf + j, n, b[2 * u], b[2 * u + 1]);
      WIO::store(t, j, n, w + 2 * u, d0, avg_coef);
    }
  };

  run_chunks(numels, [&](const Chunk& ch) {
    const auto& t = ptrs[ch.tensor];
    prefetch_tensor_ahead<kUnit>(ptrs, numels, ch);
    for_units<kUnit>(ch, [&](int64_t i, int64_t n, auto u_tag) { units(t, i, n, u_tag); });
  });
}

enum SgdSlot { kBuf = 0, kMaster = 1 };  // then the averages

}  // namespace

SgdPlan::SgdPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> momentum_buffers,
                 std::vector<at::Tensor> masters, std::vector<bool> first_step, bool nesterov,
                 bool decoupled, std::vector<int64_t> rounding, bool stochastic_rounding)
    : PlanBase("SGD", std::move(params), {std::move(momentum_buffers), std::move(masters)}, std::move(rounding),
               stochastic_rounding),
      first_step_(first_step.begin(), first_step.end()), momentum_(has_slot(kBuf)),
      nesterov_(nesterov), decoupled_(decoupled) {
  TORCH_CHECK(!momentum_ || first_step_.size() == table_.size(),
              "SGD plan: one first-step flag per parameter");
  TORCH_CHECK(momentum_ || !nesterov_, "SGD plan: nesterov needs momentum buffers");
}

int64_t SgdPlan::step(const SgdHyper& h, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, double avg_coef) {
  Scratch scratch;
  const auto gathered = gather(scratch);
  if (found_inf_set(found_inf)) return -1;
  TORCH_CHECK(momentum_ == (h.momentum != 0.0), "SGD plan: momentum switched on or off after the plan was built");
  const double mul = h.grad_mul * inv_grad_scale(grad_scale) * (h.maximize ? -1.0 : 1.0);
  const bool average = has_averages() && avg_coef != 0.0;
  const auto coefs = make_sgd_coefs<double>(h.lr, h.weight_decay, decoupled_, h.momentum, h.dampening, mul);

  const int64_t n = static_cast<int64_t>(gathered.size());
  std::vector<int64_t> numels(n);

  dispatch_dtypes(param_dtype(), state_dtype(), "SGD", [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using O = typename OpMath<S>::type;
    const SgdCoefs<O> oc{O(coefs.lr), O(coefs.weight_decay), O(coefs.decay_factor),
                         O(coefs.momentum), O(coefs.one_minus_dampening), O(coefs.grad_mul)};
    dispatch_precision<P, S>(has_master(), stochastic_rounding_, [&](auto master_tag, auto sr_tag) {
      constexpr bool MASTER = kOn<decltype(master_tag)>, SR = kOn<decltype(sr_tag)>;
      using A = AverageT<P, MASTER, SR>;
      std::vector<SgdPtrs<P, S, A>> ptrs(n);
      for_tensor_ranges(n, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          const auto& g = gathered[k];
          ptrs[k] = {static_cast<P*>(g.param), static_cast<const P*>(g.grad),
                     static_cast<S*>(g.slots[kMaster]), static_cast<S*>(g.slots[kBuf]),
                     average ? static_cast<A*>(g.slots[average_slot()]) : nullptr,
                     momentum_ && first_step_[g.index] != 0, tensor_key(h.round_key, g.index)};
          numels[k] = g.numel;
        }
      });
      dispatch_bool(momentum_, [&](auto mom) {
        dispatch_bool(nesterov_ && momentum_, [&](auto nes) {
          dispatch_bool(decoupled_, [&](auto dec) {
            dispatch_bool(average, [&](auto avg) {
              if constexpr (kOn<decltype(mom)> || !kOn<decltype(nes)>) {
                sgd_kernel<P, S, MASTER, SR, kOn<decltype(mom)>, kOn<decltype(nes)>, kOn<decltype(dec)>,
                           kOn<decltype(avg)>>(ptrs, numels, oc, O(avg_coef));
              }
            });
          });
        });
      });
    });
  });
  scratch.apply();
  if (momentum_) {
    for (const auto& g : gathered) first_step_[g.index] = 0;
  }
  return n;
}

std::vector<bool> SgdPlan::first_step_flags() const {
  return std::vector<bool>(first_step_.begin(), first_step_.end());
}

}  // namespace cpu
}  // namespace fasttricks
