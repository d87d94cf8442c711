// CPU multi-tensor machinery shared by every fused CPU op: vector loads/stores
// per dtype, one parallel region over all tensors' chunks, compile-time switch
// dispatch, and the per-step gather that validates every tensor before any is
// written (a failed step changes nothing).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fasttricks {

using at::vec::Vectorized;

// Declared before the math headers so their unqualified calls resolve here.
template <typename O>
inline Vectorized<O> ft_sqrt(const Vectorized<O>& x) { return x.sqrt(); }
template <typename O>
inline Vectorized<O> ft_max(const Vectorized<O>& a, const Vectorized<O>& b) {
  return at::vec::maximum(a, b);
}

namespace cpu {

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

struct Chunk {
  int64_t tensor, begin, end;
};

// Elements per chunk: large enough to amortise the loop set-up, small enough
// that the two halves of a step balance across cores.
constexpr int64_t kChunkElems = int64_t(1) << 16;
// Below this many elements in all, a parallel region costs more than it saves.
constexpr int64_t kSerialElems = int64_t(1) << 15;

// One parallel region over every chunk of every tensor (not one per tensor).
template <typename F>
void run_chunks(const std::vector<int64_t>& numels, const F& fn) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunkElems) {
      chunks.push_back({t, b, std::min(numels[t], b + kChunkElems)});
    }
    total += numels[t];
  }
  if (total < kSerialElems || chunks.size() < 2) {
    for (const auto& c : chunks) fn(c);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) fn(chunks[i]);
  });
}

template <typename T> struct Tag { using type = T; };

// The (param dtype, state dtype) pairs the kernels are instantiated for.
// state dtype != param dtype means fp32 master weights for a bf16/fp16 param.
template <typename F>
void dispatch_dtypes(at::ScalarType p, at::ScalarType s, const char* op, const F& f) {
  using ST = at::ScalarType;
  if (p == ST::Float && s == ST::Float) return f(Tag<float>{}, Tag<float>{});
  if (p == ST::Double && s == ST::Double) return f(Tag<double>{}, Tag<double>{});
  if (p == ST::BFloat16 && s == ST::BFloat16) return f(Tag<c10::BFloat16>{}, Tag<c10::BFloat16>{});
  if (p == ST::Half && s == ST::Half) return f(Tag<c10::Half>{}, Tag<c10::Half>{});
  if (p == ST::BFloat16 && s == ST::Float) return f(Tag<c10::BFloat16>{}, Tag<float>{});
  if (p == ST::Half && s == ST::Float) return f(Tag<c10::Half>{}, Tag<float>{});
  TORCH_CHECK_TYPE(false, op, ": unsupported parameter dtype ", p, " with state dtype ", s,
                   " (supported: float32, float64, bfloat16, float16; fp32 master weights for the 16-bit types)");
}

// The compile-time value of a dispatch_bool flag (decay: lambdas may see it by reference).
template <typename B>
constexpr bool kOn = std::decay_t<B>::value;

template <typename F>
void dispatch_bool(bool b, const F& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& ref) {
  return a.sizes().equals(ref.sizes()) && a.strides().equals(ref.strides());
}

// The tensors of one parameter for one step, as the kernels see them: flat
// memory of `numel` elements in the same order for all of them.
struct Gathered {
  int64_t index;                 // position in the plan
  at::Tensor param, grad;        // param/grad as written/read by the kernel
  std::vector<at::Tensor> slots; // state tensors (undefined where unused)
  at::Tensor avg;                // running average (undefined when off)
};

// Validates one parameter's tensors and returns what the kernel should touch.
// Tensors whose layouts differ (e.g. a channels-last param with a contiguous
// grad) go through contiguous temporaries; `writeback` records what must be
// copied back after the kernel ran.
inline Gathered gather_one(const char* op, int64_t index, const at::Tensor& param,
                           const at::Tensor& grad, const std::vector<at::Tensor>& slots,
                           const at::Tensor& avg, at::ScalarType state_dtype,
                           std::vector<std::pair<at::Tensor, at::Tensor>>& writeback) {
  TORCH_CHECK(!grad.is_sparse(), op,
              " does not support sparse gradients; use torch.optim.SparseAdam or a dense gradient");
  TORCH_CHECK(param.device().is_cpu() && grad.device().is_cpu(), op,
              ": the cpu backend needs CPU tensors, got a parameter on ", param.device());
  TORCH_CHECK_TYPE(grad.scalar_type() == param.scalar_type(), op, ": gradient dtype ",
                   grad.scalar_type(), " differs from parameter dtype ", param.scalar_type());
  TORCH_CHECK(grad.sizes().equals(param.sizes()), op, ": gradient shape ", grad.sizes(),
              " differs from parameter shape ", param.sizes());
  bool dense = param.is_non_overlapping_and_dense() && same_dense_layout(grad, param);
  for (const auto& s : slots) {
    if (!s.defined()) continue;
    TORCH_CHECK_TYPE(s.scalar_type() == state_dtype, op, ": optimizer state dtype ",
                     s.scalar_type(), " differs from the expected ", state_dtype);
    TORCH_CHECK(s.sizes().equals(param.sizes()), op, ": optimizer state shape ", s.sizes(),
                " differs from parameter shape ", param.sizes());
    dense = dense && same_dense_layout(s, param);
  }
  if (avg.defined()) {
    TORCH_CHECK_TYPE(avg.scalar_type() == state_dtype, op, ": average dtype ",
                     avg.scalar_type(), " differs from the expected ", state_dtype);
    TORCH_CHECK(avg.sizes().equals(param.sizes()), op, ": average shape ", avg.sizes(),
                " differs from parameter shape ", param.sizes());
    dense = dense && same_dense_layout(avg, param);
  }
  if (dense) return Gathered{index, param, grad, slots, avg};

  auto writable = [&](const at::Tensor& t) {
    if (!t.defined()) return t;
    at::Tensor c = t.contiguous();
    if (!c.is_same(t)) writeback.emplace_back(t, c);
    return c;
  };
  Gathered g{index, writable(param), grad.contiguous(), {}, writable(avg)};
  for (const auto& s : slots) g.slots.push_back(writable(s));
  return g;
}

inline void apply_writeback(std::vector<std::pair<at::Tensor, at::Tensor>>& writeback) {
  for (auto& [dst, tmp] : writeback) dst.copy_(tmp);
}

// found_inf / grad_scale follow torch's fused optimizers (GradScaler sets them).
inline bool found_inf_set(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0;
}

inline double inv_grad_scale(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return 1.0;
  return 1.0 / grad_scale->item<double>();
}

// Optimizer step counts live in 0-dim float32 (or float64) CPU tensors.
inline double bump_step(at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) return ++*step.data_ptr<double>();
  TORCH_CHECK_TYPE(step.scalar_type() == at::kFloat, "optimizer step must be a float32 or float64 tensor");
  return ++*step.data_ptr<float>();
}

template <typename T>
inline T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

}  // namespace cpu
}  // namespace fasttricks
