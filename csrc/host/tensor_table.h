// NOTE [tensor table]
// The one place where a step's tensors are gathered and validated, for every
// plan in C++: the CPU plans (plans.h) run their kernels on the raw pointers it
// yields, and the device plans' DeviceTable (device_table.cpp) packs the same
// pointers into the pointer table of the Triton and CUDA kernels.
//
// A table holds one bucket of params (one device, one dtype) and their "slots":
// per-param state lists (moments, momentum buffer, master copy, running
// average), each empty or one tensor per param, of the slot's dtype and shaped
// like the param. It belongs to a plan, which the Python optimizer rebuilds
// whenever a slot tensor is replaced (NOTE [plan cache] in
// fasttricks/optim/_plan_cache.py), so the slots' dtype, shape, device and
// layout are checked once, here, when they are set. A step then reads the
// param, its grad, the cached pointers, and of each state tensor only whether
// it still holds the storage it was recorded with, and that storage the same
// memory: assigning `state_tensor.data = ...` (the usual way of moving
// optimizer state between devices) or resizing it in place keeps the tensor
// object, so no container of ours sees it. (The table does not hold the old
// storages: moving state off a device must free it there.) Whatever a step
// cannot vouch for (a param whose layout no longer matches the one recorded,
// a slot that did not match to begin with or no longer holds its memory)
// takes the full check, which raises before the step writes anything, and
// runs through contiguous temporaries where layouts differ.
#pragma once
#include "cpu/chunks.h"
#include "param_records.h"

#include <string>

namespace fasttricks {
namespace cpu {

class TensorTable {
 public:
  TensorTable(std::string op, std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> slots,
              std::vector<at::ScalarType> slot_dtypes)
      : op_(std::move(op)), params_(std::move(params)), slots_(std::move(slots)),
        slot_dtypes_(std::move(slot_dtypes)) {
    TORCH_CHECK(!params_.empty(), op_, " plan: no parameters");
    TORCH_CHECK(slots_.size() <= static_cast<size_t>(kMaxSlots), op_, " plan: too many state lists");
    TORCH_CHECK(slot_dtypes_.size() == slots_.size(), op_, " plan: one dtype per state list");
    param_dtype_ = params_[0].scalar_type();
    param_meta_ = params_[0].dtype();
    device_ = params_[0].device();
    for (const auto& p : params_) {
      TORCH_CHECK_TYPE(p.scalar_type() == param_dtype_, op_, " plan: mixed parameter dtypes");
      TORCH_CHECK(p.device() == device_, op_, " plan: parameters on several devices");
    }
    for (const auto& s : slots_) check_slot_length(s);
    refresh();
  }

  // Replaces slot k (an empty list switches it off).
  void set_slot(size_t k, std::vector<at::Tensor> tensors) {
    TORCH_CHECK(k < slots_.size(), op_, " plan: no state list ", k);
    check_slot_length(tensors);
    slots_[k] = std::move(tensors);
    refresh();
  }

  size_t size() const { return params_.size(); }
  size_t n_slots() const { return slots_.size(); }
  bool has_slot(size_t k) const { return !slots_.at(k).empty(); }
  const std::string& op() const { return op_; }
  at::Device device() const { return device_; }
  at::ScalarType param_dtype() const { return param_dtype_; }
  at::ScalarType slot_dtype(size_t k) const { return slot_dtypes_.at(k); }

  // The params that have a grad this step, validated, with the memory the
  // kernels read and write. Nothing is written here; temporaries for
  // layouts that differ go into `scratch` (copied back by scratch.apply()).
  std::vector<Gathered> gather(Scratch& scratch) const {
    const int64_t n = static_cast<int64_t>(params_.size());
    std::vector<Gathered> rows(n);
    std::vector<uint8_t> kinds(n);
    // The fast path only reads, so many params split over the threads (NOTE
    // [tiny tensors]: each param is a few cache misses); what it cannot vouch
    // for is checked below, in order, so the first bad param raises as before.
    for_tensor_ranges(n, [&](int64_t lo, int64_t hi) { gather_fast(lo, hi, rows.data(), kinds.data()); });
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (kinds[i] == kNoGrad) continue;
      if (kinds[i] == kFullCheck) {
        const at::Tensor& g = params_[i].unsafeGetTensorImpl()->grad();
        check_param_and_grad(params_[i], g);
        gather_checked(i, params_[i], g, rows[i], scratch);
      }
      if (kept != i) rows[kept] = rows[i];
      ++kept;
    }
    rows.resize(kept);
    return rows;
  }

 private:
  struct Cached;

  void check_slot_length(const std::vector<at::Tensor>& s) const {
    TORCH_CHECK(s.empty() || s.size() == params_.size(), op_, ": one state tensor per parameter (or none)");
  }

  enum RowKind : uint8_t { kNoGrad, kFast, kFullCheck };

