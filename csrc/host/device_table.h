// See device_table.cpp.
#pragma once
#include "tensor_table.h"

#include <c10/core/Stream.h>

#include <array>
#include <string>
#include <tuple>

namespace fasttricks {
namespace cpu {

class DeviceTable {
 public:
  using Tables = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t>;
  struct Packed {
    int64_t n;  // params gathered (0: no grads, nothing else is set)
    Tables tables;  // (ptrs[R, n], numels[n], chunk_tensor[C], chunk_start[C], n, C)
    std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (destination, temporary)
    std::vector<at::Tensor> keep;  // temporaries the kernel reads: hold them until it is launched
  };

  // Table rows (NOTE [pointer table]): param, grad, `rows` in order (an empty
  // row packs null pointers), then `n_flag_rows` rows of per-param integers.
  // rows[0, n_state_rows) are param-shaped state of row_dtypes[k] (the tensor
  // table's slots); rows[step_row] (step_row == n_state_rows, or -1 for none)
  // holds the one-element float32 step counters bumped by gather().
  DeviceTable(std::string op, std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> rows,
              int64_t n_state_rows, int64_t step_row, int64_t n_flag_rows, std::vector<at::ScalarType> row_dtypes,
              int64_t chunk);

  void set_row(int64_t row, std::vector<at::Tensor> tensors);
  void set_flags(int64_t row, std::vector<int64_t> values);
  const std::vector<int64_t>& flags(int64_t row) const { return flags_.at(row); }

  // Validates every param with a grad before anything is written, packs the
  // table (copied to the device only when it changed) and bumps the steps.
  Packed gather();
  // NOTE [found_inf contract]: a skipped step takes its count back, on the device.
  void unbump_steps(const at::Tensor& found_inf);
  bool any_gathered_flag(int64_t row) const;
  void clear_gathered_flags(int64_t row);

 private:
  void set_steps(std::vector<at::Tensor> steps);
  void upload(std::vector<int64_t> head, const std::vector<int64_t>& numels, int64_t n_rows);

  TensorTable table_;
  std::vector<at::Tensor> steps_;             // the step row (empty: none)
  int64_t chunk_;
  std::vector<std::vector<int64_t>> flags_;
  std::vector<int64_t> last_;                 // params gathered by the last step
  std::vector<at::Tensor> bumped_;            // their step counters
  std::vector<int64_t> key_;                  // the pointer rows and numels behind tables_
  std::array<at::Tensor, 4> tables_;          // views of one buffer on the device
  int64_t n_chunks_ = 0;
  c10::Stream table_stream_{c10::Stream::DEFAULT, c10::Device(c10::kCPU)};  // where tables_ is known to be used
};

}  // namespace cpu
}  // namespace fasttricks
