// Multi-tensor Adam/AdamW and SGD/SGDW kernel: one block per chunk of one
// tensor, the math from csrc/include/fasttricks/{adam,sgd}_math.h.
#include <cuda_runtime.h>

#include <type_traits>

#include "convert.cuh"
#include "launch.h"

namespace fasttricks {
__device__ __forceinline__ float ft_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double ft_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float ft_max(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ double ft_max(double a, double b) { return (a != a || a > b) ? a : b; }
}  // namespace fasttricks

#include "fasttricks/adam_math.h"
#include "fasttricks/sgd_math.h"

namespace fasttricks {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ T* row(const Tables& tb, int row_index, int64_t t) {
  return reinterpret_cast<T*>(tb.ptrs[row_index * tb.n_tensors + t]);
}

// The running average's element type: fp32 for 16-bit params with a master
// copy or stochastic rounding, else the param's (docs/precision.md).
template <typename P, bool MASTER, bool SR>
using AverageT = std::conditional_t<MASTER || SR, typename Math<P>::type, P>;

// NOTE [stochastic rounding]: this tensor's key this step (0 when off).
template <bool SR>
__device__ __forceinline__ uint32_t tensor_key(const Tables& tb, int key_row, int64_t t, uint32_t round_key) {
  return SR ? rounding::tensor_key(round_key, tb.ptrs[key_row * tb.n_tensors + t]) : 0u;
}

// The rows both families read of tensor t, which table.h names alike in
// table::adam and table::sgd: the param, its grad, the fp32 master copy, the
// running average and the tensor's rounding key.
template <typename P, typename S, typename A>
struct WeightRows {
  P* param;
  const P* grad;
  S* master;
  A* avg;
  uint32_t key;
};

template <typename R, bool SR, typename P, typename S, typename A>
__device__ __forceinline__ WeightRows<P, S, A> weight_rows(const Tables& tb, int64_t t, uint32_t round_key) {
  return {row<P>(tb, R::kParam, t), row<const P>(tb, R::kGrad, t), row<S>(tb, R::kMaster, t),
          row<A>(tb, R::kAvg, t), tensor_key<SR>(tb, R::kKey, t, round_key)};
}

// The weight an update starts from: the fp32 master copy when there is one.
template <bool MASTER, typename O, typename P, typename S, typename A>
__device__ __forceinline__ O load_weight(const WeightRows<P, S, A>& r, int64_t i) {
  return MASTER ? to_math<O>(r.master[i]) : to_math<O>(r.param[i]);
}

// What both write back per element: the fp32 master, the param (the master
// rounded, or w rounded stochastically with the random r0), and the running
// average (NOTE [weight averaging lerp]).
template <bool MASTER, bool SR, bool AVERAGE, typename P, typename S, typename A, typename O>
__device__ __forceinline__ void store_weights(const WeightRows<P, S, A>& r, int64_t i, O w, O avg_coef, uint32_t r0) {
  if (MASTER) r.master[i] = from_math<S>(w);
  r.param[i] = from_math_rounded<P, SR && !MASTER>(w, r0, false);
  if (AVERAGE) {
    O av = to_math<O>(r.avg[i]);
    average_update(av, w, avg_coef);
    r.avg[i] = from_math<A>(av);
  }
}

// What both optimizer kernels start with: this block's tensor and element
// range, the lr (a tensor lr is read on the device), the gradient multiplier
// with 1 / grad_scale folded in, and the tensor's weight rows (family R's
// table). False when found_inf is set: the block then writes nothing (NOTE
// [found_inf contract]).
template <typename P, typename S, typename A>
struct ChunkStep {
  int64_t t, start, end;
  double lr, grad_mul;
  WeightRows<P, S, A> rows;
};

template <typename R, bool SR, typename Args, typename P, typename S, typename A>
__device__ __forceinline__ bool chunk_prologue(const Tables& tb, const Args& a, ChunkStep<P, S, A>& c) {
  if (a.found_inf != nullptr && *a.found_inf != 0.f) return false;
  c.t = tb.chunk_tensor[blockIdx.x];
  c.start = tb.chunk_start[blockIdx.x];
  c.end = min(tb.numels[c.t], c.start + kChunk);
  c.lr = a.lr_ptr != nullptr ? double(*a.lr_ptr) : double(a.lr);
  c.grad_mul = a.grad_mul;
  if (a.grad_scale != nullptr) c.grad_mul /= double(*a.grad_scale);
  c.rows = weight_rows<R, SR, P, S, A>(tb, c.t, a.round_key);
  return true;
}

// One kernel for both families: the chunk, the weight's read and write-back
// and the random bits are here; `Update` is the family's per-element math and
// state (AdamUpdate, SgdUpdate), set up once per block.
template <typename Update, typename P, typename S, bool MASTER, bool SR, bool AVERAGE, typename Args>
__global__ void __launch_bounds__(kThreads) optim_kernel(Tables tb, Args a) {
  using O = typename Math<S>::type;
  ChunkStep<P, S, AverageT<P, MASTER, SR>> ch;
  if (!chunk_prologue<typename Update::Rows, SR>(tb, a, ch)) return;
  const Update update(tb, a, ch);
  const auto& r = ch.rows;
  for (int64_t i = ch.start + threadIdx.x; i < ch.end; i += kThreads) {
    O w = load_weight<MASTER, O>(r, i);
    const uint32_t d0 = SR ? rounding::draw_bits(r.key, i) : 0u;  // word0: the param's in its low half
    update(i, w, to_math<O>(r.grad[i]), d0);
    store_weights<MASTER, SR, AVERAGE>(r, i, w, O(a.avg_coef), d0 & 0xFFFFu);
  }
}

// Rows: NOTE [pointer table] (fasttricks/table.h), table::adam.
template <typename S, bool SR, bool AMSGRAD, bool DECOUPLED>
struct AdamUpdate {
  using Rows = table::adam;
  using O = typename Math<S>::type;
  S *exp_avg, *exp_avg_sq, *max_exp_avg_sq;
  AdamCoefs<O> c;

