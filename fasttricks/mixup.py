"""Mixup and CutMix with factored targets (docs/tricks.md; Bag of Tricks, section 5.4).

    mixer = Mixup(mixup_alpha=0.2, num_classes=10, label_smoothing=0.1)
    x, target = mixer(x, y)                # x blended (in place with flip pairing)
    loss = soft_target_cross_entropy(model(x), target)

`target` is a MixedTarget: (y_a, y_b, lam, smoothing, num_classes), never a
B x C matrix; `target.dense()` builds the matrix when you need one, and any
torch operation on it (timm's SoftTargetCrossEntropy computes
`-target * log_softmax(x)`) gets the matrix. Mixup takes timm's keywords and
defaults (`timm.data.Mixup`), so a timm training loop switches by changing
its import; `target="dense"` returns timm's B x C tensor itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fasttricks import _backends
from fasttricks._checks import check_int, check_values_in
from fasttricks.ops.mixup import mixup_blend

__all__ = ["Mixup", "MixedTarget", "mixup", "smoothing_coefficients"]

TARGET_FORMS = ("factored", "dense")

# "001" is the first name of "bag_of_tricks", kept for existing code.
SMOOTHING_MODES = ("torch", "bag_of_tricks", "001")


def smoothing_coefficients(smoothing: float, num_classes: int, mode: str = "torch") -> tuple[float, float]:
    """(on, off) with target = on * label_mix + off: torch's convention gives
    (1-eps) on the label plus eps/K everywhere; the Bag of Tricks paper's
    ("bag_of_tricks") gives 1-eps on the label and eps/(K-1) elsewhere."""
    if mode == "torch":
        return 1.0 - smoothing, smoothing / num_classes
    if mode in ("bag_of_tricks", "001"):
        if num_classes < 2:
            raise ValueError(f"label smoothing mode {mode!r} needs num_classes >= 2")
        off = smoothing / (num_classes - 1)
        return 1.0 - smoothing - off, off
    raise ValueError(f"smoothing mode must be one of {SMOOTHING_MODES}, got {mode!r}")


@dataclass
class MixedTarget:
    """target[i] = lam[i] * onehot(y_a[i]) + (1 - lam[i]) * onehot(y_b[i]),
    then label-smoothed: on * target + off (see smoothing_coefficients)."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: torch.Tensor          # float32 [B]
    num_classes: int
    smoothing: float = 0.0
    smoothing_mode: str = "torch"

    def __post_init__(self):
        if self.y_a.shape != self.y_b.shape or self.y_a.dim() != 1:
            raise ValueError("MixedTarget: y_a and y_b must be 1-D tensors of one shape")
        if self.lam.shape != self.y_a.shape:
            raise ValueError("MixedTarget: one lam per sample")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.smoothing}")
        smoothing_coefficients(self.smoothing, self.num_classes, self.smoothing_mode)

    @property
    def coefficients(self) -> tuple[float, float]:
        return smoothing_coefficients(self.smoothing, self.num_classes, self.smoothing_mode)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The B x C target matrix."""
        on, off = self.coefficients
        B = self.y_a.shape[0]
        t = torch.zeros(B, self.num_classes, dtype=dtype, device=self.y_a.device)
        lam = self.lam.to(device=t.device, dtype=dtype)
        t.scatter_add_(1, self.y_a.view(-1, 1), (lam * on).view(-1, 1))
        t.scatter_add_(1, self.y_b.view(-1, 1), ((1 - lam) * on).view(-1, 1))
        return t.add_(off)

    def to(self, *args, **kwargs):
        """`.to(device)` keeps the target factored; a dtype gets the dense matrix in it."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            return self.dense(dtype).to(device=device, non_blocking=non_blocking)
        move = lambda t: t.to(device, non_blocking=non_blocking) if device is not None else t  # noqa: E731
        return MixedTarget(move(self.y_a), move(self.y_b), move(self.lam), self.num_classes, self.smoothing,
                           self.smoothing_mode)

    # ---- the dense matrix on demand: code written for a B x C target tensor ----
    # (timm's SoftTargetCrossEntropy: torch.sum(-target * log_softmax(x), -1))
    # works unchanged; our own soft_target_cross_entropy reads the factors.

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.y_a.shape[0], self.num_classes))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    ndim = property(dim)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.y_a.device

    def __len__(self) -> int:
        return self.y_a.shape[0]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        densify = lambda a: a.dense() if isinstance(a, MixedTarget) else a  # noqa: E731
        args = torch.utils._pytree.tree_map(densify, args)
        kwargs = torch.utils._pytree.tree_map(densify, kwargs or {})
        return func(*args, **kwargs)

    def __getattr__(self, name):
        # Tensor methods (argmax, float, sum, ...) act on the dense matrix.
        if name.startswith("__") or name in ("y_a", "y_b", "lam", "num_classes", "smoothing", "smoothing_mode") \
                or not hasattr(torch.Tensor, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.dense(), name)

    def __neg__(self):
        return -self.dense()

    def __mul__(self, other):
        return self.dense() * other

    def __rmul__(self, other):
        return other * self.dense()

    def __add__(self, other):
        return self.dense() + other

    def __radd__(self, other):
        return other + self.dense()

    def __sub__(self, other):
        return self.dense() - other

    def __rsub__(self, other):
        return other - self.dense()

    def __truediv__(self, other):
        return self.dense() / other


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor drawn on the host, on `device` without a host sync: through
    pinned memory and a non-blocking copy (the draws of every batch)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)  # itself when already there


