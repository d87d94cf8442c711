"""Stochastic rounding: the reference that the C++ and Triton kernels reproduce bit for bit.

NOTE [stochastic rounding] in docs/precision.md has the rule;
csrc/include/fasttricks/rounding.h is the C++ copy.

A value x computed in fp32 is written to a bf16/fp16 tensor rounded up (away
from zero) with probability equal to the fraction of an ulp it lies above
the value below it, so that E[round(x)] = x and updates far smaller than an
ulp still move the weights on average. The 16 random bits of each rounding
come from a counter-based hash of (seed, step, param index, element index):
a run is reproducible, the same on every backend, and the same on every
data-parallel rank without communication.

Keys, all uint32 (Python ints here, int64 tensors holding uint32 values in
the reference kernels):

    step_key   = mix(mix(seed_lo ^ mix(seed_hi)) + step)          on the host, once per step
    tensor_key = mix(step_key ^ mix(param_index))                 once per tensor
    word0(e)   = mix((tensor_key ^ hi(e) * 0x85EBCA6B) + lo31(e)) per element e
    word1(e)   = word0(e) * 0x9E3779B1,  word2(e) = word1(e) * 0x9E3779B1

where mix is the "lowbias32" integer hash (two multiplies, three xor-shifts),
hi(e) = e >> 31 and lo31(e) = e & 0x7FFFFFFF, all mod 2**32. One hash per
element serves every tensor the step writes (the hash is most of the cost of
a rounding on the CPU): the param takes the low 16 bits of word0, exp_avg or
the momentum buffer its high 16 bits, exp_avg_sq the high 16 bits of word1,
max_exp_avg_sq those of word2. Multiplying by an odd constant is a bijection,
so each 16-bit number is uniform; only the high halves of word1 and word2
depend on all of word0 (their low halves would just permute the param's).
"""
from __future__ import annotations

import torch

from fasttricks.ops._plan import is_dense

__all__ = ["mix32", "step_key", "tensor_key", "random_bits", "stochastic_round", "StepBits", "LOW_BITS", "HIGH_BITS"]

MASK = 0xFFFFFFFF
M1, M2 = 0x7FEB352D, 0x846CA68B
HI_MUL = 0x85EBCA6B
WORD_MUL = 0x9E3779B1
LOW_BITS, HIGH_BITS = 0, 1  # which half of a word a tensor takes


def mix32(x):
    """lowbias32, on a Python int (the host keys) or an int64 tensor of uint32
    values (the reference kernels)."""
    x = x & MASK
    x = x ^ (x >> 16)
    x = _mul32(x, M1)
    x = x ^ (x >> 15)
    x = _mul32(x, M2)
    return x ^ (x >> 16)


