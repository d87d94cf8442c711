// Multi-tensor Adam/AdamW and SGD/SGDW kernels: one block per chunk of one
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

// What both optimizer kernels start with: this block's tensor and element
// range, the lr (a tensor lr is read on the device) and the gradient multiplier
// with 1 / grad_scale folded in. False when found_inf is set: the block then
// writes nothing (NOTE [found_inf contract]).
struct ChunkStep {
  int64_t t, start, end;
  double lr, grad_mul;
};

template <typename Args>
__device__ __forceinline__ bool chunk_prologue(const Tables& tb, const Args& a, ChunkStep& c) {
  if (a.found_inf != nullptr && *a.found_inf != 0.f) return false;
  c.t = tb.chunk_tensor[blockIdx.x];
  c.start = tb.chunk_start[blockIdx.x];
  c.end = min(tb.numels[c.t], c.start + kChunk);
  c.lr = a.lr_ptr != nullptr ? double(*a.lr_ptr) : double(a.lr);
  c.grad_mul = a.grad_mul;
  if (a.grad_scale != nullptr) c.grad_mul /= double(*a.grad_scale);
  return true;
}

// The running average's element type: fp32 for 16-bit params with a master
// copy or stochastic rounding, else the param's (docs/precision.md).
template <typename P, bool MASTER, bool SR>
using AverageT = std::conditional_t<MASTER || SR, typename Math<P>::type, P>;

// What both write back per element: the fp32 master, the param (the master
// rounded, or w rounded stochastically with the random r0), and the running
// average (NOTE [weight averaging lerp]).
template <bool MASTER, bool SR, bool AVERAGE, typename P, typename S, typename A, typename O>
__device__ __forceinline__ void store_weights(P* param, S* master, A* avg, int64_t i, O w, O avg_coef, uint32_t r0) {
  if (MASTER) master[i] = from_math<S>(w);
  param[i] = from_math_rounded<P, SR && !MASTER>(w, r0, false);
  if (AVERAGE) {
    O av = to_math<O>(avg[i]);
    average_update(av, w, avg_coef);
    avg[i] = from_math<A>(av);
  }
}

// NOTE [stochastic rounding]: this tensor's key this step (0 when off).
template <bool SR>
__device__ __forceinline__ uint32_t tensor_key(const Tables& tb, int key_row, int64_t t, uint32_t round_key) {
  return SR ? rounding::tensor_key(round_key, tb.ptrs[key_row * tb.n_tensors + t]) : 0u;
}

// Rows: NOTE [pointer table] (fasttricks/table.h), table::adam.
template <typename P, typename S, bool MASTER, bool SR, bool AMSGRAD, bool DECOUPLED, bool AVERAGE>
__global__ void __launch_bounds__(kThreads) adam_kernel(Tables tb, AdamArgs a) {
  using O = typename Math<S>::type;
  using A = AverageT<P, MASTER, SR>;
  ChunkStep ch;
  if (!chunk_prologue(tb, a, ch)) return;
  const int64_t t = ch.t;
  const double lr = ch.lr;

  namespace R = table::adam;
  P* param = row<P>(tb, R::kParam, t);
  const P* grad = row<const P>(tb, R::kGrad, t);
  S* m_ptr = row<S>(tb, R::kExpAvg, t);
  S* v_ptr = row<S>(tb, R::kExpAvgSq, t);
  S* vmax_ptr = row<S>(tb, R::kMaxExpAvgSq, t);
  S* master = row<S>(tb, R::kMaster, t);
  A* avg = row<A>(tb, R::kAvg, t);
  const uint32_t key = tensor_key<SR>(tb, R::kKey, t, a.round_key);
  const double step = *row<const float>(tb, R::kStep, t);
  // Coefficients in double: 1 - beta2^t cancels badly in float.
  const double b1 = 1.0 - a.one_minus_beta1, b2 = 1.0 - a.one_minus_beta2;
  AdamCoefs<O> c;
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

  for (int64_t i = ch.start + threadIdx.x; i < ch.end; i += kThreads) {
    O w = MASTER ? to_math<O>(master[i]) : to_math<O>(param[i]);
    O m = to_math<O>(m_ptr[i]), v = to_math<O>(v_ptr[i]);
    O vmax = AMSGRAD ? to_math<O>(vmax_ptr[i]) : O(0);
    adam_update<AMSGRAD, DECOUPLED>(w, to_math<O>(grad[i]), m, v, vmax, c);
    // word0: param (low half), exp_avg (high); word1: exp_avg_sq; word2: max_exp_avg_sq.
    const uint32_t d0 = SR ? rounding::draw_bits(key, i) : 0u;
    const uint32_t d1 = d0 * rounding::kWordMul;
    m_ptr[i] = from_math_rounded<S, SR>(m, d0 >> 16, false);
    v_ptr[i] = from_math_rounded<S, SR>(v, d1 >> 16, true);
    if (AMSGRAD) vmax_ptr[i] = from_math_rounded<S, SR>(vmax, (d1 * rounding::kWordMul) >> 16, true);
    store_weights<MASTER, SR, AVERAGE>(param, master, avg, i, w, O(a.avg_coef), d0 & 0xFFFFu);
  }
}