  template <typename Chunk>
  __device__ __forceinline__ AdamUpdate(const Tables& tb, const AdamArgs& a, const Chunk& ch)
      : exp_avg(row<S>(tb, Rows::kExpAvg, ch.t)), exp_avg_sq(row<S>(tb, Rows::kExpAvgSq, ch.t)),
        max_exp_avg_sq(row<S>(tb, Rows::kMaxExpAvgSq, ch.t)) {
    const double lr = ch.lr, step = *row<const float>(tb, Rows::kStep, ch.t);
    // Coefficients in double: 1 - beta2^t cancels badly in float.
    const double b1 = 1.0 - a.one_minus_beta1, b2 = 1.0 - a.one_minus_beta2;
    c.beta1 = O(b1);
    c.one_minus_beta1 = O(a.one_minus_beta1);
    c.beta2 = O(b2);
    c.one_minus_beta2 = O(a.one_minus_beta2);
    c.eps = O(a.eps);
    c.weight_decay = DECOUPLED ? O(0) : O(a.weight_decay);
    c.decay_factor = DECOUPLED ? O(1.0 - lr * a.weight_decay) : O(1);
    c.step_size = O(lr / (1.0 - pow(b1, step)));
    c.inv_bias_correction2_sqrt = O(1.0 / sqrt(1.0 - pow(b2, step)));
    c.grad_mul = O(ch.grad_mul);
  }

  // word0: param (low half), exp_avg (high); word1: exp_avg_sq; word2: max_exp_avg_sq.
  __device__ __forceinline__ void operator()(int64_t i, O& w, O g, uint32_t d0) const {
    O m = to_math<O>(exp_avg[i]), v = to_math<O>(exp_avg_sq[i]);
    O vmax = AMSGRAD ? to_math<O>(max_exp_avg_sq[i]) : O(0);
    adam_update<AMSGRAD, DECOUPLED>(w, g, m, v, vmax, c);
    const uint32_t d1 = d0 * rounding::kWordMul;
    exp_avg[i] = from_math_rounded<S, SR>(m, d0 >> 16, false);
    exp_avg_sq[i] = from_math_rounded<S, SR>(v, d1 >> 16, true);
    if (AMSGRAD) max_exp_avg_sq[i] = from_math_rounded<S, SR>(vmax, (d1 * rounding::kWordMul) >> 16, true);
  }
};

// Rows: NOTE [pointer table] (fasttricks/table.h), table::sgd.
template <typename S, bool SR, bool MOMENTUM, bool NESTEROV, bool DECOUPLED>
struct SgdUpdate {
  using Rows = table::sgd;
  using O = typename Math<S>::type;
  S* momentum_buffer;
  bool first;
  SgdCoefs<O> c;

  template <typename Chunk>
  __device__ __forceinline__ SgdUpdate(const Tables& tb, const SgdArgs& a, const Chunk& ch)
      : momentum_buffer(row<S>(tb, Rows::kMomentumBuffer, ch.t)),
        first(tb.ptrs[Rows::kFirst * tb.n_tensors + ch.t] != 0),
        c(make_sgd_coefs<O>(O(ch.lr), O(a.weight_decay), DECOUPLED, O(a.momentum), O(a.dampening),
                            O(ch.grad_mul))) {}

