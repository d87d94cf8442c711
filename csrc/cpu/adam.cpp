// Fused Adam/AdamW step on the CPU: one pass over param, grad, moments,
// optional fp32 master and optional running average, in one parallel region.
#include "multi_tensor.h"
#include "weight_io.h"
#include "host/plans.h"
#include "fasttricks/adam_math.h"

#include <algorithm>
#include <cmath>

namespace fasttricks {
namespace cpu {
namespace {

template <typename P, typename S, typename A, typename O>
struct AdamPtrs {
  P* param;
  const P* grad;
  S *master, *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
  A* avg;
  const AdamCoefs<O>* coefs;
  uint32_t key;  // NOTE [stochastic rounding]: the tensor's key this step

  void prefetch() const { prefetch_first_lines(param, grad, master, exp_avg, exp_avg_sq, max_exp_avg_sq, avg); }
};

template <typename P, typename S, bool MASTER, bool SR, bool AMSGRAD, bool DECOUPLED, bool AVERAGE>
void adam_kernel(const std::vector<AdamPtrs<P, S, AverageT<P, MASTER, SR>, typename OpMath<S>::type>>& ptrs,
                 const std::vector<int64_t>& numels, typename OpMath<S>::type avg_coef) {
  using WIO = WeightIO<P, S, MASTER, SR, AVERAGE>;
  using SIO = VecIO<S>;
  using OVec = typename WIO::OVec;
  using O = typename WIO::O;
  constexpr int64_t kUnit = SIO::kUnit;
  // Stochastic rounding where a 16-bit state is written from fp32 math.
  constexpr bool ROUND_S = SR && !std::is_same_v<S, O>;

  // U units per call (for_units): all loads before any store, so more lines
  // are in flight (a store may alias a later load, which the compiler must respect).
  auto units = [&](const auto& t, const AdamCoefs<O>& c, int64_t i, int64_t n, auto u_tag) {
    constexpr int U = decltype(u_tag)::value;
    OVec w[2 * U], g[2 * U], m[2 * U], v[2 * U], x[2 * U];
    for (int u = 0; u < U; ++u) {
      const int64_t j = i + u * kUnit;
      WIO::prefetch(t, j, n);
      SIO::prefetch(t.exp_avg + j, n);
      SIO::prefetch(t.exp_avg_sq + j, n);
      if constexpr (AMSGRAD) SIO::prefetch(t.max_exp_avg_sq + j, n);
    }
    for (int u = 0; u < U; ++u) {
      const int64_t j = i + u * kUnit;
      WIO::load(t, j, n, w + 2 * u, g + 2 * u);
      SIO::load(t.exp_avg + j, n, m[2 * u], m[2 * u + 1]);
      SIO::load(t.exp_avg_sq + j, n, v[2 * u], v[2 * u + 1]);
      if constexpr (AMSGRAD) SIO::load(t.max_exp_avg_sq + j, n, x[2 * u], x[2 * u + 1]);
    }
    // A tail of one vector or less (the one-element tensors of a small model):
    // its second vector holds no element, and it would cost a square root and
    // a division. (Stores and the averaging write n elements only.)
    const int live = U == 1 && n <= SIO::kWidth ? 1 : 2 * U;
    for (int k = 0; k < live; ++k) adam_update<AMSGRAD, DECOUPLED>(w[k], g[k], m[k], v[k], x[k], c);
    for (int u = 0; u < U; ++u) {
      const int64_t j = i + u * kUnit;
      // word0: param (low half), exp_avg (high); word1: exp_avg_sq; word2: max_exp_avg_sq.
      const Draws d0 = ROUND_S || WIO::kRoundParam ? draw_unit(t.key, j) : Draws{};
      if constexpr (ROUND_S) {
        const Draws d1 = next_word(d0);
        SIO::store_rounded(t.exp_avg + j, n, m[2 * u], m[2 * u + 1], d0, 16, false);
        SIO::store_rounded(t.exp_avg_sq + j, n, v[2 * u], v[2 * u + 1], d1, 16, true);
        if constexpr (AMSGRAD) {
          SIO::store_rounded(t.max_exp_avg_sq + j, n, x[2 * u], x[2 * u + 1], next_word(d1), 16, true);
        }
      } else {
        SIO::store(t.exp_avg + j, n, m[2 * u], m[2 * u + 1]);
        SIO::store(t.exp_avg_sq + j, n, v[2 * u], v[2 * u + 1]);
        if constexpr (AMSGRAD) SIO::store(t.max_exp_avg_sq + j, n, x[2 * u], x[2 * u + 1]);
      }
      WIO::store(t, j, n, w + 2 * u, d0, avg_coef);
    }
  };

  run_chunks(numels, [&](const Chunk& ch) {
    const auto& t = ptrs[ch.tensor];
    const auto& c = *t.coefs;
    prefetch_tensor_ahead<kUnit>(ptrs, numels, ch);
    auto body = [&](int64_t i, int64_t n, auto u_tag) { units(t, c, i, n, u_tag); };
    // Two units per call, except when rounding the 16-bit state without
    // AVX-512: there the random bits and both units' values outgrow the
    // vector registers. (With AVX-512 it used to be one unit too, until the
    // bf16 rounding packed with one permute, store_high16; now two gain: AMD
    // EPYC, 100M params, bf16 state 38.3 -> 34.5 ms, fp16 77 -> 70 ms.)
#if defined(CPU_CAPABILITY_AVX512)
    constexpr int kUnitsPerCall = 2;
#else
    constexpr int kUnitsPerCall = ROUND_S ? 1 : 2;
#endif
    for_units<kUnit, decltype(body), kUnitsPerCall>(ch, body);
  });
}

template <typename O>
AdamCoefs<O> cast_coefs(const AdamCoefs<double>& d) {
  return AdamCoefs<O>{O(d.beta1), O(d.one_minus_beta1), O(d.beta2), O(d.one_minus_beta2),
                      O(d.eps), O(d.weight_decay), O(d.decay_factor), O(d.step_size),
                      O(d.inv_bias_correction2_sqrt), O(d.grad_mul)};
}

enum AdamSlot { kExpAvg = 0, kExpAvgSq = 1, kMaxExpAvgSq = 2, kMaster = 3 };  // then the averages

}  // namespace

AdamPlan::AdamPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> steps,
                   std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                   std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> masters,
                   bool amsgrad, bool decoupled, std::vector<int64_t> rounding, bool stochastic_rounding)
    : PlanBase("Adam", std::move(params), {std::move(exp_avgs), std::move(exp_avg_sqs),
                                           std::move(max_exp_avg_sqs), std::move(masters)},
               std::move(rounding), stochastic_rounding),
      steps_(std::move(steps)), amsgrad_(amsgrad), decoupled_(decoupled) {
  TORCH_CHECK(steps_.size() == table_.size(), "Adam plan: one step tensor per parameter");
  for (const auto& s : steps_) counters_.emplace_back(s);
  std::vector<const void*> addresses;
  for (const auto& c : counters_) addresses.push_back(c.address());
  std::sort(addresses.begin(), addresses.end());
  distinct_counters_ = std::adjacent_find(addresses.begin(), addresses.end()) == addresses.end();
  TORCH_CHECK(!amsgrad_ || has_slot(kMaxExpAvgSq),
              "Adam plan: amsgrad needs max_exp_avg_sq for every parameter");
}

int64_t AdamPlan::step(const AdamHyper& h, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, double avg_coef) {
  if (counters_.size() <= kPrefetchDataTensors) {  // a few lines: in flight during the gather (NOTE [tiny tensors])
    for (const auto& c : counters_) prefetch_first_lines(c.address());
  }
  Scratch scratch;
  const auto gathered = gather(scratch);  // validates everything before anything is written
  if (found_inf_set(found_inf)) return -1;
  const double mul = h.grad_mul * inv_grad_scale(grad_scale) * (h.maximize ? -1.0 : 1.0);
  const bool average = has_averages() && avg_coef != 0.0;

  const int64_t n = static_cast<int64_t>(gathered.size());
  std::vector<double> steps(n);
  std::vector<int64_t> numels(n);
  auto bump = [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      if (k + static_cast<int64_t>(kTensorsAhead) < hi) {  // the step counters are tiny tensors too
        prefetch_first_lines(counters_[gathered[k + kTensorsAhead].index].address());
      }
      steps[k] = counters_[gathered[k].index].bump();
      numels[k] = gathered[k].numel;
    }
  };
  if (distinct_counters_) {
    for_tensor_ranges(n, bump);
  } else {
    bump(0, n);  // a step tensor shared by params is bumped once per param, in order, as torch does
  }
  // Params usually share a step count: one set of coefficients per distinct
  // count, and each param points at its set.
  std::vector<AdamCoefs<double>> coefs;
  std::vector<int32_t> coef_of(n);
  for (int64_t k = 0; k < n; ++k) {
    if (coefs.empty() || steps[k] != steps[k - 1]) {
      coefs.push_back(make_adam_coefs<double>(
          h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, decoupled_, steps[k], mul,
          [](double a, double b) { return std::pow(a, b); }, [](double a) { return std::sqrt(a); }));
    }
    coef_of[k] = static_cast<int32_t>(coefs.size() - 1);
  }

