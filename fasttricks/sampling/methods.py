"""The averaging methods of docs/sampling.md (Tripathi & Shah; SWA).

Every method updates w_hat <- w_hat + c_t (w - w_hat); they differ only in
which steps sample, the coefficient c_t, and what happens at epoch end.
b = steps_per_epoch, i = step in the epoch (1-based), j = samples so far in
the current averaging window.
"""
from __future__ import annotations

import math

import torch

from fasttricks._checks import check_int
from fasttricks.sampling._base import WeightSampler, _check_fraction

__all__ = ["PSWA", "PWALKS", "PSWM", "SWA", "EMA", "BachEpoch", "BachBatch"]


class _Configured(WeightSampler):
    """Saves its hyper-parameters with the state and refuses to resume a run
    made with others (the resumed run would not be the same run)."""

    def _config(self) -> dict:
        return {}

    def _extra_state(self) -> dict:
        return {"config": self._config()}

    def _check_extra_state(self, state: dict) -> None:
        saved = state.get("config", {})
        if saved != self._config():
            raise ValueError(f"{type(self).__name__}.load_state_dict: saved with {saved}, "
                             f"this sampler has {self._config()}")

    def _load_extra_state(self, state: dict) -> None:
        self._start_epoch()


class _Periodic(_Configured):
    """Reassign params <- w_hat at every epoch end, then restart the window."""

    def _epoch_end_action(self):
        return True, True


class PSWA(_Periodic):
    """Periodically Sampled Weight Averaging (Tripathi & Shah, eq. 4).

    Each epoch, n = max(1, ceil(alpha * b)) steps are sampled, one drawn at
    random inside each of n equal strides of the epoch; the average is their
    running mean (c = 1/j for the j-th sample). At `end_epoch()` the params
    are replaced by the average (BN recalibrated when a loader is given) and
    the average restarts. alpha = 1 samples every step.
    """

    def __init__(self, optimizer, steps_per_epoch: int, alpha: float = 1.0, seed: int = 0, *, fused=None,
                 name=None, model=None):
        self.alpha = _check_fraction("alpha", alpha)
        self.seed = int(seed)
        super().__init__(optimizer, steps_per_epoch, fused=fused, name=name, model=model)
        self._start_epoch()

    def _config(self):
        return {"steps_per_epoch": self.steps_per_epoch, "alpha": self.alpha, "seed": self.seed}

    def _start_epoch(self):
        self.schedule = frozenset(stride_schedule(self.steps_per_epoch, self.alpha, self.seed, self.epoch))

    def _samples_step(self):
        return self.step_in_epoch in self.schedule

    def _sample_coef(self):
        return 1.0 / (self.samples + 1)


class PWALKS(_Periodic):
    """Periodic Weight Averaging over the Last K Samples (Tripathi & Shah, eq. 5).

    Samples every step with i > b (1 - k), i.e. the last max(1, ceil(k b))
    steps of the epoch, and keeps their running mean (c = 1/j); epoch end as
    PSWA. k = 0 samples the last batch only, which is plain training; k = 1
    is PSWA with alpha = 1.
    """

    def __init__(self, optimizer, steps_per_epoch: int, k: float = 0.05, *, fused=None, name=None, model=None):
        self.k = _check_fraction("k", k, low_open=False)
        super().__init__(optimizer, steps_per_epoch, fused=fused, name=name, model=model)
        self._first_sampled = steps_per_epoch - max(1, math.ceil(self.k * steps_per_epoch - 1e-9 * steps_per_epoch))

    def _config(self):
        return {"steps_per_epoch": self.steps_per_epoch, "k": self.k}

    def _samples_step(self):
        return self.step_in_epoch > self._first_sampled

    def _sample_coef(self):
        return 1.0 / (self.samples + 1)


class PSWM(PSWA):
    """Periodically Sampled Weight Momentum (Tripathi & Shah, eq. 6, as intended).

    Samples on PSWA's schedule (alpha, seed), but keeps an exponential
    running weight: the first sample of the epoch copies the weights (c = 1),
    later ones do w_hat <- (1 - m) w_hat + m w (c = m); epoch end as PSWA.

    Tripathi & Shah's printed eq. 6 is degenerate (with m = 1 it yields w / i, not
    plain SGD as its text says). This implements the stated intent instead:
    m = 1 with alpha = 1 reproduces plain training exactly.
    """

    def __init__(self, optimizer, steps_per_epoch: int, m: float = 0.5, alpha: float = 1.0, seed: int = 0, *,
                 fused=None, name=None, model=None):
        self.m = _check_fraction("m", m)
        super().__init__(optimizer, steps_per_epoch, alpha=alpha, seed=seed, fused=fused, name=name, model=model)

    def _config(self):
        return {**super()._config(), "m": self.m}

    def _sample_coef(self):
        return 1.0 if self.samples == 0 else self.m