  // word0: param (low half), momentum buffer (high).
  __device__ __forceinline__ void operator()(int64_t i, O& w, O g, uint32_t d0) const {
    O buf = (MOMENTUM && !first) ? to_math<O>(momentum_buffer[i]) : O(0);
    sgd_update<MOMENTUM, NESTEROV, DECOUPLED>(w, g, buf, first, c);
    if (MOMENTUM) momentum_buffer[i] = from_math_rounded<S, SR>(buf, d0 >> 16, false);
  }
};

// The (param, state) dtype pairs, as csrc/cpu/dispatch.h's dispatch_dtypes.
template <typename F>
bool dispatch_dtypes(DType p, DType s, const F& f) {
  using BF = __nv_bfloat16;
  if (p == DType::kFloat && s == DType::kFloat) return f(float{}, float{}), true;
  if (p == DType::kDouble && s == DType::kDouble) return f(double{}, double{}), true;
  if (p == DType::kBFloat16 && s == DType::kBFloat16) return f(BF{}, BF{}), true;
  if (p == DType::kHalf && s == DType::kHalf) return f(__half{}, __half{}), true;
  if (p == DType::kBFloat16 && s == DType::kFloat) return f(BF{}, float{}), true;
  if (p == DType::kHalf && s == DType::kFloat) return f(__half{}, float{}), true;
  if (p == DType::kFloat && s == DType::kBFloat16) return f(float{}, BF{}), true;
  if (p == DType::kHalf && s == DType::kBFloat16) return f(__half{}, BF{}), true;
  return false;
}

// f(master, stochastic rounding) as compile-time flags where they mean
// something (as the CPU's dispatch_precision); false for a bad combination.
template <typename P, typename S, typename F>
bool dispatch_precision(bool master, bool sr, const F& f) {
  constexpr bool kLowP = !std::is_same_v<P, float> && !std::is_same_v<P, double>;
  constexpr bool kLowS = !std::is_same_v<S, float> && !std::is_same_v<S, double>;
  constexpr bool kCanMaster = kLowP && std::is_same_v<S, float>;
  if (master && (sr || !kCanMaster)) return false;
  if constexpr (kCanMaster) {
    if (master) return f(std::true_type{}, std::false_type{}), true;
  }
  if constexpr (kLowP || kLowS) {
    if (sr) return f(std::false_type{}, std::true_type{}), true;
  }
  return f(std::false_type{}, std::false_type{}), true;
}

template <typename F>
void dispatch_bool(bool b, const F& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

template <typename B>
constexpr bool kOn = std::decay_t<B>::value;

// What both launches share: f(P, S, master, sr) for the args' (param, state)
// dtypes and precision flags, then the launch error (cudaErrorInvalidValue for
// a combination no kernel is built for); nothing is launched for no chunk.
template <typename Args, typename F>
cudaError_t dispatch_launch(const Tables& tb, const Args& a, const F& f) {
  if (tb.n_chunks == 0) return cudaSuccess;
  bool ok = false;
  dispatch_dtypes(a.param, a.state, [&](auto p, auto s) {
    ok = dispatch_precision<decltype(p), decltype(s)>(a.master, a.stochastic_rounding,
                                                      [&](auto master, auto sr) { f(p, s, master, sr); });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_adam(const Tables& tb, const AdamArgs& a, cudaStream_t stream) {
  const auto grid = static_cast<unsigned>(tb.n_chunks);
  return dispatch_launch(tb, a, [&](auto p, auto s, auto master, auto sr) {
    dispatch_bool(a.amsgrad, [&](auto ams) {
      dispatch_bool(a.decoupled, [&](auto dec) {
        dispatch_bool(a.average, [&](auto avg) {
          using S = decltype(s);
          using Update = AdamUpdate<S, kOn<decltype(sr)>, kOn<decltype(ams)>, kOn<decltype(dec)>>;
          optim_kernel<Update, decltype(p), S, kOn<decltype(master)>, kOn<decltype(sr)>, kOn<decltype(avg)>>
              <<<grid, kThreads, 0, stream>>>(tb, a);
        });
      });
    });
  });
}

cudaError_t launch_sgd(const Tables& tb, const SgdArgs& a, cudaStream_t stream) {
  const auto grid = static_cast<unsigned>(tb.n_chunks);
  return dispatch_launch(tb, a, [&](auto p, auto s, auto master, auto sr) {
    dispatch_bool(a.momentum_on, [&](auto mom) {
      dispatch_bool(a.nesterov && a.momentum_on, [&](auto nes) {
        dispatch_bool(a.decoupled, [&](auto dec) {
          dispatch_bool(a.average, [&](auto avg) {
            if constexpr (kOn<decltype(mom)> || !kOn<decltype(nes)>) {
              using S = decltype(s);
              using Update = SgdUpdate<S, kOn<decltype(sr)>, kOn<decltype(mom)>, kOn<decltype(nes)>, kOn<decltype(dec)>>;
              optim_kernel<Update, decltype(p), S, kOn<decltype(master)>, kOn<decltype(sr)>, kOn<decltype(avg)>>
                  <<<grid, kThreads, 0, stream>>>(tb, a);
            }
          });
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace fasttricks
