"""Learning-rate schedules as torch `LRScheduler`s (docs/tricks.md).

Each schedule is a closed form `lr_at(t, base_lr)` of the scheduler's step
count t (t = 0 before the first `.step()`), so the value does not drift
with the number of steps, a `state_dict()` round trip continues exactly, and
stepping per batch or per epoch is only a matter of which unit T counts.
Where torch has the same schedule the argument names and the values are
torch's (tested step by step against it). Tensor `lr` (capturable
optimizers) is filled in place by torch's LRScheduler.

Seed formulas (001, section 3): warmup `lr_i = i * eta / m` for batch
i = 1..m; cosine `0.5 * (1 + cos(t * pi / T)) * eta`.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from fasttricks._checks import check_int as _check_int

__all__ = ["Warmup", "StepDecay", "CosineDecay", "PolyDecay", "SGDR", "CyclicLR", "OneCycle",
           "warmup_cosine", "linear_scaling_lr"]


def _check_positive(name: str, value) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _per_group(name: str, value, optimizer) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"expected {len(optimizer.param_groups)} values for {name}, got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * len(optimizer.param_groups)


class _ClosedForm(LRScheduler):
    """Subclasses set their attributes, then call this __init__, and define lr_at."""

    def lr_at(self, t: int, base_lr: float) -> float:
        raise NotImplementedError

    def get_lr(self):
        return [self.lr_at(self.last_epoch, float(base)) for base in self.base_lrs]

    _get_closed_form_lr = get_lr


class Warmup(_ClosedForm):
    """Gradual linear warmup (Bag of Tricks): lr = base * (t + 1) / warmup_steps for
    t < warmup_steps (so batch i = t + 1 gets i * eta / m), then the schedule
    `after` (another fasttricks schedule on the same optimizer, counted from
    the end of the warmup), or the base lr when `after` is None.

    With a torch scheduler to follow, use torch's SequentialLR:
    Warmup(opt, m) is LinearLR(opt, start_factor=1/m, total_iters=m-1).
    """

    def __init__(self, optimizer, warmup_steps: int, after: _ClosedForm | None = None, last_epoch: int = -1):
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 1)
        if after is not None:
            if not isinstance(after, _ClosedForm) or isinstance(after, Warmup):
                raise TypeError("Warmup(after=...) takes a fasttricks schedule; for a torch scheduler use "
                                "torch.optim.lr_scheduler.SequentialLR")
            if after.optimizer is not optimizer:
                raise ValueError("Warmup(after=...) must schedule the same optimizer")
        self.after = after
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t, base_lr):
        if t < self.warmup_steps:
            return base_lr * (t + 1) / self.warmup_steps
        if self.after is None:
            return base_lr
        return self.after.lr_at(t - self.warmup_steps, base_lr)

    def state_dict(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "after")}
        state["after"] = None if self.after is None else self.after.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        after = state.pop("after", None)
        self.__dict__.update(state)
        if after is not None and self.after is not None:
            self.after.load_state_dict(after)


class StepDecay(_ClosedForm):
    """Step decay: lr = base * gamma ** k, k = t // step_size (torch's StepLR),
    or k = the number of `milestones` <= t (torch's MultiStepLR)."""

    def __init__(self, optimizer, step_size: int | None = None, gamma: float = 0.1, milestones=None,
                 last_epoch: int = -1):
        if (step_size is None) == (milestones is None):
            raise ValueError("StepDecay needs exactly one of step_size or milestones")
        if step_size is not None:
            _check_int("step_size", step_size, 1)
        else:
            milestones = sorted(_check_int("milestone", m, 0) for m in milestones)
        self.step_size, self.milestones = step_size, milestones
        self.gamma = _check_positive("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t, base_lr):
        k = t // self.step_size if self.step_size else sum(1 for m in self.milestones if m <= t)
        return base_lr * self.gamma ** k


class CosineDecay(_ClosedForm):
    """Cosine decay (Bag of Tricks): lr = eta_min + (base - eta_min) * (1 + cos(pi t / T_max)) / 2,
    then eta_min after T_max (torch's CosineAnnealingLR would rise again)."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):
        self.T_max = _check_int("T_max", T_max, 1)
        self.eta_min = float(eta_min)
        if self.eta_min < 0:
            raise ValueError(f"eta_min must be >= 0, got {eta_min}")
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t, base_lr):
        t = min(t, self.T_max)
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2


class PolyDecay(_ClosedForm):
    """Polynomial decay (torch's PolynomialLR): lr = base * (1 - min(t, T) / T) ** power."""

    def __init__(self, optimizer, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1):
        self.total_iters = _check_int("total_iters", total_iters, 1)
        self.power = float(power)
        if self.power < 0:
            raise ValueError(f"power must be >= 0, got {power}")
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t, base_lr):
        return base_lr * (1.0 - min(t, self.total_iters) / self.total_iters) ** self.power


class SGDR(_ClosedForm):
    """Cosine annealing with warm restarts (Loshchilov and Hutter; torch's
    CosineAnnealingWarmRestarts): the i-th period lasts T_0 * T_mult**i steps;
    lr = eta_min + (base - eta_min) * (1 + cos(pi T_cur / T_i)) / 2."""

    def __init__(self, optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0, last_epoch: int = -1):
        self.T_0 = _check_int("T_0", T_0, 1)
        self.T_mult = _check_int("T_mult", T_mult, 1)
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def period(self, t: int) -> tuple[int, int]:
        """(T_cur, T_i) at step t."""
        if self.T_mult == 1:
            return t % self.T_0, self.T_0
        length = self.T_0
        while t >= length:  # periods grow geometrically: a few iterations
            t -= length
            length *= self.T_mult
        return t, length

    def lr_at(self, t, base_lr):
        cur, length = self.period(t)
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * cur / length)) / 2


