// NOTE [pointer table]
// The device kernels (Triton and CUDA) of one optimizer family read one int64
// buffer per step: ptrs[row * n_tensors + t] holds the data pointer of tensor
// t in row `row` (0 where the row is unused) or, for a flag row, a plain
// integer; then numels[t]; then one program / block per chunk of kChunk
// elements (chunk_tensor[c], chunk_start[c]). The row numbers are defined
// here for C++ and CUDA and in fasttricks/_table.py for Python and Triton;
// tests/test_plan_cache.py holds the two (and the CPU module's copy) equal.
// The buffer is packed in C++ (csrc/host/device_table.cpp); the pointer rows
// are compared each step (O(params)) and the chunk lists, O(elements / kChunk),
// are rebuilt and uploaded (from pinned memory, without blocking) only when
// they changed.
// No torch headers: the .cu files include this.
#pragma once
#include <cstdint>

namespace fasttricks {
namespace table {

constexpr int64_t kChunk = 4096;  // elements per Triton program / CUDA block

// Structs, not namespaces: a kernel takes its family's rows as a template argument.
struct adam {
  static constexpr int kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4, kMaster = 5, kAvg = 6,
                       kStep = 7, kKey = 8, kRows = 9;
};

struct sgd {
  static constexpr int kParam = 0, kGrad = 1, kMomentumBuffer = 2, kMaster = 3, kAvg = 4, kFirst = 5, kKey = 6,
                       kRows = 7;
};

}  // namespace table
}  // namespace fasttricks
