// Host side of the Triton and CUDA multi-tensor steps (fasttricks/ops/_device.py
// has the format and a pure-Python equivalent): gathers and validates a step's
// params and grads through the tensor table (NOTE [tensor table]), packs their
// pointers into the pointer table (NOTE [pointer table]), and bumps the step counters. In C++ because
// the Python loop over 161 params cost about a millisecond a step, far over
// the GPU host-overhead target (docs/performance.md: <= 50 us). Only tensor metadata is read
// here; the table copy and the counter bump are torch ops on the device.
#include "device_table.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace fasttricks {
namespace cpu {

namespace {

std::vector<std::vector<at::Tensor>> state_rows(std::vector<std::vector<at::Tensor>>& rows, int64_t n_state_rows,
                                                const std::string& op) {
  TORCH_CHECK(n_state_rows >= 0 && n_state_rows <= static_cast<int64_t>(rows.size()), op,
              " plan: bad table layout");
  return {std::make_move_iterator(rows.begin()), std::make_move_iterator(rows.begin() + n_state_rows)};
}

}  // namespace

DeviceTable::DeviceTable(std::string op, std::vector<at::Tensor> params,
                         std::vector<std::vector<at::Tensor>> rows, int64_t n_state_rows,
                         int64_t step_row, int64_t n_flag_rows, std::vector<at::ScalarType> row_dtypes,
                         int64_t chunk)
    : table_(op, std::move(params), state_rows(rows, n_state_rows, op), std::move(row_dtypes)), chunk_(chunk) {
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  TORCH_CHECK(chunk_ > 0 && (step_row == -1 ? n_rows == n_state_rows
                                            : step_row == n_state_rows && n_rows == n_state_rows + 1),
              op, " plan: bad table layout");
  if (step_row >= 0) set_steps(std::move(rows[step_row]));
  flags_.assign(n_flag_rows, std::vector<int64_t>(table_.size(), 0));
}

void DeviceTable::set_steps(std::vector<at::Tensor> steps) {
  TORCH_CHECK(steps.size() == table_.size(), table_.op(), ": one step counter per parameter");
  for (const auto& s : steps) {  // the kernels read step counters as float32
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat && s.numel() == 1 && s.device() == table_.device(),
                     table_.op(), ": step counters must be one-element float32 tensors on ", table_.device(),
                     ", got ", s.scalar_type(), " on ", s.device());
  }
  steps_ = std::move(steps);
  key_.clear();
}

void DeviceTable::set_row(int64_t row, std::vector<at::Tensor> tensors) {
  TORCH_CHECK(row >= 0 && row <= static_cast<int64_t>(table_.n_slots()), table_.op(), " plan: no row ", row);
  if (row == static_cast<int64_t>(table_.n_slots())) {
    set_steps(std::move(tensors));
  } else {
    table_.set_slot(static_cast<size_t>(row), std::move(tensors));
    key_.clear();  // rebuild the device table on the next step
  }
}

void DeviceTable::set_flags(int64_t row, std::vector<int64_t> values) {
  TORCH_CHECK(row >= 0 && row < static_cast<int64_t>(flags_.size()) && values.size() == table_.size(),
              table_.op(), " plan: bad flag row");
  flags_[row] = std::move(values);
}

