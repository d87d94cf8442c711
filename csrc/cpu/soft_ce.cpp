// Cross-entropy against a factored mixup target (fasttricks/losses.py has the
// formula), on the CPU: one pass per row, no B x C buffer in the forward, and
// the backward writes the gradient straight into its output.
//
//   t_i = on * (lam_i e_{y_a,i} + (1 - lam_i) e_{y_b,i}) + off
//   CE_i = lse(z_i) - on * (lam_i z[i, y_a] + (1 - lam_i) z[i, y_b]) - off * sum_j z_ij
//   dCE_i/dz_i = softmax(z_i) - t_i
#include "multi_tensor.h"

#include <cmath>
#include <limits>

namespace fasttricks {
namespace cpu {
namespace {

void check_args(const at::Tensor& logits, const at::Tensor& y_a, const at::Tensor& y_b, const at::Tensor& lam) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "soft-target CE: logits must be a [B, C] CPU tensor");
  const int64_t B = logits.size(0);
  for (const at::Tensor* t : {&y_a, &y_b}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == B && t->device().is_cpu(),
                "soft-target CE: class indices must be int64 [B] CPU tensors");
  }
  TORCH_CHECK(lam.scalar_type() == at::kFloat && lam.dim() == 1 && lam.size(0) == B && lam.device().is_cpu(),
              "soft-target CE: lam must be a float32 [B] CPU tensor");
  const int64_t C = logits.size(1);
  auto check_range = [&](const at::Tensor& y) {
    const int64_t* p = y.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < C, "soft-target CE: class index ", p[i], " out of range for ", C,
                        " classes");
    }
  };
  check_range(y_a);
  check_range(y_b);
}

// Row statistics: max, sum of exp(z - max), sum of z.
template <typename S>
void row_stats(const S* z, int64_t C, float& mx, float& sum_exp, float& sum) {
  using V = Vectorized<float>;
  constexpr int64_t W = VecIO<S>::kUnit;
  int64_t c = 0;
  V vmax(-std::numeric_limits<float>::infinity());
  for (; c + W <= C; c += W) {
    V a, b;
    VecIO<S>::load(z + c, W, a, b);
    vmax = at::vec::maximum(vmax, at::vec::maximum(a, b));
  }
  mx = at::vec::vec_reduce_all<float>([](V& x, V& y) { return at::vec::maximum(x, y); }, vmax);
  for (int64_t k = c; k < C; ++k) mx = std::max(mx, static_cast<float>(z[k]));
  const float shift = std::isfinite(mx) ? mx : 0.0f;  // all -inf (or an inf): let the result say so
  V vexp(0.0f), vsum(0.0f), vshift(shift);
  for (c = 0; c + W <= C; c += W) {
    V a, b;
    VecIO<S>::load(z + c, W, a, b);
    vexp = vexp + (a - vshift).exp() + (b - vshift).exp();
    vsum = vsum + a + b;
  }
  sum_exp = at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, vexp);
  sum = at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, vsum);
  for (int64_t k = c; k < C; ++k) {
    sum_exp += std::exp(static_cast<float>(z[k]) - shift);
    sum += static_cast<float>(z[k]);
  }
  mx = shift;
}

template <typename F>
void for_rows(int64_t B, int64_t C, const F& f) {
  at::parallel_for(0, B, std::max<int64_t>(1, kSerialElems / std::max<int64_t>(C, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(i);
  });
}

template <typename F>
void dispatch_float_types(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(Tag<float>{});
    case at::kBFloat16: return f(Tag<c10::BFloat16>{});
    case at::kHalf: return f(Tag<c10::Half>{});
    default:
      TORCH_CHECK_TYPE(false, "soft-target CE: the cpu kernel takes float32, bfloat16 or float16 logits, got ", t);
  }
}

}  // namespace

