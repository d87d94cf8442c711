// CPU multi-tensor machinery shared by every fused CPU op: vector loads/stores
// per dtype, one parallel region over all tensors' chunks, compile-time switch
// dispatch, and the per-step gather that validates every tensor before any is
// written (a failed step changes nothing).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/GradMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fasttricks/common.h"
#include "fasttricks/rounding.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <atomic>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fasttricks {

using at::vec::Vectorized;

// Declared before the math headers so their unqualified calls resolve here.
template <typename O>
inline Vectorized<O> ft_sqrt(const Vectorized<O>& x) { return x.sqrt(); }
template <typename O>
inline Vectorized<O> ft_max(const Vectorized<O>& a, const Vectorized<O>& b) {
  return at::vec::maximum(a, b);
}

namespace cpu {

// NOTE [stochastic rounding], vectorised: the integer ops of
// fasttricks/rounding.h on int32 lanes (wrapping multiplies; a logical shift
// is an arithmetic one masked).
namespace vround {
using FVec = Vectorized<float>;
using IVec = Vectorized<int32_t>;

// Bit casts and logical shifts: single instructions where the ISA has them
// (at::vec's generic cast goes through memory; int32 >> is arithmetic).
C10_ALWAYS_INLINE IVec as_int(const FVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(x);
#else
  return at::vec::cast<int32_t>(x);
#endif
}

C10_ALWAYS_INLINE FVec as_float(const IVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(x);
#else
  return at::vec::cast<float>(x);
#endif
}

C10_ALWAYS_INLINE IVec srl(const IVec& x, int s) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_srli_epi32(x, static_cast<unsigned>(s));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_srli_epi32(x, s);
#else
  return (x >> IVec(s)) & IVec(static_cast<int32_t>(0xFFFFFFFFu >> s));
#endif
}

C10_ALWAYS_INLINE IVec mix32(IVec x) {
  x = x ^ srl(x, 16);
  x = x * IVec(static_cast<int32_t>(0x7FEB352Du));
  x = x ^ srl(x, 15);
  x = x * IVec(static_cast<int32_t>(0x846CA68Bu));
  return x ^ srl(x, 16);
}

// draw_bits of rounding.h for elements e, e + 1, ..., e + size - 1. A unit
// never spans a multiple of 2^31 (units start at multiples of their size),
// so the high part of the index is one scalar.
C10_ALWAYS_INLINE IVec draw(uint32_t tensor_key, int64_t e) {
  const uint32_t base = tensor_key ^ (static_cast<uint32_t>(static_cast<uint64_t>(e) >> 31) * 0x85EBCA6Bu);
  const uint32_t lo = static_cast<uint32_t>(e & 0x7FFFFFFF);
  return mix32(IVec(static_cast<int32_t>(base)) + IVec(static_cast<int32_t>(lo)) + IVec::arange(0, 1));
}

C10_ALWAYS_INLINE IVec next_word(const IVec& w) { return w * IVec(static_cast<int32_t>(rounding::kWordMul)); }

// Stores the low 16 bits of the lanes of a, then b, to p[0, n).
C10_ALWAYS_INLINE void store_low16(void* p, int64_t n, const IVec& a, const IVec& b) {
  constexpr int64_t kW = IVec::size();
#if defined(CPU_CAPABILITY_AVX2)
  if (n >= 2 * kW) {  // the lanes hold 0..65535, so the saturating pack keeps them
    const __m256i packed = _mm256_packus_epi32(a, b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
    return;
  }
#endif
  alignas(64) int32_t lanes[2 * kW];
  a.store(lanes);
  b.store(lanes + kW);
  uint16_t* out = static_cast<uint16_t*>(p);
  for (int64_t k = 0; k < std::min(n, 2 * kW); ++k) out[k] = static_cast<uint16_t>(lanes[k]);
}

// round_bf16 of rounding.h: the bf16 bits in the low half of each lane.
// (AVX-512 has round_bf16_high and store_high16 below instead.)
C10_ALWAYS_INLINE IVec round_bf16(const FVec& x, const IVec& r, bool positive_floor) {
  IVec out = srl(as_int(x) + r, 16);
  out = IVec::blendv(out, IVec(0x7FC0), as_int(x != x));  // NaN: the canonical quiet NaN
  if (positive_floor) {
    out = IVec::blendv(out, IVec(1), as_int(x > FVec(0.0f)) & (out == IVec(0)));
  }
  return out;
}

#if defined(CPU_CAPABILITY_AVX512)
// round_bf16 before its shift, on mask registers: the rounded bf16 bits in the
// HIGH half of each lane (NaN: 0x7FC00000; the positive floor: 0x00010000).
C10_ALWAYS_INLINE __m512i round_bf16_high(const FVec& x, const IVec& r, bool positive_floor) {
  __m512i out = _mm512_add_epi32(_mm512_castps_si512(x), r);
  out = _mm512_mask_mov_epi32(out, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  if (positive_floor) {  // (out >> 16) == 0 for a positive x
    const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ) &
                           _mm512_cmplt_epu32_mask(out, _mm512_set1_epi32(0x10000));
    out = _mm512_mask_mov_epi32(out, zero, _mm512_set1_epi32(0x10000));
  }
  return out;
}

// Stores the high 16 bits of the lanes of a, then b, to p[0, n): one word
// permute and one (masked) store, where shifting and narrowing each vector
// took four instructions more per unit (the rounding is ALU-bound).
C10_ALWAYS_INLINE void store_high16(void* p, int64_t n, __m512i a, __m512i b) {
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                             31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i packed = _mm512_permutex2var_epi16(a, odd_words, b);
  if (n >= 32) {
    _mm512_storeu_si512(p, packed);
  } else {
    _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint64_t(1) << n) - 1), packed);
  }
}
#endif

