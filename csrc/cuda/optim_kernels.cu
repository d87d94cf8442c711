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

// What both write back per element: the fp32 master, the param (the master
// rounded), and the running average (NOTE [weight averaging lerp]).
template <bool MASTER, bool AVERAGE, typename P, typename S, typename O>
__device__ __forceinline__ void store_weights(P* param, S* master, S* avg, int64_t i, O w, O avg_coef) {
  if (MASTER) master[i] = from_math<S>(w);
  param[i] = from_math<P>(w);
  if (AVERAGE) {
    O av = to_math<O>(avg[i]);
    average_update(av, w, avg_coef);
    avg[i] = from_math<S>(av);
  }
}

// Rows: NOTE [pointer table] (fasttricks/table.h), table::adam.
template <typename P, typename S, bool AMSGRAD, bool DECOUPLED, bool AVERAGE>
__global__ void __launch_bounds__(kThreads) adam_kernel(Tables tb, AdamArgs a) {
  using O = typename Math<S>::type;
  constexpr bool MASTER = !std::is_same_v<P, S>;
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
  S* avg = row<S>(tb, R::kAvg, t);
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
    m_ptr[i] = from_math<S>(m);
    v_ptr[i] = from_math<S>(v);
    if (AMSGRAD) vmax_ptr[i] = from_math<S>(vmax);
    store_weights<MASTER, AVERAGE>(param, master, avg, i, w, O(a.avg_coef));
  }
}

// Rows: NOTE [pointer table] (fasttricks/table.h), table::sgd.
template <typename P, typename S, bool MOMENTUM, bool NESTEROV, bool DECOUPLED, bool AVERAGE>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Tables tb, SgdArgs a) {
  using O = typename Math<S>::type;
  constexpr bool MASTER = !std::is_same_v<P, S>;
  ChunkStep ch;
  if (!chunk_prologue(tb, a, ch)) return;
  const int64_t t = ch.t;

  namespace R = table::sgd;
  P* param = row<P>(tb, R::kParam, t);
  const P* grad = row<const P>(tb, R::kGrad, t);
  S* buf_ptr = row<S>(tb, R::kMomentumBuffer, t);
  S* master = row<S>(tb, R::kMaster, t);
  S* avg = row<S>(tb, R::kAvg, t);
  const bool first = tb.ptrs[R::kFirst * tb.n_tensors + t] != 0;
  const SgdCoefs<O> c = make_sgd_coefs<O>(O(ch.lr), O(a.weight_decay), DECOUPLED, O(a.momentum),
                                          O(a.dampening), O(ch.grad_mul));
  for (int64_t i = ch.start + threadIdx.x; i < ch.end; i += kThreads) {
    O w = MASTER ? to_math<O>(master[i]) : to_math<O>(param[i]);
    O buf = (MOMENTUM && !first) ? to_math<O>(buf_ptr[i]) : O(0);
    sgd_update<MOMENTUM, NESTEROV, DECOUPLED>(w, to_math<O>(grad[i]), buf, first, c);
    if (MOMENTUM) buf_ptr[i] = from_math<S>(buf);
    store_weights<MASTER, AVERAGE>(param, master, avg, i, w, O(a.avg_coef));
  }
}

template <typename F>
bool dispatch_dtypes(DType p, DType s, const F& f) {
  if (p == DType::kFloat && s == DType::kFloat) return f(float{}, float{}), true;
  if (p == DType::kDouble && s == DType::kDouble) return f(double{}, double{}), true;
  if (p == DType::kBFloat16 && s == DType::kBFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{}), true;
  if (p == DType::kHalf && s == DType::kHalf) return f(__half{}, __half{}), true;
  if (p == DType::kBFloat16 && s == DType::kFloat) return f(__nv_bfloat16{}, float{}), true;
  if (p == DType::kHalf && s == DType::kFloat) return f(__half{}, float{}), true;
  return false;
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
  const bool ok = dispatch_dtypes(a.param, a.state, [&](auto p, auto s) {
    using P = decltype(p);
    using S = decltype(s);
    dispatch_bool(a.amsgrad, [&](auto ams) {
      dispatch_bool(a.decoupled, [&](auto dec) {
        dispatch_bool(a.average, [&](auto avg) {
          adam_kernel<P, S, kOn<decltype(ams)>, kOn<decltype(dec)>, kOn<decltype(avg)>>
              <<<static_cast<unsigned>(tb.n_chunks), kThreads, 0, stream>>>(tb, a);
        });
      });
    });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_sgd(const Tables& tb, const SgdArgs& a, cudaStream_t stream) {
  if (tb.n_chunks == 0) return cudaSuccess;
  const bool ok = dispatch_dtypes(a.param, a.state, [&](auto p, auto s) {
    using P = decltype(p);
    using S = decltype(s);
    dispatch_bool(a.momentum_on, [&](auto mom) {
      dispatch_bool(a.nesterov && a.momentum_on, [&](auto nes) {
        dispatch_bool(a.decoupled, [&](auto dec) {
          dispatch_bool(a.average, [&](auto avg) {
            if constexpr (kOn<decltype(mom)> || !kOn<decltype(nes)>) {
              sgd_kernel<P, S, kOn<decltype(mom)>, kOn<decltype(nes)>, kOn<decltype(dec)>, kOn<decltype(avg)>>
                  <<<static_cast<unsigned>(tb.n_chunks), kThreads, 0, stream>>>(tb, a);
            }
          });
        });
      });
    });
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fasttricks