// Returns (loss[B], lse[B]) in float32.
std::tuple<at::Tensor, at::Tensor> soft_ce_forward(const at::Tensor& logits_in, const at::Tensor& y_a,
                                                   const at::Tensor& y_b, const at::Tensor& lam, double on,
                                                   double off) {
  check_args(logits_in, y_a, y_b, lam);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor loss = at::empty({B}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B}, logits.options().dtype(at::kFloat));
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using S = typename decltype(tag)::type;
    const S* z = logits.const_data_ptr<S>();
    const int64_t *ya = y_a.const_data_ptr<int64_t>(), *yb = y_b.const_data_ptr<int64_t>();
    const float* l = lam.const_data_ptr<float>();
    float *out = loss.mutable_data_ptr<float>(), *lse_out = lse.mutable_data_ptr<float>();
    for_rows(B, C, [&](int64_t i) {
      const S* row = z + i * C;
      float mx, sum_exp, sum;
      row_stats(row, C, mx, sum_exp, sum);
      const float lse_i = mx + std::log(sum_exp);
      const float mixed = l[i] * static_cast<float>(row[ya[i]]) + (1.0f - l[i]) * static_cast<float>(row[yb[i]]);
      lse_out[i] = lse_i;
      out[i] = lse_i - static_cast<float>(on) * mixed - (off != 0.0 ? static_cast<float>(off) * sum : 0.0f);
    });
  });
  return {loss, lse};
}

// d loss / d logits for grad_loss[B]: (softmax(z) - t) * grad_loss, in the logits' dtype.
at::Tensor soft_ce_backward(const at::Tensor& logits_in, const at::Tensor& lse, const at::Tensor& y_a,
                            const at::Tensor& y_b, const at::Tensor& lam, const at::Tensor& grad_loss_in,
                            double on, double off) {
  check_args(logits_in, y_a, y_b, lam);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  const at::Tensor grad_loss = grad_loss_in.to(at::kFloat).contiguous().expand({B}).contiguous();
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == B, "soft-target CE: lse must be float32 [B]");
  at::Tensor grad = at::empty_like(logits);
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using S = typename decltype(tag)::type;
    using V = Vectorized<float>;
    constexpr int64_t W = VecIO<S>::kUnit;
    const S* z = logits.const_data_ptr<S>();
    S* gout = grad.mutable_data_ptr<S>();
    const int64_t *ya = y_a.const_data_ptr<int64_t>(), *yb = y_b.const_data_ptr<int64_t>();
    const float *l = lam.const_data_ptr<float>(), *lse_p = lse.const_data_ptr<float>();
    const float* gl = grad_loss.const_data_ptr<float>();
    const float offf = static_cast<float>(off), onf = static_cast<float>(on);
    for_rows(B, C, [&](int64_t i) {
      const S* row = z + i * C;
      S* grow = gout + i * C;
      const float g = gl[i];
      const V vl(lse_p[i]), voff(offf), vg(g);
      int64_t c = 0;
      for (; c + W <= C; c += W) {
        V a, b;
        VecIO<S>::load(row + c, W, a, b);
        VecIO<S>::store(grow + c, W, ((a - vl).exp() - voff) * vg, ((b - vl).exp() - voff) * vg);
      }
      for (; c < C; ++c) grow[c] = static_cast<S>((std::exp(static_cast<float>(row[c]) - lse_p[i]) - offf) * g);
      // The target's two peaks, added in float and rounded once.
      const int64_t a = ya[i], b = yb[i];
      if (a == b) {
        grow[a] = static_cast<S>((std::exp(static_cast<float>(row[a]) - lse_p[i]) - offf - onf) * g);
      } else {
        grow[a] = static_cast<S>((std::exp(static_cast<float>(row[a]) - lse_p[i]) - offf - onf * l[i]) * g);
        grow[b] = static_cast<S>((std::exp(static_cast<float>(row[b]) - lse_p[i]) - offf - onf * (1.0f - l[i])) * g);
      }
    });
  });
  return grad;
}

}  // namespace cpu
}  // namespace fasttricks