C10_ALWAYS_INLINE IVec half(const IVec& bits, int shift) {
  return shift ? srl(bits, 16) : (bits & IVec(0xFFFF));
}

// round_fp16 of rounding.h, as the fp32 values (exact in fp16) that the
// store then converts.
C10_ALWAYS_INLINE FVec round_fp16(const FVec& x, const IVec& r, bool positive_floor) {
  IVec e = srl(as_int(x), 23) & IVec(0xFF);
  e = at::vec::minimum(at::vec::maximum(e - IVec(127), IVec(-14)), IVec(15)) - IVec(10);  // ulp exponent
  const FVec scale = as_float((IVec(127) - e) << IVec(23));
  const FVec unscale = as_float((IVec(127) + e) << IVec(23));
  const FVec q = x * scale;
  const FVec fl = q.floor();
  const FVec r_f = at::vec::convert_to_fp_of_same_size<float>(r);
  FVec out = (fl + FVec::blendv(FVec(0.0f), FVec(1.0f), r_f < (q - fl) * FVec(65536.0f))) * unscale;
  if (positive_floor) {
    out = FVec::blendv(out, FVec(5.9604644775390625e-08f), (x > FVec(0.0f)) & (out == FVec(0.0f)));
  }
  return out;
}
}  // namespace vround

using Draws = std::array<vround::IVec, 2>;

template <typename S> struct OpMath { using type = S; };
template <> struct OpMath<c10::BFloat16> { using type = float; };
template <> struct OpMath<c10::Half> { using type = float; };

// Moves kUnit = 2 * Vectorized<opmath>::size() elements of type S between
// memory and two opmath vectors; n < kUnit handles a tensor's tail.
template <typename S>
struct VecIO {
  using O = typename OpMath<S>::type;
  using OVec = Vectorized<O>;
  static constexpr int64_t kWidth = OVec::size();
  static constexpr int64_t kUnit = 2 * kWidth;

  static inline void load(const S* p, int64_t n, OVec& a, OVec& b) {
    if constexpr (std::is_same_v<S, O>) {
      if (n >= kUnit) {
        a = OVec::loadu(p);
        b = OVec::loadu(p + kWidth);
      } else {
        a = OVec::loadu(p, std::min(n, kWidth));
        b = n > kWidth ? OVec::loadu(p + kWidth, n - kWidth) : OVec(O(0));
      }
    } else {
      auto lp = n >= kUnit ? Vectorized<S>::loadu(p) : Vectorized<S>::loadu(p, n);
      std::tie(a, b) = at::vec::convert_to_float<S>(lp);
    }
  }

