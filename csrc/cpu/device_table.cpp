// Host side of the Triton and CUDA multi-tensor steps (fasttricks/ops/_device.py
// has the format and a pure-Python equivalent): validates a step's params and
// grads, packs the pointer table, and bumps the step counters. In C++ because
// the Python loop over 161 params cost about a millisecond a step, far over
// the GPU host-overhead target (docs/performance.md: <= 50 us). Only tensor metadata is read
// here; the table copy and the counter bump are torch ops on the device.
#include "device_table.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace fasttricks {
namespace cpu {

DeviceTable::DeviceTable(std::string op, std::vector<at::Tensor> params,
                         std::vector<std::vector<at::Tensor>> rows, int64_t n_state_rows,
                         int64_t step_row, int64_t n_flag_rows, at::ScalarType state_dtype,
                         int64_t chunk)
    : op_(std::move(op)), params_(std::move(params)), rows_(std::move(rows)),
      n_state_rows_(n_state_rows), step_row_(step_row), state_dtype_(state_dtype), chunk_(chunk) {
  TORCH_CHECK(!params_.empty(), op_, " plan: no parameters");
  TORCH_CHECK(n_state_rows_ >= 0 && n_state_rows_ <= static_cast<int64_t>(rows_.size()) &&
                  step_row_ < static_cast<int64_t>(rows_.size()) && chunk_ > 0,
              op_, " plan: bad table layout");
  for (const auto& r : rows_) {
    TORCH_CHECK(r.empty() || r.size() == params_.size(), op_, " plan: row length mismatch");
  }
  param_dtype_ = params_[0].scalar_type();
  device_ = params_[0].device();
  flags_.assign(n_flag_rows, std::vector<int64_t>(params_.size(), 0));
  if (step_row_ >= 0) {
    for (const auto& s : rows_[step_row_]) {  // the kernels read step counters as float32
      TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat && s.numel() == 1 && s.device() == device_, op_,
                       ": step counters must be one-element float32 tensors on ", device_, ", got ",
                       s.scalar_type(), " on ", s.device());
    }
  }
  refresh();
}

void DeviceTable::set_row(int64_t row, std::vector<at::Tensor> tensors) {
  TORCH_CHECK(row >= 0 && row < static_cast<int64_t>(rows_.size()), op_, " plan: no row ", row);
  TORCH_CHECK(tensors.empty() || tensors.size() == params_.size(), op_,
              ": one tensor per parameter (or none)");
  rows_[row] = std::move(tensors);
  refresh();
}

void DeviceTable::set_flags(int64_t row, std::vector<int64_t> values) {
  TORCH_CHECK(row >= 0 && row < static_cast<int64_t>(flags_.size()) && values.size() == params_.size(),
              op_, " plan: bad flag row");
  flags_[row] = std::move(values);
}

// NOTE [plan cache] (plans.h): the state rows belong to the plan, so their
// dtype and layout against the param are checked here, once.
void DeviceTable::refresh() {
  fast_.assign(params_.size(), 0);
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    bool fast = p.is_non_overlapping_and_dense();
    for (int64_t r = 0; r < n_state_rows_ && fast; ++r) {
      if (rows_[r].empty()) continue;
      const at::Tensor& t = rows_[r][i];
      fast = t.scalar_type() == state_dtype_ && t.device() == p.device() && same_ints(t.sizes(), p.sizes()) &&
             same_ints(t.strides(), p.strides());
    }
    fast_[i] = fast;
  }
  layout_.assign(params_.size(), {});
  for (size_t i = 0; i < params_.size(); ++i) {
    layout_[i].assign(params_[i].sizes().begin(), params_[i].sizes().end());
    layout_[i].insert(layout_[i].end(), params_[i].strides().begin(), params_[i].strides().end());
  }
  key_.clear();  // rebuild the device table on the next step
}

void DeviceTable::check_grad(const at::Tensor& p, const at::Tensor& g) const {
  check_grad_like_param(op_.c_str(), p, g);
  TORCH_CHECK(g.device() == p.device(), op_, ": gradient on ", g.device(), ", parameter on ", p.device());
  TORCH_CHECK_TYPE(p.scalar_type() == param_dtype_, op_, ": parameter dtype changed from ", param_dtype_,
                   " to ", p.scalar_type(), " after the optimizer state was created");
}

bool DeviceTable::layout_unchanged(size_t i) const {
  const at::Tensor& p = params_[i];
  const auto& l = layout_[i];
  const size_t d = static_cast<size_t>(p.dim());
  return l.size() == 2 * d && same_ints(p.sizes(), {l.data(), d}) && same_ints(p.strides(), {l.data() + d, d});
}