DeviceTable::Packed DeviceTable::gather() {
  Scratch scratch;
  const std::vector<Gathered> rows = table_.gather(scratch);  // validates everything first
  const int64_t n = static_cast<int64_t>(rows.size());
  if (n == 0) {
    last_.clear();
    return Packed{0, {}, {}, {}};
  }
  const size_t n_slots = table_.n_slots();
  const bool has_steps = !steps_.empty();
  const int64_t n_cols = 2 + static_cast<int64_t>(n_slots) + (has_steps ? 1 : 0);
  const int64_t n_rows = n_cols + static_cast<int64_t>(flags_.size());
  last_.resize(n);
  std::vector<int64_t> numels(n);
  // The pointer rows and numels: O(params). The chunk lists after them are
  // O(elements / chunk) (27 MB for a 7B model), so they are rebuilt only when
  // this part changed.
  std::vector<int64_t> head(static_cast<size_t>(n_rows * n + n));
  auto cell = [&](int64_t row, int64_t k) -> int64_t& { return head[row * n + k]; };
  for (int64_t k = 0; k < n; ++k) {
    const Gathered& g = rows[k];
    last_[k] = g.index;
    numels[k] = g.numel;
    cell(0, k) = reinterpret_cast<int64_t>(g.param);
    cell(1, k) = reinterpret_cast<int64_t>(g.grad);
    for (size_t s = 0; s < n_slots; ++s) cell(2 + s, k) = reinterpret_cast<int64_t>(g.slots[s]);
    if (has_steps) cell(n_cols - 1, k) = reinterpret_cast<int64_t>(steps_[g.index].data_ptr());
    for (size_t f = 0; f < flags_.size(); ++f) cell(n_cols + f, k) = flags_[f][g.index];
    head[n_rows * n + k] = g.numel;
  }
  if (head != key_) upload(std::move(head), numels, n_rows);
  const at::Device device = table_.device();
  if (!device.is_cpu()) {
    // The kernel reads the device table on the current stream: if that is not
    // the stream it was uploaded on, the caching allocator must know before
    // the table is freed (at the next rebuild).
    const c10::Stream stream = c10::impl::VirtualGuardImpl(device.type()).getStream(device);
    if (stream != table_stream_) {
      tables_[0].record_stream(stream);
      table_stream_ = stream;
    }
  }
  if (has_steps) {
    bumped_.clear();
    for (int64_t i : last_) bumped_.push_back(steps_[i]);
    at::_foreach_add_(bumped_, 1.0);
  }
  return Packed{n, std::make_tuple(tables_[0], tables_[1], tables_[2], tables_[3], n, n_chunks_),
                std::move(scratch.writeback), std::move(scratch.keep)};
}

void DeviceTable::upload(std::vector<int64_t> head, const std::vector<int64_t>& numels, int64_t n_rows) {
  const int64_t n = static_cast<int64_t>(numels.size());
  const at::Device device = table_.device();
  int64_t n_chunks = 0;
  for (int64_t numel : numels) n_chunks += (numel + chunk_ - 1) / chunk_;
  const int64_t size = static_cast<int64_t>(head.size()) + 2 * n_chunks;
  // Off the CPU: staged in pinned memory and copied without blocking (a
  // pageable copy can stall the host behind the GPU). The caching host
  // allocator keeps the pinned block until the copy has run.
  at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(!device.is_cpu()));
  int64_t* out = host.mutable_data_ptr<int64_t>();
  std::copy(head.begin(), head.end(), out);
  int64_t* chunk_tensor = out + head.size();
  int64_t* chunk_start = chunk_tensor + n_chunks;
  for (int64_t k = 0, c = 0; k < n; ++k) {
    for (int64_t s = 0; s < numels[k]; s += chunk_, ++c) {
      chunk_tensor[c] = k;
      chunk_start[c] = s;
    }
  }
  at::Tensor buf = device.is_cpu() ? host : host.to(device, /*non_blocking=*/true);
  const int64_t R = n_rows;
  tables_ = {buf.narrow(0, 0, R * n), buf.narrow(0, R * n, n), buf.narrow(0, R * n + n, n_chunks),
             buf.narrow(0, R * n + n + n_chunks, n_chunks)};
  n_chunks_ = n_chunks;
  key_ = std::move(head);
  if (!device.is_cpu()) table_stream_ = c10::impl::VirtualGuardImpl(device.type()).getStream(device);
}

void DeviceTable::unbump_steps(const at::Tensor& found_inf) {
  if (bumped_.empty()) return;
  at::_foreach_sub_(bumped_, std::vector<at::Tensor>(bumped_.size(), found_inf));
}

bool DeviceTable::any_gathered_flag(int64_t row) const {
  for (int64_t i : last_) {
    if (flags_.at(row)[i] != 0) return true;
  }
  return false;
}

void DeviceTable::clear_gathered_flags(int64_t row) {
  for (int64_t i : last_) flags_.at(row)[i] = 0;
}

}  // namespace cpu
}  // namespace fasttricks