class SWA(_Configured):
    """Stochastic Weight Averaging (Izmailov et al.; a baseline of Tripathi & Shah).

    From epoch `start_epoch` (0-based) on, samples once per epoch (its last
    step, b) or, with `every_step=True`, every step, and keeps the running
    mean of all samples since then (c = 1/j, never reset), as
    torch.optim.swa_utils.AveragedModel does. The params are left alone until
    you call `assign()` at the end of training; `reassign_every_epoch=True`
    is Tripathi & Shah's baseline variant that copies the mean into the params at
    every epoch end.
    """

    _ONCE_PER_EPOCH = True

    def __init__(self, optimizer, steps_per_epoch: int, start_epoch: int = 0, *, every_step: bool = False,
                 reassign_every_epoch: bool = False, fused=None, name=None, model=None):
        self.start_epoch = check_int("start_epoch", start_epoch, 0)
        self.every_step = bool(every_step)
        self.reassign_every_epoch = bool(reassign_every_epoch)
        self._ONCE_PER_EPOCH = not self.every_step
        super().__init__(optimizer, steps_per_epoch, fused=fused, name=name, model=model)

    def _config(self):
        return {"steps_per_epoch": self.steps_per_epoch, "start_epoch": self.start_epoch,
                "every_step": self.every_step, "reassign_every_epoch": self.reassign_every_epoch}

    def _epoch_eligible(self):
        return self.epoch >= self.start_epoch

    def _samples_step(self):
        return self._epoch_eligible() and (self.every_step or self.step_in_epoch == self.steps_per_epoch)

    def _sample_coef(self):
        return 1.0 / (self.samples + 1)

    def _epoch_end_action(self):
        return self.reassign_every_epoch and self._epoch_eligible(), False


class _Bach(_Configured):
    """Linearly weighted averaging (Lacoste-Julien, Schmidt and Bach 2012),
    Tripathi & Shah's baselines: the t-th sample gets c = 2/(t+1), so w_hat is the
    average of the samples weighted by t. Never reset; the params are
    reassigned at every epoch end."""

    def __init__(self, optimizer, steps_per_epoch: int, *, fused=None, name=None, model=None):
        super().__init__(optimizer, steps_per_epoch, fused=fused, name=name, model=model)

    def _config(self):
        return {"steps_per_epoch": self.steps_per_epoch}

    def _sample_coef(self):
        return 2.0 / (self.total_samples + 2)

    def _epoch_end_action(self):
        return True, False


class BachEpoch(_Bach):
    __doc__ = _Bach.__doc__ + "\n    BachEpoch samples once per epoch (its last step)."
    _ONCE_PER_EPOCH = True

    def _samples_step(self):
        return self.step_in_epoch == self.steps_per_epoch


class BachBatch(_Bach):
    __doc__ = _Bach.__doc__ + "\n    BachBatch samples every step."

    def _samples_step(self):
        return True


class EMA(_Configured):
    """Exponential moving average of the weights (as timm's ModelEma and
    torch's `AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay))`).

    Samples every `every` optimizer steps with c = 1 - d: the first update
    copies the weights (as AveragedModel does), then d = `decay`. With
    `warmup=True`, d_t = min(decay, (1 + t) / (10 + t)) for the t-th update
    (t from 0), as TensorFlow's and timm's EMA warm-up. Never reassigned:
    evaluate inside `averaged_parameters()` or `copy_to()` a model copy.
    `steps_per_epoch` is optional and only used for epoch counting.
    """

    _NEEDS_STEPS_PER_EPOCH = False

    def __init__(self, optimizer, decay: float = 0.999, *, every: int = 1, warmup: bool = False,
                 steps_per_epoch: int | None = None, fused=None, name=None, model=None):
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        check_int("every", every, 1)
        self.decay, self.every, self.warmup = decay, every, bool(warmup)
        super().__init__(optimizer, steps_per_epoch, fused=fused, name=name, model=model)

    def _config(self):
        return {"decay": self.decay, "every": self.every, "warmup": self.warmup}

    def _samples_step(self):
        return self.total_steps % self.every == 0

    def _sample_coef(self):
        t = self.total_samples
        if self.warmup:
            return 1.0 - min(self.decay, (1.0 + t) / (10.0 + t))
        return 1.0 if t == 0 else 1.0 - self.decay


def stride_schedule(steps_per_epoch: int, alpha: float, seed: int, epoch: int) -> list[int]:
    """PSWA's sampled steps (1-based, sorted): n = max(1, ceil(alpha*b)) equal
    strides of the epoch, one step drawn uniformly inside each. Depends only on
    (seed, epoch), so every rank and every resumed run draws the same."""
    b = steps_per_epoch
    n = max(1, math.ceil(alpha * b - 1e-9 * b))
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    out = []
    for s in range(n):
        lo, hi = s * b // n + 1, (s + 1) * b // n
        out.append(lo + int(torch.randint(hi - lo + 1, (1,), generator=gen)))
    return out


__all__ = ["WeightSampler", "stride_schedule"]