DeviceTable::Packed DeviceTable::gather() {
  const int64_t n_rows = 2 + static_cast<int64_t>(rows_.size() + flags_.size());
  Scratch scratch;
  last_.clear();
  std::vector<const void*> cols;  // per gathered param: param, grad, then rows
  std::vector<int64_t> numels;
  const size_t n_cols = 2 + rows_.size();
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i];
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    check_grad(p, g);
    last_.push_back(static_cast<int64_t>(i));
    numels.push_back(p.numel());
    if (fast_[i] && layout_unchanged(i) && same_ints(g.strides(), p.strides())) {
      cols.push_back(p.data_ptr());
      cols.push_back(g.data_ptr());
      for (const auto& r : rows_) cols.push_back(r.empty() ? nullptr : r[i].data_ptr());
      continue;
    }
    // Full check, then contiguous temporaries where layouts differ.
    for (int64_t r = 0; r < n_state_rows_; ++r) {
      if (rows_[r].empty()) continue;
      const at::Tensor& t = rows_[r][i];
      check_state_like_param(op_.c_str(), "optimizer state", t, p, state_dtype_);
      TORCH_CHECK(t.device() == p.device(), op_, ": optimizer state on ", t.device(), ", parameter on ",
                  p.device());
    }
    bool dense = p.is_non_overlapping_and_dense() && same_ints(g.strides(), p.strides());
    for (int64_t r = 0; r < n_state_rows_ && dense; ++r) {
      if (!rows_[r].empty()) dense = same_ints(rows_[r][i].strides(), p.strides());
    }
    cols.push_back(dense ? p.data_ptr() : scratch.writable(p));
    cols.push_back(dense ? g.data_ptr() : const_cast<void*>(scratch.readable(g)));
    for (size_t r = 0; r < rows_.size(); ++r) {
      if (rows_[r].empty()) {
        cols.push_back(nullptr);
      } else if (static_cast<int64_t>(r) < n_state_rows_ && !dense) {
        cols.push_back(scratch.writable(rows_[r][i]));
      } else {
        cols.push_back(rows_[r][i].data_ptr());
      }
    }
  }
  const int64_t n = static_cast<int64_t>(last_.size());
  if (n == 0) return Packed{0, {}, {}, {}};

  // The pointer rows and numels: O(params). The chunk lists after them are
  // O(elements / chunk) (27 MB for a 7B model), so they are rebuilt only when
  // this part changed.
  std::vector<int64_t> head(static_cast<size_t>(n_rows * n + n));
  for (int64_t k = 0; k < n; ++k) {
    for (size_t c = 0; c < n_cols; ++c) {
      head[c * n + k] = reinterpret_cast<int64_t>(cols[k * n_cols + c]);
    }
    for (size_t f = 0; f < flags_.size(); ++f) head[(n_cols + f) * n + k] = flags_[f][last_[k]];
    head[n_rows * n + k] = numels[k];
  }
  if (head != key_) upload(std::move(head), numels, n_rows);
  if (!device_.is_cpu()) {
    // The kernel reads the device table on the current stream: if that is not
    // the stream it was uploaded on, the caching allocator must know before
    // the table is freed (at the next rebuild).
    const c10::Stream stream = c10::impl::VirtualGuardImpl(device_.type()).getStream(device_);
    if (stream != table_stream_) {
      tables_[0].record_stream(stream);
      table_stream_ = stream;
    }
  }
  if (step_row_ >= 0 && !rows_[step_row_].empty()) {
    steps_.clear();
    for (int64_t i : last_) steps_.push_back(rows_[step_row_][i]);
    at::_foreach_add_(steps_, 1.0);
  }
  return Packed{n, std::make_tuple(tables_[0], tables_[1], tables_[2], tables_[3], n, n_chunks_),
                std::move(scratch.writeback), std::move(scratch.keep)};
}

void DeviceTable::upload(std::vector<int64_t> head, const std::vector<int64_t>& numels, int64_t n_rows) {
  const int64_t n = static_cast<int64_t>(numels.size());
  int64_t n_chunks = 0;
  for (int64_t numel : numels) n_chunks += (numel + chunk_ - 1) / chunk_;
  const int64_t size = static_cast<int64_t>(head.size()) + 2 * n_chunks;
  // Off the CPU: staged in pinned memory and copied without blocking (a
  // pageable copy can stall the host behind the GPU). The caching host
  // allocator keeps the pinned block until the copy has run.
  at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(!device_.is_cpu()));
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
  at::Tensor buf = device_.is_cpu() ? host : host.to(device_, /*non_blocking=*/true);
  const int64_t R = n_rows;
  tables_ = {buf.narrow(0, 0, R * n), buf.narrow(0, R * n, n), buf.narrow(0, R * n + n, n_chunks),
             buf.narrow(0, R * n + n + n_chunks, n_chunks)};
  n_chunks_ = n_chunks;
  key_ = std::move(head);
  if (!device_.is_cpu()) table_stream_ = c10::impl::VirtualGuardImpl(device_.type()).getStream(device_);
}

void DeviceTable::unbump_steps(const at::Tensor& found_inf) {
  if (steps_.empty()) return;
  at::_foreach_sub_(steps_, std::vector<at::Tensor>(steps_.size(), found_inf));
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