class _MomentumCycling:
    """Sets each group's momentum (SGD) or beta1 (Adam family) after every step."""

    def _init_momentum(self, optimizer, cycle_momentum, base_momentum, max_momentum):
        self.cycle_momentum = bool(cycle_momentum)
        if not self.cycle_momentum:
            return
        groups = optimizer.param_groups
        if not all("momentum" in g or "betas" in g for g in groups):
            raise ValueError("optimizer must support momentum or beta1 with cycle_momentum enabled")
        self.use_beta1 = "betas" in groups[0]
        self.base_momentums = _per_group("base_momentum", base_momentum, optimizer)
        self.max_momentums = _per_group("max_momentum", max_momentum, optimizer)
        for b, m in zip(self.base_momentums, self.max_momentums):
            if b > m:
                raise ValueError(f"base_momentum {b} must not exceed max_momentum {m}")

    def _set_momentum(self, values, optimizer=None):
        for group, m in zip((optimizer or self.optimizer).param_groups, values):
            if self.use_beta1:
                group["betas"] = (m, *group["betas"][1:])
            else:
                group["momentum"] = m


class CyclicLR(_MomentumCycling, _ClosedForm):
    """Cyclical learning rates (Smith 2015; torch's CyclicLR, same arguments
    and values): triangular, triangular2 (amplitude halves each cycle) and
    exp_range (amplitude scaled by gamma**t), with momentum (or beta1) cycled
    inversely between max_momentum and base_momentum. Sets the optimizer's lr
    to base_lr on construction."""

    def __init__(self, optimizer, base_lr, max_lr, step_size_up: int = 2000, step_size_down: int | None = None,
                 mode: str = "triangular", gamma: float = 1.0, scale_fn=None, scale_mode: str = "cycle",
                 cycle_momentum: bool = True, base_momentum=0.8, max_momentum=0.9, last_epoch: int = -1):
        base_lrs = _per_group("base_lr", base_lr, optimizer)
        self.max_lrs = _per_group("max_lr", max_lr, optimizer)
        for b, m in zip(base_lrs, self.max_lrs):
            if not 0 <= b <= m:
                raise ValueError(f"CyclicLR needs 0 <= base_lr <= max_lr, got base_lr={b}, max_lr={m}")
        up = _check_int("step_size_up", step_size_up, 1)
        down = up if step_size_down is None else _check_int("step_size_down", step_size_down, 1)
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        if mode not in ("triangular", "triangular2", "exp_range") and scale_fn is None:
            raise ValueError(f"mode must be triangular, triangular2 or exp_range, got {mode!r}")
        if scale_mode not in ("cycle", "iterations"):
            raise ValueError(f"scale_mode must be 'cycle' or 'iterations', got {scale_mode!r}")
        self.mode, self.gamma = mode, float(gamma)
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode if scale_fn is not None else ("iterations" if mode == "exp_range" else "cycle")
        self._init_momentum(optimizer, cycle_momentum, base_momentum, max_momentum)
        if last_epoch == -1:
            for group, lr in zip(optimizer.param_groups, base_lrs):
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
                group["initial_lr"] = lr
            if self.cycle_momentum:
                self._set_momentum(self.max_momentums, optimizer)
        super().__init__(optimizer, last_epoch)

    def scale_fn(self, x):
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma**x

    def _phase(self, t):
        cycle = math.floor(1 + t / self.total_size)
        x = 1.0 + t / self.total_size - cycle
        factor = x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)
        return factor, self.scale_fn(cycle if self.scale_mode == "cycle" else t)

    def get_lr(self):
        factor, scale = self._phase(self.last_epoch)
        lrs = [float(b) + (m - float(b)) * factor * scale for b, m in zip(self.base_lrs, self.max_lrs)]
        if self.cycle_momentum:
            self._set_momentum([mx - (mx - b) * factor * scale
                                for b, mx in zip(self.base_momentums, self.max_momentums)])
        return lrs

    _get_closed_form_lr = get_lr

    def state_dict(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_scale_fn_custom")}


class OneCycle(_MomentumCycling, _ClosedForm):
    """One-cycle policy / super-convergence (Smith and Topin; torch's OneCycleLR,
    same arguments and values): lr rises from max_lr/div_factor to max_lr over
    pct_start of the run and anneals to max_lr/div_factor/final_div_factor,
    with momentum (or beta1) cycled inversely. `three_phase` as torch."""

    def __init__(self, optimizer, max_lr, total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum=0.85, max_momentum=0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False, last_epoch: int = -1):
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
            total_steps = _check_int("epochs", epochs, 1) * _check_int("steps_per_epoch", steps_per_epoch, 1)
        self.total_steps = _check_int("total_steps", total_steps, 2)
        pct_start = float(pct_start)
        if not 0 <= pct_start <= 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        self.anneal_strategy = anneal_strategy
        self.max_lrs = _per_group("max_lr", max_lr, optimizer)
        div_factor, final_div_factor = _check_positive("div_factor", div_factor), \
            _check_positive("final_div_factor", final_div_factor)
        self.initial_lrs = [m / div_factor for m in self.max_lrs]
        self.min_lrs = [i / final_div_factor for i in self.initial_lrs]
        T = self.total_steps
        if three_phase:
            self.phases = [(float(pct_start * T) - 1, "initial", "max", "max_m", "base_m"),
                           (float(2 * pct_start * T) - 2, "max", "initial", "base_m", "max_m"),
                           (T - 1, "initial", "min", "max_m", "max_m")]
        else:
            self.phases = [(float(pct_start * T) - 1, "initial", "max", "max_m", "base_m"),
                           (T - 1, "max", "min", "base_m", "max_m")]
        self._init_momentum(optimizer, cycle_momentum, base_momentum, max_momentum)
        if last_epoch == -1:
            for group, lr in zip(optimizer.param_groups, self.initial_lrs):
                group["initial_lr"] = lr
            if self.cycle_momentum:
                self._set_momentum(self.max_momentums, optimizer)
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self):
        t = self.last_epoch
        if t > self.total_steps:
            raise ValueError(f"Tried to step {t} times. The specified number of total steps is {self.total_steps}")
        lrs, moms = [], []
        for g in range(len(self.optimizer.param_groups)):
            values = {"initial": self.initial_lrs[g], "max": self.max_lrs[g], "min": self.min_lrs[g]}
            if self.cycle_momentum:
                values.update(base_m=self.base_momentums[g], max_m=self.max_momentums[g])
            start_step = 0.0
            for i, (end_step, lr_a, lr_b, m_a, m_b) in enumerate(self.phases):
                if t <= end_step or i == len(self.phases) - 1:
                    pct = (t - start_step) / (end_step - start_step)
                    lrs.append(self._anneal(values[lr_a], values[lr_b], pct))
                    if self.cycle_momentum:
                        moms.append(self._anneal(values[m_a], values[m_b], pct))
                    break
                start_step = end_step
        if self.cycle_momentum:
            self._set_momentum(moms)
        return lrs

    _get_closed_form_lr = get_lr


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Warmup:
    """The Bag of Tricks recipe: linear warmup over `warmup_steps`, then cosine decay
    to `min_lr` at `total_steps` (both counted in scheduler steps)."""
    _check_int("warmup_steps", warmup_steps, 1)
    _check_int("total_steps", total_steps, 1)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be shorter than total_steps ({total_steps})")
    cosine = CosineDecay(optimizer, T_max=total_steps - warmup_steps, eta_min=min_lr)
    return Warmup(optimizer, warmup_steps, after=cosine)


def linear_scaling_lr(base_lr: float = 0.1, batch_size: int = 256, base_batch_size: int = 256) -> float:
    """The linear scaling rule (Goyal et al.; Bag of Tricks): lr = base_lr * batch_size / base_batch_size."""
    _check_positive("base_lr", base_lr)
    _check_int("batch_size", batch_size, 1)
    _check_int("base_batch_size", base_batch_size, 1)
    return base_lr * batch_size / base_batch_size