// Rows: NOTE [pointer table] (fasttricks/table.h), table::sgd.
template <typename P, typename S, bool MASTER, bool SR, bool MOMENTUM, bool NESTEROV, bool DECOUPLED, bool AVERAGE>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Tables tb, SgdArgs a) {
  using O = typename Math<S>::type;
  using A = AverageT<P, MASTER, SR>;
  ChunkStep ch;
  if (!chunk_prologue(tb, a, ch)) return;
  const int64_t t = ch.t;

  namespace R = table::sgd;
  P* param = row<P>(tb, R::kParam, t);
  const P* grad = row<const P>(tb, R::kGrad, t);
  S* buf_ptr = row<S>(tb, R::kMomentumBuffer, t);
  S* master = row<S>(tb, R::kMaster, t);
  A* avg = row<A>(tb, R::kAvg, t);
  const uint32_t key = tensor_key<SR>(tb, R::kKey, t, a.round_key);
  const bool first = tb.ptrs[R::kFirst * tb.n_tensors + t] != 0;
  const SgdCoefs<O> c = make_sgd_coefs<O>(O(ch.lr), O(a.weight_decay), DECOUPLED, O(a.momentum),
                                          O(a.dampening), O(ch.grad_mul));
  for (int64_t i = ch.start + threadIdx.x; i < ch.end; i += kThreads) {
    O w = MASTER ? to_math<O>(master[i]) : to_math<O>(param[i]);
    O buf = (MOMENTUM && !first) ? to_math<O>(buf_ptr[i]) : O(0);
    sgd_update<MOMENTUM, NESTEROV, DECOUPLED>(w, to_math<O>(grad[i]), buf, first, c);
    const uint32_t d0 = SR ? rounding::draw_bits(key, i) : 0u;  // word0: param (low half), momentum buffer (high)
    if (MOMENTUM) buf_ptr[i] = from_math_rounded<S, SR>(buf, d0 >> 16, false);
    store_weights<MASTER, SR, AVERAGE>(param, master, avg, i, w, O(a.avg_coef), d0 & 0xFFFFu);
  }
}

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

}  // namespace

cudaError_t launch_adam(const Tables& tb, const AdamArgs& a, cudaStream_t stream) {
  if (tb.n_chunks == 0) return cudaSuccess;
  bool ok = false;
  dispatch_dtypes(a.param, a.state, [&](auto p, auto s) {
    using P = decltype(p);
    using S = decltype(s);
    ok = dispatch_precision<P, S>(a.master, a.stochastic_rounding, [&](auto master, auto sr) {
      dispatch_bool(a.amsgrad, [&](auto ams) {
        dispatch_bool(a.decoupled, [&](auto dec) {
          dispatch_bool(a.average, [&](auto avg) {
            adam_kernel<P, S, kOn<decltype(master)>, kOn<decltype(sr)>, kOn<decltype(ams)>, kOn<decltype(dec)>,
                        kOn<decltype(avg)>><<<static_cast<unsigned>(tb.n_chunks), kThreads, 0, stream>>>(tb, a);
          });
        });
      });
    });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_sgd(const Tables& tb, const SgdArgs& a, cudaStream_t stream) {
  if (tb.n_chunks == 0) return cudaSuccess;
  bool ok = false;
  dispatch_dtypes(a.param, a.state, [&](auto p, auto s) {
    using P = decltype(p);
    using S = decltype(s);
    ok = dispatch_precision<P, S>(a.master, a.stochastic_rounding, [&](auto master, auto sr) {
      dispatch_bool(a.momentum_on, [&](auto mom) {
        dispatch_bool(a.nesterov && a.momentum_on, [&](auto nes) {
          dispatch_bool(a.decoupled, [&](auto dec) {
            dispatch_bool(a.average, [&](auto avg) {
              if constexpr (kOn<decltype(mom)> || !kOn<decltype(nes)>) {
                sgd_kernel<P, S, kOn<decltype(master)>, kOn<decltype(sr)>, kOn<decltype(mom)>, kOn<decltype(nes)>,
                           kOn<decltype(dec)>, kOn<decltype(avg)>>
                    <<<static_cast<unsigned>(tb.n_chunks), kThreads, 0, stream>>>(tb, a);
              }
            });
          });
        });
      });
    });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fasttricks
