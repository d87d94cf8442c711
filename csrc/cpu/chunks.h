// The parallel loops of a fused CPU op: a step's work split into chunks of
// whole units by element count, one parallel region over all tensors, the
// per-tensor host work, and the prefetch of tensors ahead.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace fasttricks {

using at::vec::Vectorized;

namespace cpu {

struct Chunk {
  int64_t tensor, begin, end;
};

// Work is split in units of kUnitElems elements (a multiple of every vector
// unit, so only a tensor's last unit can be partial); a unit never spans two
// tensors.
constexpr int64_t kUnitElems = 64;
// Below this many elements in all, a parallel region costs more than it saves,
// unless there are at least kParallelTensors tensors: a tiny tensor costs a
// few cache misses (30-60 ns a step), so thousands of them pay for the region
// (NOTE [tiny tensors]).
constexpr int64_t kSerialElems = int64_t(1) << 15;
constexpr int64_t kParallelTensors = 2048;

// A step's per-tensor host work (gathering pointers, bumping step counters,
// filling the kernels' records) as fn(lo, hi) over tensors [lo, hi): split over
// the threads from kParallelTensors tensors on, inline below. fn must not
// throw, and tensors in different ranges must not share memory it writes.
template <typename F>
void for_tensor_ranges(int64_t n, const F& fn) {
  if (n >= kParallelTensors) {
    at::parallel_for(0, n, kParallelTensors / 2, fn);
  } else {
    fn(0, n);
  }
}

// Units per block handed to a thread: 64K elements.
constexpr int64_t kBlockUnits = 1024;

// The tensor list flattened into units: which tensor each unit of the
// flattened list belongs to, and the pieces a run of units covers.
class UnitMap {
 public:
  explicit UnitMap(const std::vector<int64_t>& numels) : numels_(numels), unit_end_(numels.size()) {
    for (size_t t = 0; t < numels.size(); ++t) {
      units_ += (numels[t] + kUnitElems - 1) / kUnitElems;
      unit_end_[t] = units_;
      elems_ += numels[t];
    }
  }
  int64_t units() const { return units_; }
  int64_t blocks() const { return (units_ + kBlockUnits - 1) / kBlockUnits; }
  // Small enough for one thread (kSerialElems, kParallelTensors).
  bool serial() const { return elems_ < kSerialElems && static_cast<int64_t>(numels_.size()) < kParallelTensors; }

  // fn(Chunk) on each tensor's piece of units [lo, hi), in order.
  template <typename F>
  void pieces(int64_t lo, int64_t hi, const F& fn) const {
    const int64_t n = static_cast<int64_t>(numels_.size());
    int64_t t = std::upper_bound(unit_end_.begin(), unit_end_.end(), lo) - unit_end_.begin();
    for (; t < n && lo < hi; ++t) {
      const int64_t first = t == 0 ? 0 : unit_end_[t - 1];
      const int64_t stop = std::min(hi, unit_end_[t]);
      if (stop > lo) fn(Chunk{t, (lo - first) * kUnitElems, std::min(numels_[t], (stop - first) * kUnitElems)});
      lo = stop;
    }
  }
  // fn(block, Chunk) on the pieces of block `block` (kBlockUnits units).
  template <typename F>
  void block_pieces(int64_t block, const F& fn) const {
    pieces(block * kBlockUnits, std::min(units_, (block + 1) * kBlockUnits), [&](const Chunk& ch) { fn(block, ch); });
  }

 private:
  const std::vector<int64_t>& numels_;
  std::vector<int64_t> unit_end_;  // prefix sums of units per tensor
  int64_t units_ = 0, elems_ = 0;
};

// One parallel region over all tensors, split by element count: each thread
// takes one contiguous run of units of the flattened tensor list and calls fn
// on the (tensor, begin, end) pieces of its run. Splitting by element count,
// not by tensor or by per-tensor chunk, matters: ResNet-50's small tensors
// sit in its first half, so a split by chunk count gave one core 60% of the
// elements, and a memory-bound step then runs at the speed of that core.
template <typename F>
void run_chunks(const std::vector<int64_t>& numels, const F& fn) {
  const UnitMap map(numels);
  if (map.serial()) return map.pieces(0, map.units(), fn);
  // Threads take fixed-size blocks of units from a shared counter, so a core
  // that finishes early (small tensors restart the prefetchers more often)
  // helps with the rest; blocks go out in order, so the cores stream
  // neighbouring memory.
  const int64_t blocks = map.blocks();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), blocks), 1, [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks;) {
      map.block_pieces(b, [&](int64_t, const Chunk& ch) { fn(ch); });
    }
  });
}

// The same walk for a reduction: fn(block, chunk) on the pieces of each of
// `map`'s blocks. A block's pieces never depend on the thread that runs it,
// so a reduction that keeps one partial per block and sums them in block
// order gives the same bits every run.
template <typename F>
void reduce_blocks(const UnitMap& map, const F& fn) {
  const int64_t blocks = map.blocks();
  if (map.serial()) {
    for (int64_t b = 0; b < blocks; ++b) map.block_pieces(b, fn);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), blocks), 1, [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks;) map.block_pieces(b, fn);
  });
}

// A step over many tiny tensors (a vector unit or less each, as the biases
// and norms of a small model) waits on memory, not on arithmetic: every
// tensor is a few cache lines of its own, scattered over the heap, and the
// hardware prefetchers cannot guess the next one. So while tensor t runs, a
// kernel asks for the first lines of tensor t + kTensorsAhead (its pointers
// are known; null ones are skipped). NOTE [tiny tensors] in
// docs/performance.md has the measurements.
constexpr size_t kTensorsAhead = 8;
// Up to this many tensors a step's data lines fit the cache with room to
// spare, so the gather asks for all of them at once (csrc/host/tensor_table.h).
constexpr size_t kPrefetchDataTensors = 1024;
template <typename... T>
C10_ALWAYS_INLINE void prefetch_first_lines(const T*... ptrs) {
  ((ptrs != nullptr ? __builtin_prefetch(ptrs, 1, 3) : void()), ...);
}

// Per chunk of a kernel: when the chunk starts a tensor of one unit or less,
// ask for the lines of the tensor kTensorsAhead further on. A kernel's
// per-tensor record (AdamPtrs, SgdPtrs) names its pointers in prefetch().
template <int64_t kUnit, typename Ptrs>
C10_ALWAYS_INLINE void prefetch_tensor_ahead(const std::vector<Ptrs>& ptrs, const std::vector<int64_t>& numels,
                                             const Chunk& ch) {
  const size_t ahead = static_cast<size_t>(ch.tensor) + kTensorsAhead;
  if (ch.begin == 0 && numels[ch.tensor] <= kUnit && ahead < ptrs.size()) ptrs[ahead].prefetch();
}

// One chunk of a kernel, two vector units of kUnit elements per call while
// they fit (the kernels issue both units' loads before any store, so more
// lines are in flight), then single units for the tail:
// f(first element, elements per unit, std::integral_constant<int, units>).
template <int64_t kUnit, typename F, int kMaxUnits = 2>
inline void for_units(const Chunk& ch, const F& f) {
  int64_t i = ch.begin;
  if constexpr (kMaxUnits == 2) {
    for (; i + 2 * kUnit <= ch.end; i += 2 * kUnit) f(i, kUnit, std::integral_constant<int, 2>{});
  }
  for (; i < ch.end; i += kUnit) f(i, std::min(kUnit, ch.end - i), std::integral_constant<int, 1>{});
}

}  // namespace cpu
}  // namespace fasttricks
