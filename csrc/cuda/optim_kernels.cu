// Multi-tensor Adam/AdamW and SGD/SGDW kernels: one block per chunk of one
// tensor, the math from csrc/include/fasttricks/{adam,sgd}_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

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

constexpr int kThreads = 256;

template <typename T> struct Math { using type = float; };
template <> struct Math<double> { using type = double; };

template <typename O> __device__ __forceinline__ O to_math(float x) { return O(x); }
template <typename O> __device__ __forceinline__ O to_math(double x) { return O(x); }
template <typename O> __device__ __forceinline__ O to_math(__nv_bfloat16 x) { return O(__bfloat162float(x)); }
template <typename O> __device__ __forceinline__ O to_math(__half x) { return O(__half2float(x)); }

template <typename T, typename O> __device__ __forceinline__ T from_math(O x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(x));
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(x));
  else return T(x);
}

template <typename T>
__device__ __forceinline__ T* row(const Tables& tb, int row_index, int64_t t) {
  return reinterpret_cast<T*>(tb.ptrs[row_index * tb.n_tensors + t]);
}

template <typename O>
__device__ __forceinline__ void lerp_average(O& avg, O w, float coef) { average_update(avg, w, O(coef)); }

// Rows: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, avg, step.
template <typename P, typename S, bool AMSGRAD, bool DECOUPLED, bool AVERAGE>
__global__ void __launch_bounds__(kThreads) adam_kernel(Tables tb, AdamArgs a) {
  using O = typename Math<S>::type;
  constexpr bool MASTER = !std::is_same_v<P, S>;
  const int64_t t = tb.chunk_tensor[blockIdx.x];
  const int64_t start = tb.chunk_start[blockIdx.x];
  const int64_t end = min(tb.numels[t], start + kChunk);
  if (a.found_inf != nullptr && *a.found_inf != 0.f) return;  // NOTE [found_inf contract]

  P* param = row<P>(tb, 0, t);
  const P* grad = row<const P>(tb, 1, t);
  S* m_ptr = row<S>(tb, 2, t);
  S* v_ptr = row<S>(tb, 3, t);
  S* vmax_ptr = row<S>(tb, 4, t);
  S* master = row<S>(tb, 5, t);
  S* avg = row<S>(tb, 6, t);
  const double step = *row<const float>(tb, 7, t);
  const double lr = a.lr_ptr != nullptr ? double(*a.lr_ptr) : double(a.lr);
  double mul = a.grad_mul;
  if (a.grad_scale != nullptr) mul /= double(*a.grad_scale);
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
  c.grad_mul = O(mul);

  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    O w = MASTER ? to_math<O>(master[i]) : to_math<O>(param[i]);
    O m = to_math<O>(m_ptr[i]), v = to_math<O>(v_ptr[i]);
    O vmax = AMSGRAD ? to_math<O>(vmax_ptr[i]) : O(0);
    adam_update<AMSGRAD, DECOUPLED>(w, to_math<O>(grad[i]), m, v, vmax, c);
    m_ptr[i] = from_math<S>(m);
    v_ptr[i] = from_math<S>(v);
    if (AMSGRAD) vmax_ptr[i] = from_math<S>(vmax);
    if (MASTER) master[i] = from_math<S>(w);
    param[i] = from_math<P>(w);
    if (AVERAGE) {
      O av = to_math<O>(avg[i]);
      lerp_average(av, w, a.avg_coef);
      avg[i] = from_math<S>(av);
    }
  }
}

// Rows: param, grad, momentum_buffer, master, avg, first (flag).
template <typename P, typename S, bool MOMENTUM, bool NESTEROV, bool DECOUPLED, bool AVERAGE>
__global__ void __launch_bounds__(kThreads) sgd_kernel(Tables tb, SgdArgs a) {
  using O = typename Math<S>::type;
  constexpr bool MASTER = !std::is_same_v<P, S>;
  const int64_t t = tb.chunk_tensor[blockIdx.x];
  const int64_t start = tb.chunk_start[blockIdx.x];
  const int64_t end = min(tb.numels[t], start + kChunk);
  if (a.found_inf != nullptr && *a.found_inf != 0.f) return;

  P* param = row<P>(tb, 0, t);
  const P* grad = row<const P>(tb, 1, t);
  S* buf_ptr = row<S>(tb, 2, t);
  S* master = row<S>(tb, 3, t);
  S* avg = row<S>(tb, 4, t);
  const bool first = tb.ptrs[5 * tb.n_tensors + t] != 0;
  const double lr = a.lr_ptr != nullptr ? double(*a.lr_ptr) : double(a.lr);
  double mul = a.grad_mul;
  if (a.grad_scale != nullptr) mul /= double(*a.grad_scale);
  const SgdCoefs<O> c = make_sgd_coefs<O>(O(lr), O(a.weight_decay), DECOUPLED, O(a.momentum),
                                          O(a.dampening), O(mul));
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    O w = MASTER ? to_math<O>(master[i]) : to_math<O>(param[i]);
    O buf = (MOMENTUM && !first) ? to_math<O>(buf_ptr[i]) : O(0);
    sgd_update<MOMENTUM, NESTEROV, DECOUPLED>(w, to_math<O>(grad[i]), buf, first, c);
    if (MOMENTUM) buf_ptr[i] = from_math<S>(buf);
    if (MASTER) master[i] = from_math<S>(w);
    param[i] = from_math<P>(w);
    if (AVERAGE) {
      O av = to_math<O>(avg[i]);
      lerp_average(av, w, a.avg_coef);
      avg[i] = from_math<S>(av);
    }
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