  dispatch_dtypes(param_dtype(), state_dtype(), "Adam", [&](auto ptag, auto stag) {
    using P = typename decltype(ptag)::type;
    using S = typename decltype(stag)::type;
    using O = typename OpMath<S>::type;
    std::vector<AdamCoefs<O>> ocoefs;
    for (const auto& c : coefs) ocoefs.push_back(cast_coefs<O>(c));
    dispatch_precision<P, S>(has_master(), stochastic_rounding_, [&](auto master_tag, auto sr_tag) {
      constexpr bool MASTER = kOn<decltype(master_tag)>, SR = kOn<decltype(sr_tag)>;
      using A = AverageT<P, MASTER, SR>;
      std::vector<AdamPtrs<P, S, A, O>> ptrs(n);
      for_tensor_ranges(n, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          const auto& g = gathered[k];
          ptrs[k] = {static_cast<P*>(g.param), static_cast<const P*>(g.grad),
                     static_cast<S*>(g.slots[kMaster]), static_cast<S*>(g.slots[kExpAvg]),
                     static_cast<S*>(g.slots[kExpAvgSq]), static_cast<S*>(g.slots[kMaxExpAvgSq]),
                     average ? static_cast<A*>(g.slots[average_slot()]) : nullptr, &ocoefs[coef_of[k]],
                     tensor_key(h.round_key, g.index)};
        }
      });
      dispatch_bool(amsgrad_, [&](auto ams) {
        dispatch_bool(decoupled_, [&](auto dec) {
          dispatch_bool(average, [&](auto avg) {
            adam_kernel<P, S, MASTER, SR, kOn<decltype(ams)>, kOn<decltype(dec)>, kOn<decltype(avg)>>(
                ptrs, numels, O(avg_coef));
          });
        });
      });
    });
  });
  scratch.apply();
  return n;
}

}  // namespace cpu
}  // namespace fasttricks