  // Asks for the unit kPrefetchBytes ahead of p to be brought into L2. The
  // hardware prefetchers alone keep too few lines in flight for the 3-7
  // streams of an optimizer step on one core. Measured on a 2-core Xeon
  // (AVX-512), ResNet-50 shapes out of cache: 3% (Adam) to 6% (SGD) faster;
  // 2-6 KiB ahead all gain, into L2 or L1 alike. Prefetches never fault, so
  // running past a tensor's end is harmless.
  static constexpr int64_t kPrefetchBytes = 4096;
  // A tail (n < kUnit) ends its tensor: nothing of it lies ahead, and for the
  // many one-element tensors of a small model the prefetches only cost TLB walks.
  static inline void prefetch(const S* p, int64_t n) {
    if (n < kUnit) return;
    const char* c = reinterpret_cast<const char*>(p) + kPrefetchBytes;
    for (int64_t b = 0; b < kUnit * int64_t(sizeof(S)); b += 64) __builtin_prefetch(c + b, 0, 2);
  }

  // NOTE [weight averaging lerp]: avg[0, n) <- avg + c (w - avg), w given as two vectors.
  static inline void lerp_average(S* avg, int64_t n, const OVec& w0, const OVec& w1, O coef) {
    OVec a0, a1;
    load(avg, n, a0, a1);
    average_update(a0, w0, coef);
    average_update(a1, w1, coef);
    store(avg, n, a0, a1);
  }

  // NOTE [stochastic rounding]: stores a unit of a 16-bit S rounded
  // stochastically with the random bits of `draws` (shift 0: their low half,
  // 16: their high half); a wider S is stored as store() does. bf16 is
  // packed from the rounded bits; fp16 rounded values are exact in fp16, so
  // the conversion of store() writes them as they are.
  C10_ALWAYS_INLINE static void store_rounded(S* p, int64_t n, const OVec& a, const OVec& b, const Draws& draws,
                                              int shift, bool positive_floor) {
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
      vround::store_high16(p, n, vround::round_bf16_high(a, vround::half(draws[0], shift), positive_floor),
                           vround::round_bf16_high(b, vround::half(draws[1], shift), positive_floor));
#else
      vround::store_low16(p, n, vround::round_bf16(a, vround::half(draws[0], shift), positive_floor),
                          vround::round_bf16(b, vround::half(draws[1], shift), positive_floor));
#endif
    } else if constexpr (std::is_same_v<S, c10::Half>) {
      store(p, n, vround::round_fp16(a, vround::half(draws[0], shift), positive_floor),
            vround::round_fp16(b, vround::half(draws[1], shift), positive_floor));
    } else {
      store(p, n, a, b);
    }
  }

  static inline void store(S* p, int64_t n, const OVec& a, const OVec& b) {
    if constexpr (std::is_same_v<S, O>) {
      if (n >= kUnit) {
        a.store(p);
        b.store(p + kWidth);
      } else {
        a.store(p, std::min(n, kWidth));
        if (n > kWidth) b.store(p + kWidth, n - kWidth);
      }
    } else {
      auto lp = at::vec::convert_from_float<S>(a, b);
      if (n >= kUnit) lp.store(p); else lp.store(p, n);
    }
  }
};

// word0 of the random bits of the 2 * Vectorized<float>::size() elements of
// a unit starting at element e of a tensor (NOTE [stochastic rounding]).
C10_ALWAYS_INLINE Draws draw_unit(uint32_t tensor_key, int64_t e) {
  constexpr int64_t kW = vround::IVec::size();
  return {vround::draw(tensor_key, e), vround::draw(tensor_key, e + kW)};
}

// The next word: each lane times rounding::kWordMul.
C10_ALWAYS_INLINE Draws next_word(const Draws& d) { return {vround::next_word(d[0]), vround::next_word(d[1])}; }

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