  // Params [lo, hi): the rows the fast path can fill, and what each needs.
  void gather_fast(int64_t lo, int64_t hi, Gathered* rows, uint8_t* kinds) const {
    // Each param is a chain of objects (TensorImpl, its autograd meta, the
    // grad's TensorImpl, the two storages), so the prefetches run as a
    // pipeline: a stage follows one pointer of a param whose earlier
    // objects an earlier stage brought in.
    constexpr int64_t kImplAhead = 16, kMetaAhead = 8, kGradAhead = 4, kStorageAhead = 2, kRing = 8;
    const at::Tensor* grads[kRing];  // params i .. i + kGradAhead: their grads
    auto impl = [&](int64_t j) { return params_[j].unsafeGetTensorImpl(); };
    auto prefetch_impl = [](const c10::TensorImpl* t) {  // the lines of the fields read below
      const char* p = reinterpret_cast<const char*>(t);
      prefetch_first_lines(p, p + 64, p + 128);
    };
    auto prefetch_storage = [](const c10::TensorImpl* t) {
      prefetch_first_lines(t->unsafe_storage().unsafeGetStorageImpl());
    };
    // A small table's data lines fit the cache with room to spare: asking
    // for them here overlaps their misses with the gather's (NOTE [tiny
    // tensors]); a large one's would evict each other before the kernel runs.
    const bool prefetch_data = params_.size() <= kPrefetchDataTensors;
    for (int64_t j = lo; j < std::min(hi, lo + kGradAhead); ++j) grads[j % kRing] = &impl(j)->grad();
    for (int64_t i = lo; i < hi; ++i) {
      if (i + kImplAhead < hi) {
        prefetch_impl(impl(i + kImplAhead));
        // The state tensors' impls and recorded storages: known addresses, no
        // chain (a prefetch of a freed one is harmless).
        const Cached& ahead = cache_[i + kImplAhead];
        for (size_t k = 0; k < slots_.size(); ++k) {
          if (ahead.storages[k] != nullptr) {
            prefetch_first_lines(slots_[k][i + kImplAhead].unsafeGetTensorImpl(), ahead.storages[k]);
          }
        }
      }
      if (i + kMetaAhead < hi) {
        prefetch_first_lines(impl(i + kMetaAhead)->autograd_meta());
        prefetch_storage(impl(i + kMetaAhead));
      }
      if (i + kGradAhead < hi) {
        const at::Tensor* ga = &impl(i + kGradAhead)->grad();
        grads[(i + kGradAhead) % kRing] = ga;
        if (ga->defined()) prefetch_impl(ga->unsafeGetTensorImpl());
      }
      if (i + kStorageAhead < hi && grads[(i + kStorageAhead) % kRing]->defined()) {
        prefetch_storage(grads[(i + kStorageAhead) % kRing]->unsafeGetTensorImpl());
      }
      c10::TensorImpl* pi = impl(i);
      // TensorImpl::grad, not Tensor::grad: the latter first asks autograd
      // whether the param is a leaf (a virtual call per param) so as to warn
      // about .grad of non-leaves, and torch.optim takes leaves only.
      const at::Tensor& g = *grads[i % kRing];
      Gathered& row = rows[i];
      row.index = i;
      row.numel = pi->numel();
      const Cached& c = cache_[i];
      if (!g.defined()) {
        kinds[i] = kNoGrad;
      } else if (c.fast && fast_layout(*pi, *g.unsafeGetTensorImpl(), c) && slots_as_recorded(i, c)) {
        kinds[i] = kFast;
        row.param = pi->mutable_data();
        row.grad = g.unsafeGetTensorImpl()->data();
        std::copy(std::begin(c.slots), std::end(c.slots), row.slots);
        if (prefetch_data) {  // the kernel's first lines, in flight while the gather goes on
          prefetch_first_lines(row.param, row.grad);
          for (const void* s : c.slots) prefetch_first_lines(s);
        }
      } else {
        kinds[i] = kFullCheck;
        row.param = nullptr;
        row.grad = nullptr;
        std::fill(std::begin(row.slots), std::end(row.slots), nullptr);
      }
    }
  }

  // Whether a param and its grad are as recorded (dense, on the table's
  // device and dtype, grad laid out like the param, param sizes and strides
  // unchanged): then the cached slot pointers hold and every check of
  // check_param_and_grad passes. Reads TensorImpl fields only (inline
  // accessors: this runs per param per step).
  bool fast_layout(const c10::TensorImpl& p, const c10::TensorImpl& g, const Cached& c) const {
    const c10::IntArrayRef sizes{layout_.data() + c.layout, size_t(c.dim)};
    const c10::IntArrayRef strides{layout_.data() + c.layout + c.dim, size_t(c.dim)};
    return !g.is_sparse() && p.dtype() == param_meta_ && g.dtype() == param_meta_ && p.device() == device_ &&
           g.device() == device_ && same_ints(p.sizes(), sizes) && same_ints(p.strides(), strides) &&
           same_ints(g.sizes(), sizes) && same_ints(g.strides(), strides);
  }

