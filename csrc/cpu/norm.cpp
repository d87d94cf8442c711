// The total norm of a list of tensors for gradient clipping (NOTE [clip in
// the step] in fasttricks/optim/_clip.py): one parallel pass over all of them,
// norm type 2 or inf. 16-bit tensors are read into fp32 and fp32 into fp32
// vector sums flushed into double every kFlushUnits units, so the result is
// torch.linalg.vector_norm's (which accumulates fp32 in double on the CPU)
// within fp32 rounding; fp64 tensors accumulate in double. Each block of the
// flattened list keeps its own partial, summed in block order: the same bits
// every run, whatever the threads.
#include "multi_tensor.h"

#include <cmath>
#include <limits>

namespace fasttricks {
namespace cpu {
namespace {

constexpr int64_t kFlushUnits = 32;  // fp32 vector sums of 32 units (1024 fp32 elements with AVX-512) at a time

// max that keeps a NaN, as torch's inf-norm does.
inline double max_nan(double a, double b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<double>::quiet_NaN() : std::max(a, b);
}

// acc: the block's running sum of squares (two-norm) or largest |x| (inf-norm).
template <typename S, bool INF>
void accumulate(const S* p, const Chunk& ch, double& acc) {
  using IO = VecIO<S>;
  using O = typename IO::O;
  using OVec = typename IO::OVec;
  constexpr int64_t kUnit = IO::kUnit;
  for (int64_t i = ch.begin; i < ch.end;) {
    OVec s0(O(0)), s1(O(0));
    const int64_t stop = std::min(ch.end, i + kFlushUnits * kUnit);
    for (; i < stop; i += kUnit) {
      const int64_t n = std::min(kUnit, ch.end - i);
      IO::prefetch(p + i, n);  // one stream per thread: the hardware prefetchers alone keep too few lines in flight
      OVec a, b;
      IO::load(p + i, std::min(kUnit, stop - i), a, b);  // a partial unit loads zeros past its end
      if constexpr (INF) {
        s0 = at::vec::maximum(s0, a.abs());  // propagates NaN
        s1 = at::vec::maximum(s1, b.abs());
      } else {
        s0 = s0 + a * a;
        s1 = s1 + b * b;
      }
    }
    // The block's vectors to one value by a tree of vector ops (a few
    // shuffles: a lane-by-lane scalar loop here cost more than the loads).
    const OVec both = INF ? at::vec::maximum(s0, s1) : s0 + s1;
    const O part = INF ? at::vec::vec_reduce_all<O>([](OVec& x, OVec& y) { return at::vec::maximum(x, y); }, both)
                       : at::vec::vec_reduce_all<O>([](OVec& x, OVec& y) { return x + y; }, both);
    if constexpr (INF) acc = max_nan(acc, double(part));
    else acc += double(part);
  }
}

template <bool INF>
void accumulate_any(const at::Tensor& t, const Chunk& ch, double& acc) {
  switch (t.scalar_type()) {
    case at::kFloat: return accumulate<float, INF>(t.const_data_ptr<float>(), ch, acc);
    case at::kDouble: return accumulate<double, INF>(t.const_data_ptr<double>(), ch, acc);
    case at::kBFloat16: return accumulate<c10::BFloat16, INF>(t.const_data_ptr<c10::BFloat16>(), ch, acc);
    case at::kHalf: return accumulate<c10::Half, INF>(t.const_data_ptr<c10::Half>(), ch, acc);
    default: return;  // refused before the pass
  }
}

}  // namespace

at::Tensor total_norm(const std::vector<at::Tensor>& tensors, double norm_type) {
  const bool inf = std::isinf(norm_type) && norm_type > 0;
  TORCH_CHECK(inf || norm_type == 2.0, "total_norm: norm_type must be 2 or inf, got ", norm_type);
  std::vector<at::Tensor> dense;  // contiguous views (a copy only where a tensor is laid out otherwise)
  std::vector<int64_t> numels;
  bool any_double = false;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided, "total_norm: dense CPU tensors only, got ",
                t.device(), " ", t.layout());
    const auto dtype = t.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                     "total_norm: unsupported dtype ", dtype);
    any_double = any_double || dtype == at::kDouble;
    dense.push_back(t.contiguous());
    numels.push_back(t.numel());
  }
  const UnitMap map(numels);
  std::vector<double> partial(map.blocks(), 0.0);
  reduce_blocks(map, [&](int64_t block, const Chunk& ch) {
    if (inf) accumulate_any<true>(dense[ch.tensor], ch, partial[block]);
    else accumulate_any<false>(dense[ch.tensor], ch, partial[block]);
  });
  double total = 0.0;
  for (double x : partial) {
    total = inf ? max_nan(total, x) : total + x;
  }
  const double norm = inf ? total : std::sqrt(total);
  return at::scalar_tensor(norm, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat));
}

}  // namespace cpu
}  // namespace fasttricks