// One parallel region over all tensors, split by element count: each thread
// takes one contiguous run of units of the flattened tensor list and calls fn
// on the (tensor, begin, end) pieces of its run. Splitting by element count,
// not by tensor or by per-tensor chunk, matters: ResNet-50's small tensors
// sit in its first half, so a split by chunk count gave one core 60% of the
// elements, and a memory-bound step then runs at the speed of that core.
template <typename F>
void run_chunks(const std::vector<int64_t>& numels, const F& fn) {
  const int64_t n = static_cast<int64_t>(numels.size());
  std::vector<int64_t> unit_end(n);  // prefix sums of units per tensor
  int64_t units = 0, total = 0;
  for (int64_t t = 0; t < n; ++t) {
    units += (numels[t] + kUnitElems - 1) / kUnitElems;
    unit_end[t] = units;
    total += numels[t];
  }
  auto run = [&](int64_t lo, int64_t hi) {  // units [lo, hi)
    int64_t t = std::upper_bound(unit_end.begin(), unit_end.end(), lo) - unit_end.begin();
    for (; t < n && lo < hi; ++t) {
      const int64_t first = t == 0 ? 0 : unit_end[t - 1];
      const int64_t stop = std::min(hi, unit_end[t]);
      if (stop > lo) fn(Chunk{t, (lo - first) * kUnitElems, std::min(numels[t], (stop - first) * kUnitElems)});
      lo = stop;
    }
  };
  if (total < kSerialElems && n < kParallelTensors) return run(0, units);
  // Threads take fixed-size blocks of units from a shared counter, so a core
  // that finishes early (small tensors restart the prefetchers more often)
  // helps with the rest; blocks go out in order, so the cores stream
  // neighbouring memory.
  const int64_t blocks = (units + kBlockUnits - 1) / kBlockUnits;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), blocks), 1, [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks;) {
      run(b * kBlockUnits, std::min(units, (b + 1) * kBlockUnits));
    }
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
// spare, so the gather asks for all of them at once (tensor_table.h).
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

template <typename T> struct Tag { using type = T; };

// The (param dtype, state dtype) pairs the kernels are instantiated for
// (docs/precision.md): state in the param's dtype; fp32 state for bf16/fp16
// params (with or without master weights); bf16 state for fp32/fp16 params.
template <typename F>
void dispatch_dtypes(at::ScalarType p, at::ScalarType s, const char* op, const F& f) {
  using ST = at::ScalarType;
  using BF = c10::BFloat16;
  if (p == ST::Float && s == ST::Float) return f(Tag<float>{}, Tag<float>{});
  if (p == ST::Double && s == ST::Double) return f(Tag<double>{}, Tag<double>{});
  if (p == ST::BFloat16 && s == ST::BFloat16) return f(Tag<BF>{}, Tag<BF>{});
  if (p == ST::Half && s == ST::Half) return f(Tag<c10::Half>{}, Tag<c10::Half>{});
  if (p == ST::BFloat16 && s == ST::Float) return f(Tag<BF>{}, Tag<float>{});
  if (p == ST::Half && s == ST::Float) return f(Tag<c10::Half>{}, Tag<float>{});
  if (p == ST::Float && s == ST::BFloat16) return f(Tag<float>{}, Tag<BF>{});
  if (p == ST::Half && s == ST::BFloat16) return f(Tag<c10::Half>{}, Tag<BF>{});
  TORCH_CHECK_TYPE(false, op, ": unsupported parameter dtype ", p, " with state dtype ", s,
                   " (supported: float32, float64, bfloat16, float16 with state of their own dtype, fp32 state "
                   "for the 16-bit types, bf16 state for float32 and float16)");
}

// The compile-time value of a dispatch_bool flag (decay: lambdas may see it by reference).
template <typename B>
constexpr bool kOn = std::decay_t<B>::value;

// The running average's element type: fp32 for 16-bit params with a master
// copy or stochastic rounding, else the param's (docs/precision.md).
template <typename P, bool MASTER, bool SR>
using AverageT = std::conditional_t<MASTER || SR, typename OpMath<P>::type, P>;

// f(master, stochastic rounding) as compile-time flags, instantiated only
// where they mean something: a master copy for 16-bit params with fp32
// state, rounding where a 16-bit tensor is written (docs/precision.md).
template <typename P, typename S, typename F>
void dispatch_precision(bool master, bool sr, const F& f) {
  using O = typename OpMath<S>::type;
  constexpr bool kCanMaster = !std::is_same_v<P, O> && std::is_same_v<S, O>;
  constexpr bool kCanRound = !std::is_same_v<P, O> || !std::is_same_v<S, O>;
  TORCH_CHECK(!(master && sr), "master weights and stochastic rounding exclude each other");
  TORCH_CHECK(!master || kCanMaster, "master weights need 16-bit params with fp32 state");
  if constexpr (kCanMaster) {
    if (master) return f(std::true_type{}, std::false_type{});
  }
  if constexpr (kCanRound) {
    if (sr) return f(std::false_type{}, std::true_type{});
  }
  f(std::false_type{}, std::false_type{});
}