def _check_labels(y: torch.Tensor, num_classes: int, batch: int) -> None:
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"mixup: labels must have shape ({batch},), got {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"mixup: labels must be integer class indices, got {y.dtype}")
    check_values_in(y, 0, num_classes - 1, IndexError, f"mixup: labels must be in [0, {num_classes})")


def mixup(x: torch.Tensor, lam, perm: torch.Tensor | None = None, *, inplace: bool = False,
          backend: str = "auto") -> torch.Tensor:
    """The blend alone: x_mix = lam * x + (1 - lam) * x[perm] (perm=None: flip
    pairing, row i with row B-1-i, which may run in place). `lam` is a float
    or a tensor with one value per sample."""
    B = x.shape[0] if x.dim() else 0
    lam = torch.as_tensor(lam, dtype=torch.float32)
    if lam.dim() == 0:
        lam = lam.expand(B).contiguous()
    check_values_in(lam, 0.0, 1.0, ValueError, "mixup: lam must lie in [0, 1]")
    return mixup_blend(x, lam, perm, inplace=inplace, backend=backend)


class Mixup:
    """Mixup / CutMix on batches, with factored targets; timm's keywords and
    defaults (`timm.data.Mixup`: the same draws, pairing and targets).

    Args:
        mixup_alpha: mixup's Beta(alpha, alpha); 0 switches mixup off.
        cutmix_alpha: CutMix's Beta(cutmix_alpha, cutmix_alpha); 0 = off.
        cutmix_minmax: (min, max) box side ratios: CutMix boxes of uniformly
            drawn sides instead of from lam (switches CutMix on, as timm).
        prob: probability of mixing a batch (per sample in "elem"/"pair").
        switch_prob: with both on, the probability of CutMix instead of mixup.
        mode: "batch" (one lam per batch), "pair" (one per flip pair), "elem"
            (one per sample).
        correct_lam: CutMix's lam is recomputed from the clipped box area.
        label_smoothing: eps in [0, 1), applied to the mixed target.
        num_classes: number of classes of the labels.
    Keyword-only (ours):
        alpha: the name of mixup_alpha in earlier versions.
        pairing: "flip" (row i with B-1-i, in place, as timm) or "random" (a
            random permutation, out of place).
        smoothing_mode: "torch" (timm's) or "bag_of_tricks" (see smoothing_coefficients).
        target: "factored" (a MixedTarget: the fast path of
            soft_target_cross_entropy, and a B x C tensor to any torch op) or
            "dense" (timm's B x C float32 tensor).
        backend: blend backend ("auto" | "reference" | "cpu" | "triton" | "cuda").
        seed: seeds the sampler's own generator (lam, boxes, permutations).

    `mixup_enabled = False` (timm's switch, set by training loops for the last
    epochs) stops mixing: lam = 1, the targets stay label-smoothed. Any batch
    size works: with flip pairing the middle row of an odd batch pairs with
    itself and stays unmixed (its target is its own label).
    """

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, cutmix_minmax=None, prob: float = 1.0,
                 switch_prob: float = 0.5, mode: str = "batch", correct_lam: bool = True,
                 label_smoothing: float = 0.1, num_classes: int = 1000, *, alpha: float | None = None,
                 pairing: str = "flip", smoothing_mode: str = "torch", target: str = "factored",
                 backend: str = "auto", seed: int | None = None):
        if alpha is not None:
            mixup_alpha = alpha
        if cutmix_minmax is not None:
            cutmix_minmax = tuple(float(v) for v in cutmix_minmax)
            if len(cutmix_minmax) != 2 or not 0.0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1.0:
                raise ValueError(f"cutmix_minmax must be (min, max) with 0 < min < max <= 1, got {cutmix_minmax}")
            cutmix_alpha = 1.0  # as timm: the boxes come from minmax, lam from their area
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax")
        check_int("num_classes", num_classes, 1)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mode must be 'batch', 'pair' or 'elem', got {mode!r}")
        if pairing not in ("flip", "random"):
            raise ValueError(f"pairing must be 'flip' or 'random', got {pairing!r}")
        if target not in TARGET_FORMS:
            raise ValueError(f"target must be one of {TARGET_FORMS}, got {target!r}")
        if not 0.0 <= switch_prob <= 1.0 or not 0.0 <= prob <= 1.0:
            raise ValueError("switch_prob and prob must be in [0, 1]")
        smoothing_coefficients(label_smoothing, num_classes, smoothing_mode)
        _backends.check_backend_name(backend)
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_minmax = float(mixup_alpha), float(cutmix_alpha), \
            cutmix_minmax
        self.num_classes, self.label_smoothing, self.smoothing_mode = num_classes, float(label_smoothing), \
            smoothing_mode
        self.mode, self.switch_prob, self.mix_prob, self.pairing = mode, float(switch_prob), float(prob), pairing
        self.correct_lam, self.backend, self.target = bool(correct_lam), backend, target
        self.mixup_enabled = True
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.initial_seed()) % (2**63))

    # Earlier names of timm's attributes.
    alpha = property(lambda self: self.mixup_alpha)
    prob = property(lambda self: self.mix_prob)

    # ---- draws -----------------------------------------------------------------

    def _beta(self, a: float, n: int) -> torch.Tensor:
        if n == 0:
            return torch.zeros(0, dtype=torch.float64)
        # Beta(a, a) from two Gammas, on the sampler's own generator.
        conc = torch.full((n,), a, dtype=torch.float64)
        ga = torch._standard_gamma(conc, generator=self.generator)
        gb = torch._standard_gamma(conc, generator=self.generator)
        return ga / (ga + gb)

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, dtype=torch.float64, generator=self.generator)

    def _draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lam [n], use_cutmix [n] bool) for n draws; lam = 1 where not mixed."""
        use_cutmix = torch.zeros(n, dtype=torch.bool)
        if not self.mixup_enabled:
            return torch.ones(n, dtype=torch.float64), use_cutmix
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = self._uniform(n) < self.switch_prob
        elif self.cutmix_alpha > 0:
            use_cutmix = torch.ones(n, dtype=torch.bool)
        lam = torch.where(use_cutmix, self._beta(self.cutmix_alpha or 1.0, n),
                          self._beta(self.mixup_alpha or 1.0, n))
        apply = self._uniform(n) < self.mix_prob
        return torch.where(apply, lam, torch.ones_like(lam)), use_cutmix & apply

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, max(high, low + 1), (1,), generator=self.generator))

    def _box(self, lam: float, h: int, w: int) -> tuple[int, int, int, int]:
        """A box of area ~ (1 - lam) h w with a uniformly drawn centre, clipped;
        with cutmix_minmax, sides drawn in [min, max) of the image's, placed inside it."""
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            ch, cw = self._randint(int(h * lo), int(h * hi)), self._randint(int(w * lo), int(w * hi))
            y0, x0 = self._randint(0, h - ch), self._randint(0, w - cw)
            return y0, y0 + ch, x0, x0 + cw
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (1,), generator=self.generator))
        cx = int(torch.randint(w, (1,), generator=self.generator))
        return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)

    # ---- mixing ------------------------------------------------------------------

    @torch.no_grad()
    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, MixedTarget]:
        """Blend a batch and return (x_mixed, MixedTarget). With flip pairing
        and mixup the blend runs in place on x; CutMix pastes boxes in place."""
        if x.dim() < 2:
            raise ValueError(f"mixup: x must be a batch [B, ...], got shape {tuple(x.shape)}")
        B = x.shape[0]
        _check_labels(y, self.num_classes, B)
        y = y.long()
        perm = None if self.pairing == "flip" else torch.randperm(B, generator=self.generator)
        partner = torch.arange(B - 1, -1, -1) if perm is None else perm
        if self.mode == "batch":
            lam, cut = self._draw(1)
            lam, cut = lam.expand(B).clone(), cut.expand(B).clone()
        elif self.mode == "pair":
            half = (B + 1) // 2
            lam_h, cut_h = self._draw(half)
            idx = torch.minimum(torch.arange(B), torch.arange(B - 1, -1, -1))
            lam, cut = lam_h[idx], cut_h[idx]
        else:
            lam, cut = self._draw(B)
        if perm is None and B % 2 == 1:  # the middle row of an odd flip batch pairs with itself
            lam[B // 2], cut[B // 2] = 1.0, False
        if cut.any():
            if x.dim() < 3:
                raise ValueError("CutMix needs image batches [B, C, H, W] (or [B, H, W])")
            lam = self._cutmix(x, lam, cut, partner)
        blend_lam = torch.where(cut, torch.ones_like(lam), lam).float()
        # The draws were made on the host (lam, cut, partners: CPU tensors, so the
        # tests on them never sync); they reach the device without a sync.
        if bool((blend_lam < 1).any()):
            if perm is None:
                x = mixup_blend(x, _to_device(blend_lam, x.device), None, inplace=True, backend=self.backend)
            else:
                x = mixup_blend(x, _to_device(blend_lam, x.device), _to_device(perm, x.device), backend=self.backend)
        target = MixedTarget(y, y[_to_device(partner, y.device)], _to_device(lam.float(), y.device), self.num_classes,
                             self.label_smoothing, self.smoothing_mode)
        return x, (target.dense() if self.target == "dense" else target)

    def __call__(self, x, y):
        return self.mix(x, y)

    def _cutmix(self, x, lam, cut, partner):
        """Paste boxes from the partner rows (in place) and return the corrected lam."""
        h, w = x.shape[-2], x.shape[-1]
        lam = lam.clone()
        if self.mode == "batch":
            y0, y1, x0, x1 = self._box(float(lam[0]), h, w)
            # Indexing the box by the partners copies it first: safe in place.
            x[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1][_to_device(partner, x.device)]
            if self.correct_lam or self.cutmix_minmax is not None:
                lam[cut] = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        else:
            source = x.clone()  # per-sample boxes: partners must be read before any row is pasted
            for i in torch.nonzero(cut).flatten().tolist():
                y0, y1, x0, x1 = self._box(float(lam[i]), h, w)
                x[i, ..., y0:y1, x0:x1] = source[int(partner[i]), ..., y0:y1, x0:x1]
                if self.correct_lam or self.cutmix_minmax is not None:
                    lam[i] = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        return lam
