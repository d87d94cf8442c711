// Fused mixup blend in plain CUDA (NOTE [mixup blend math]); no torch headers.
// One block per (row or flip pair, chunk of the row).
#include "convert.cuh"
#include "fasttricks/mixup_math.h"
#include "launch.h"

namespace fasttricks {
namespace cuda {
namespace {

constexpr int64_t kMixChunk = 8192;

template <typename T>
__global__ void mixup_kernel(const T* x, T* out, const float* lam, const int64_t* perm, int64_t rows,
                             int64_t row_elems) {
  using O = typename Math<T>::type;
  const int64_t i = blockIdx.x;
  const int64_t j = perm ? perm[i] : rows - 1 - i;
  const O lam_i = lam[i], lam_j = lam[j];
  // grid.y is capped at 65535: its blocks stride over the chunks of a long row.
  const int64_t n_chunks = (row_elems + kMixChunk - 1) / kMixChunk;
  for (int64_t chunk = blockIdx.y; chunk < n_chunks; chunk += gridDim.y) {
    const int64_t start = chunk * kMixChunk;
    const int64_t end = start + kMixChunk < row_elems ? start + kMixChunk : row_elems;
    for (int64_t k = start + threadIdx.x; k < end; k += blockDim.x) {
      const O a = to_math<O>(x[i * row_elems + k]);
      const O b = to_math<O>(x[j * row_elems + k]);
      out[i * row_elems + k] = from_math<T>(mixup_blend(a, b, lam_i));
      if (!perm) out[j * row_elems + k] = from_math<T>(mixup_blend(b, a, lam_j));
    }
  }
}

constexpr int64_t kMaxGridY = 65535;

template <typename T>
cudaError_t launch_typed(const void* x, void* out, const float* lam, const int64_t* perm, int64_t rows,
                         int64_t row_elems, cudaStream_t stream) {
  const int64_t blocks_x = perm ? rows : rows / 2;
  if (blocks_x > 0 && row_elems > 0) {
    const int64_t chunks = (row_elems + kMixChunk - 1) / kMixChunk;
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY));
    mixup_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(out), lam, perm,
                                                  rows, row_elems);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_mixup(const void* x, void* out, const float* lam, const int64_t* perm, int64_t rows,
                         int64_t row_elems, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_typed<float>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kDouble: return launch_typed<double>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kHalf: return launch_typed<__half>(x, out, lam, perm, rows, row_elems, stream);
    case DType::kByte: return launch_typed<uint8_t>(x, out, lam, perm, rows, row_elems, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fasttricks