  // Whether each state tensor of param i still holds the storage recorded
  // for it, and that storage the same memory (NOTE [tensor table]).
  bool slots_as_recorded(int64_t i, const Cached& c) const {
    for (size_t k = 0; k < slots_.size(); ++k) {
      if (c.storages[k] == nullptr) continue;
      // Read through the tensor's own storage, never the recorded pointer: the
      // recorded storage may be gone (and its address reused, which is why the
      // memory is compared too).
      const c10::StorageImpl* now = slots_[k][i].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
      if (now != c.storages[k] || now->data_ptr().get() != c.bases[k]) return false;
    }
    return true;
  }

  // Every step, for every param with a grad the fast path did not take: the
  // checks that raise, with torch's exception types and our messages.
  void check_param_and_grad(const at::Tensor& p, const at::Tensor& g) const {
    check_grad_like_param(op_.c_str(), p, g);
    TORCH_CHECK_TYPE(p.scalar_type() == param_dtype_, op_, ": parameter dtype changed from ", param_dtype_,
                     " to ", p.scalar_type(), " after the optimizer state was created");
    TORCH_CHECK(p.device() == device_ && g.device() == device_, op_, ": parameter on ", p.device(),
                " and gradient on ", g.device(), ", but the optimizer state is on ", device_);
  }

  // The full check of one param's slots, then its memory, through contiguous
  // temporaries when any layout differs from the param's dense one.
  void gather_checked(size_t i, const at::Tensor& p, const at::Tensor& g, Gathered& row,
                      Scratch& scratch) const {
    bool dense = p.is_non_overlapping_and_dense() && same_ints(g.strides(), p.strides());
    for (size_t k = 0; k < slots_.size(); ++k) {
      const auto& s = slots_[k];
      if (s.empty()) continue;
      check_state_like_param(op_.c_str(), "optimizer state", s[i], p, slot_dtypes_[k]);
      TORCH_CHECK(s[i].device() == device_, op_, ": optimizer state on ", s[i].device(), ", parameter on ",
                  device_);
      dense = dense && same_ints(s[i].strides(), p.strides());
    }
    row.param = dense ? p.mutable_data_ptr() : scratch.writable(p);
    row.grad = dense ? g.const_data_ptr() : scratch.readable(g);
    for (size_t k = 0; k < slots_.size(); ++k) {
      if (slots_[k].empty()) continue;
      row.slots[k] = dense ? slots_[k][i].mutable_data_ptr() : scratch.writable(slots_[k][i]);
    }
  }

  // Call whenever a slot changes: records each param's layout and whether
  // its slots share it (then a step takes the fast path).
  void refresh() {
    cache_.assign(params_.size(), Cached{});
    layout_.clear();
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      Cached& c = cache_[i];
      c.layout = static_cast<int64_t>(layout_.size());
      c.dim = p.dim();
      layout_.insert(layout_.end(), p.sizes().begin(), p.sizes().end());
      layout_.insert(layout_.end(), p.strides().begin(), p.strides().end());
      c.fast = p.is_non_overlapping_and_dense();
      for (size_t k = 0; k < slots_.size(); ++k) {
        if (slots_[k].empty()) continue;
        const at::Tensor& t = slots_[k][i];
        c.fast = c.fast && t.has_storage() && t.scalar_type() == slot_dtypes_[k] && t.device() == device_ &&
                 same_ints(t.sizes(), p.sizes()) && same_ints(t.strides(), p.strides());
        if (!c.fast) continue;  // the full check reads this param's slots afresh each step
        c.slots[k] = t.mutable_data_ptr();
        c.storages[k] = t.storage().unsafeGetStorageImpl();
        c.bases[k] = t.storage().data_ptr().get();
      }
    }
  }

  struct Cached {
    bool fast = false;            // the slots share the param's dtype-checked dense layout
    int64_t layout = 0, dim = 0;  // the param's recorded sizes and strides: layout_[layout, +2 dim)
    void* slots[kMaxSlots] = {};
    // Each state tensor's storage when recorded, and the memory it held
    // (nullptr where the slot is unused): slots_as_recorded().
    const c10::StorageImpl* storages[kMaxSlots] = {};
    const void* bases[kMaxSlots] = {};
  };

  std::string op_;
  std::vector<at::Tensor> params_;
  std::vector<std::vector<at::Tensor>> slots_;
  std::vector<at::ScalarType> slot_dtypes_;
  at::ScalarType param_dtype_;
  caffe2::TypeMeta param_meta_;  // param_dtype_, as TensorImpl holds it
  at::Device device_{at::kCPU};
  std::vector<Cached> cache_;
  std::vector<int64_t> layout_;
};

}  // namespace cpu
}  // namespace fasttricks
