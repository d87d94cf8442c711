// Fused mixup blend on the CPU (NOTE [mixup blend math]): one parallel region
// over (row or row pair, chunk) units. Flip pairing (row i with row B-1-i)
// loads both rows of a pair before writing either, so it can run in place;
// an arbitrary permutation reads x[perm[i]] and writes a separate output.
#include "multi_tensor.h"
#include "fasttricks/mixup_math.h"

#include <cmath>
#include <cstdint>

namespace fasttricks {
namespace cpu {
namespace {

constexpr int64_t kBlendChunk = 16384;

template <typename S>
void blend_vec(const S* a, const S* b, S* out_a, S* out_b, int64_t n, float lam_a, float lam_b, bool both) {
  using IO = VecIO<S>;
  using OVec = typename IO::OVec;
  using O = typename IO::O;
  const OVec la(static_cast<O>(lam_a)), lb(static_cast<O>(lam_b));
  for (int64_t i = 0; i < n; i += IO::kUnit) {
    const int64_t m = std::min(IO::kUnit, n - i);
    OVec a0, a1, b0, b1;
    IO::load(a + i, m, a0, a1);
    IO::load(b + i, m, b0, b1);
    IO::store(out_a + i, m, mixup_blend(a0, b0, la), mixup_blend(a1, b1, la));
    if (both) IO::store(out_b + i, m, mixup_blend(b0, a0, lb), mixup_blend(b1, a1, lb));
  }
}

inline uint8_t round_u8(float v) {
  v = std::floor(v + 0.5f);
  return static_cast<uint8_t>(v < 0.f ? 0.f : (v > 255.f ? 255.f : v));
}

void blend_u8(const uint8_t* a, const uint8_t* b, uint8_t* out_a, uint8_t* out_b, int64_t n, float lam_a,
              float lam_b, bool both) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = a[i], y = b[i];
    const uint8_t ra = round_u8(mixup_blend(x, y, lam_a));
    if (both) out_b[i] = round_u8(mixup_blend(y, x, lam_b));
    out_a[i] = ra;
  }
}

template <typename S>
void blend_rows(const S* x, S* out, int64_t rows, int64_t row_elems, const float* lam, const int64_t* perm) {
  const int64_t units_per_row = std::max<int64_t>(1, (row_elems + kBlendChunk - 1) / kBlendChunk);
  const int64_t row_units = perm ? rows : rows / 2;  // flip: one unit per pair; an odd middle row is its own pair
  const int64_t total = row_units * units_per_row;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, std::min(row_elems, kBlendChunk)));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / units_per_row;
      const int64_t lo = (u % units_per_row) * kBlendChunk;
      const int64_t n = std::min(kBlendChunk, row_elems - lo);
      if (n <= 0) continue;
      const int64_t i = r;
      const int64_t j = perm ? perm[r] : rows - 1 - r;
      const bool both = perm == nullptr;
      const S* a = x + i * row_elems + lo;
      const S* b = x + j * row_elems + lo;
      S* oa = out + i * row_elems + lo;
      S* ob = out + j * row_elems + lo;
      if constexpr (std::is_same_v<S, uint8_t>) {
        blend_u8(a, b, oa, ob, n, lam[i], lam[j], both);
      } else {
        blend_vec<S>(a, b, oa, ob, n, lam[i], lam[j], both);
      }
    }
  });
}

}  // namespace

// x, out: [B, D] row-major views (out may be x for flip pairing); lam: float32 [B];
// perm: int64 [B] or undefined for flip pairing. The middle row of an odd flip
// batch pairs with itself and is not written: the dispatcher
// (fasttricks/ops/mixup.py) copies it when out is not x.
void mixup_blend_rows(const at::Tensor& x, const at::Tensor& out, const at::Tensor& lam,
                      const std::optional<at::Tensor>& perm) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() && x.sizes() == out.sizes(),
              "mixup: rows must be contiguous [B, D] views of the same shape");
  TORCH_CHECK_TYPE(x.scalar_type() == out.scalar_type(), "mixup: input and output dtypes differ");
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "mixup: the cpu backend needs CPU tensors");
  TORCH_CHECK(lam.scalar_type() == at::kFloat && lam.is_contiguous() && lam.numel() == x.size(0),
              "mixup: lam must be float32 with one value per row");
  const int64_t* perm_ptr = nullptr;
  if (perm.has_value()) {
    TORCH_CHECK(perm->scalar_type() == at::kLong && perm->is_contiguous() && perm->numel() == x.size(0),
                "mixup: perm must be int64 with one index per row");
    TORCH_CHECK(out.data_ptr() != x.data_ptr(), "mixup: a permutation needs a separate output");
    perm_ptr = perm->data_ptr<int64_t>();
  }
  const int64_t rows = x.size(0), row_elems = x.size(1);
  if (rows == 0 || row_elems == 0) return;
  const float* lam_ptr = lam.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      blend_rows(x.data_ptr<float>(), out.data_ptr<float>(), rows, row_elems, lam_ptr, perm_ptr);
      break;
    case at::kDouble:
      blend_rows(x.data_ptr<double>(), out.data_ptr<double>(), rows, row_elems, lam_ptr, perm_ptr);
      break;
    case at::kBFloat16:
      blend_rows(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, row_elems, lam_ptr, perm_ptr);
      break;
    case at::kHalf:
      blend_rows(x.data_ptr<c10::Half>(), out.data_ptr<c10::Half>(), rows, row_elems, lam_ptr, perm_ptr);
      break;
    case at::kByte:
      blend_rows(x.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), rows, row_elems, lam_ptr, perm_ptr);
      break;
    default:
      TORCH_CHECK_TYPE(false, "mixup: unsupported dtype ", x.scalar_type(),
                       " (float32, float64, bfloat16, float16, uint8)");
  }
}

}  // namespace cpu
}  // namespace fasttricks