template <typename F>
void dispatch_bool(bool b, const F& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

// Inline loops, not IntArrayRef::equals: that calls memcmp, which was a
// tenth of a small step's host time.
inline bool same_ints(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}


// Most per-param state lists a tensor table holds (Adam: exp_avg, exp_avg_sq,
// max_exp_avg_sq, master, running average).
constexpr int kMaxSlots = 5;

// One parameter's memory for one step, as the kernels see it: flat runs of
// `numel` elements in the same order for all of them (NOTE [tensor table] in
// tensor_table.h). Raw pointers, not tensors: copying tensor handles costs
// atomics (and a vector, a malloc) per parameter, which was most of the host
// overhead of a step (docs/performance.md: <= 20 us for 161 tiny tensors).
struct Gathered {
  Gathered() {}               // left uninitialised: TensorTable::gather fills every row it keeps
  int64_t index;              // position in the plan
  int64_t numel;
  void* param;                // the param as written by the kernel
  const void* grad;
  void* slots[kMaxSlots];     // state lists in the table's order (nullptr where unused)
};

// What a step must keep alive and copy back: tensors whose layouts differ
// (e.g. a channels-last param with a contiguous grad) go through contiguous
// temporaries.
struct Scratch {
  std::vector<at::Tensor> keep;                              // temporaries read by the kernel
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (destination, temporary)

  void* writable(const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    void* ptr = c.mutable_data_ptr();
    if (!c.is_same(t)) writeback.emplace_back(t, std::move(c));
    return ptr;
  }
  const void* readable(const at::Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().const_data_ptr();
  }
  void apply() {
    c10::AutoGradMode no_grad(false);  // dst may be a leaf param that requires grad
    for (auto& [dst, tmp] : writeback) dst.copy_(tmp);
  }
};

// The checks every backend makes of a grad, and of a state tensor, against its
// param (the CPU plans and the device tables add their own device checks).
inline void check_grad_like_param(const char* op, const at::Tensor& param, const at::Tensor& grad) {
  TORCH_CHECK(!grad.is_sparse(), op,
              " does not support sparse gradients; use torch.optim.SparseAdam or a dense gradient");
  TORCH_CHECK_TYPE(grad.scalar_type() == param.scalar_type(), op, ": gradient dtype ",
                   grad.scalar_type(), " differs from parameter dtype ", param.scalar_type());
  TORCH_CHECK(same_ints(grad.sizes(), param.sizes()), op, ": gradient shape ", grad.sizes(),
              " differs from parameter shape ", param.sizes());
}

inline void check_state_like_param(const char* op, const char* what, const at::Tensor& state,
                                   const at::Tensor& param, at::ScalarType state_dtype) {
  TORCH_CHECK_TYPE(state.scalar_type() == state_dtype, op, ": ", what, " dtype ", state.scalar_type(),
                   " differs from the expected ", state_dtype);
  TORCH_CHECK(same_ints(state.sizes(), param.sizes()), op, ": ", what, " shape ", state.sizes(),
              " differs from parameter shape ", param.sizes());
}

// found_inf / grad_scale follow torch's fused optimizers (GradScaler sets them).
inline bool found_inf_set(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0;
}

inline double inv_grad_scale(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return 1.0;
  return 1.0 / grad_scale->item<double>();
}

// Optimizer step counts live in 0-dim float32 (or float64) CPU tensors, one
// per param (torch's state_dict layout). Checked once, when the plan is built
// (NOTE [plan cache]), so a step never fails halfway through counting.
class StepCounter {
 public:
  explicit StepCounter(const at::Tensor& step) : dbl_(step.scalar_type() == at::kDouble) {
    TORCH_CHECK_TYPE(dbl_ || step.scalar_type() == at::kFloat,
                     "optimizer step must be a float32 or float64 tensor, got ", step.scalar_type());
    TORCH_CHECK(step.device().is_cpu() && step.numel() == 1,
                "optimizer step must be a one-element CPU tensor on the cpu backend");
    ptr_ = step.mutable_data_ptr();
  }
  double bump() const { return dbl_ ? ++*static_cast<double*>(ptr_) : ++*static_cast<float*>(ptr_); }
  const void* address() const { return ptr_; }

 private:
  void* ptr_;
  bool dbl_;
};

}  // namespace cpu
}  // namespace fasttricks