def _mul32(x, c: int):
    """x * c mod 2**32, the product taken as two 16-bit halves of c, so that no
    int64 tensor product overflows (exact for Python ints too)."""
    return ((x * (c & 0xFFFF)) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK


def step_key(seed: int, step: int) -> int:
    """The key of one optimizer step (seed: any int, taken mod 2**64)."""
    seed &= (1 << 64) - 1
    return mix32((mix32((seed & MASK) ^ mix32(seed >> 32)) + step) & MASK)


def tensor_key(key: int, param_index: int) -> int:
    return mix32(key ^ mix32(param_index))


def element_index(t: torch.Tensor) -> torch.Tensor:
    """Each element's index as the kernels count it: its offset in memory when
    t is dense (any order of a contiguous layout, channels_last included),
    else its row-major position (the kernels then step a contiguous copy)."""
    if is_dense(t):
        idx = torch.empty_like(t, dtype=torch.int64)
        idx.as_strided((t.numel(),), (1,)).copy_(torch.arange(t.numel(), device=t.device))
        return idx
    return torch.arange(t.numel(), dtype=torch.int64, device=t.device).view(t.shape)


def random_bits(key: int, e: torch.Tensor, word: int) -> torch.Tensor:
    """Word `word` (0, 1, 2) of the random bits of the elements with indices
    `e` (int64) of the tensor with tensor key `key`, as an int64 tensor."""
    hi = ((e >> 31) * HI_MUL) & MASK
    bits = mix32(((key ^ hi) + (e & 0x7FFFFFFF)) & MASK)
    for _ in range(word):
        bits = _mul32(bits, WORD_MUL)
    return bits


def half_bits(bits: torch.Tensor, half: int) -> torch.Tensor:
    return (bits >> 16) if half == HIGH_BITS else (bits & 0xFFFF)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, r16: torch.Tensor, positive_floor: bool = False):
    """x (fp32) rounded to `dtype` (bf16 or fp16) with the 16-bit random
    numbers r16 (int64, x's shape), elementwise. `positive_floor`: a
    positive x never becomes 0 (exp_avg_sq: it would then divide by eps alone
    where fp32 would not); it becomes the smallest positive value of `dtype`."""
    x = x.to(torch.float32)
    if dtype == torch.bfloat16:
        # Add the random bits below bf16's last mantissa bit and truncate: a
        # carry rounds the magnitude up with probability (dropped bits) / 2**16.
        bits = x.view(torch.int32).to(torch.int64) & MASK
        up = ((bits + r16) & 0xFFFF0000) >> 16
        out16 = torch.where(torch.isnan(x), torch.full_like(up, 0x7FC0), up)  # NaN: the canonical quiet NaN
        if positive_floor:
            out16 = torch.where((x > 0) & (out16 == 0), torch.ones_like(out16), out16)
        out16 = torch.where(out16 >= 0x8000, out16 - 0x10000, out16)  # as int16
        return out16.to(torch.int16).view(torch.bfloat16)
    if dtype == torch.float16:
        # Scale x by a power of two (exact) so that one fp16 ulp at x becomes 1,
        # then round the fraction up with probability equal to it.
        bits = x.view(torch.int32).to(torch.int64) & MASK
        e = ((bits >> 23) & 0xFF) - 127
        ulp_exp = e.clamp(-14, 15) - 10
        scale = ((127 - ulp_exp) << 23).to(torch.int32).view(torch.float32)
        unscale = ((127 + ulp_exp) << 23).to(torch.int32).view(torch.float32)
        q = x * scale
        fl = torch.floor(q)
        frac = q - fl
        up = (r16.to(torch.float32) < frac * 65536.0).to(torch.float32)
        out = ((fl + up) * unscale).to(torch.float16)
        if positive_floor:
            out = torch.where((x > 0) & (out == 0), torch.full_like(out, 2.0 ** -24), out)
        return out
    raise TypeError(f"stochastic rounding writes bf16 or fp16, not {dtype}")


class StepBits:
    """The writes of one param's step: each tensor rounded with its word and
    half of the param's random bits, word0 hashed once (on the first 16-bit
    write) and the later words multiplied from it. `key` None: round to nearest."""

    def __init__(self, key: int | None, param: torch.Tensor):
        self.key, self.param = key, param
        self.words: list[torch.Tensor] = []

    def round_into_(self, dst: torch.Tensor, x: torch.Tensor, word: int, half: int,
                    positive_floor: bool = False) -> None:
        """dst.copy_(x), stochastically rounded when there is a key and dst is
        bf16/fp16; rounded to nearest otherwise."""
        if self.key is None or dst.dtype not in (torch.bfloat16, torch.float16):
            dst.copy_(x)
            return
        if not self.words:
            self.words.append(random_bits(self.key, element_index(self.param), 0))
        while len(self.words) <= word:
            self.words.append(_mul32(self.words[-1], WORD_MUL))
        r16 = half_bits(self.words[word], half)
        dst.copy_(stochastic_round(x.detach().to(torch.float32).expand_as(dst), dst.dtype, r16, positive_floor))

    def store_weights_(self, p: torch.Tensor, w: torch.Tensor, master, average, avg_coef: float) -> None:
        """The end of a reference step, in the kernels' order: the param from
        the math-precision weights `w` (rounded with the param's bits, or to
        nearest from its master), then the fused average (NOTE [weight
        averaging lerp]) toward `w`."""
        if master is None:
            self.round_into_(p, w, 0, LOW_BITS)
        else:
            p.copy_(w)
        if average is not None and avg_coef != 0:
            average.copy_(average.to(w.dtype).lerp_(w, avg_coef))
