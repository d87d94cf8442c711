"""WeightSampler: the machinery every averaging method shares.

A sampler keeps one running average `w_hat` per optimizer parameter and
counts the optimizer's steps. Before each step it decides the coefficient c
of that step (0 = this step is not sampled); the update
`w_hat <- w_hat + c (w - w_hat)` then runs

* inside the optimizer's fused kernel, in the same memory pass, when the
  optimizer is a fasttricks optimizer and no other sampler is fused into it
  (NOTE [fused weight averaging] in fasttricks/optim/_fused.py), or
* as a step post-hook (a foreach lerp) for any other torch optimizer, and for
  the second and further samplers on one fasttricks optimizer.

Counting: `step_in_epoch` (i in docs/sampling.md, 1-based) advances on every
call of the optimizer's step. Under a GradScaler an overflowing step adds no
sample: by default the scaler does not call `step()` at all (so the skipped
batch is not counted either); with the fused unscale (`fused=True`) the step
runs with found_inf set, counts, and samples nothing (NOTE [found_inf
contract]). Whether a sampling step was skipped is then read from a
non-blocking host copy of `found_inf` when the sample counts are next
needed, without a stream sync (NOTE [deferred found_inf] in
fasttricks/ops/host_flag.py); until then the averaged buffers take a
coefficient masked on the device.

The averages, counters and averaged buffers are optimizer state (NOTE
[state-resident extras] in fasttricks/optim/state_extras.py): whatever saves the
optimizer saves them, and loading it restores them (NOTE [sampler
checkpoints] in fasttricks/sampling/_checkpoint.py).

Methods (fasttricks/sampling/methods.py) override `_coefficient()` and
`_epoch_end_action()`.
"""
from __future__ import annotations

import warnings

import torch

from fasttricks._checks import check_int
from fasttricks.ops.average import average_reference_
from fasttricks.ops.host_flag import DeferredFlag
from fasttricks.ops.precision import average_dtype
from fasttricks.optim.state_extras import drop_extras, write_state
from fasttricks.sampling._averages import AveragesInUse
from fasttricks.sampling._checkpoint import SamplerCheckpoints, find_saved, sampler_key, samplers_of


def _sample_counter(name: str) -> property:
    """A sample count that first takes in a sample whose found_inf was not
    yet read (NOTE [deferred found_inf])."""
    slot = "_" + name

    def get(self) -> int:
        self._settle()
        return self.__dict__[slot]

    def set(self, value: int) -> None:
        self._settle()
        self.__dict__[slot] = value

    return property(get, set)


def _check_fraction(name: str, value, *, low_open: bool = True) -> float:
    value = float(value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return value


class WeightSampler(AveragesInUse, SamplerCheckpoints):
    """Base class; see the module docstring. `fused=None` fuses whenever it can,
    `fused=False` forces the post-hook path (`fused=True` raises when it cannot fuse).
    `name` keys the sampler's state in the optimizer's checkpoints (NOTE
    [sampler checkpoints]); the default is the class name."""

    #: counters saved by state_dict(), in addition to the averages
    _COUNTERS = ("step_in_epoch", "samples", "epoch_samples", "total_samples", "total_steps", "epoch")

    samples = _sample_counter("samples")              # j: samples in the current averaging window
    epoch_samples = _sample_counter("epoch_samples")  # samples taken in this epoch
    total_samples = _sample_counter("total_samples")  # samples since the sampler was created

    #: whether the method needs steps_per_epoch (its schedule is per epoch)
    _NEEDS_STEPS_PER_EPOCH = True

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int | None = None, *,
                 fused: bool | None = None, name: str | None = None, model: torch.nn.Module | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if steps_per_epoch is None and self._NEEDS_STEPS_PER_EPOCH:
            raise TypeError(f"{type(self).__name__} needs steps_per_epoch: the optimizer steps per epoch, "
                            "len(train_loader)")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be a torch.nn.Module, got {type(model).__name__}")
        self.optimizer = optimizer
        self.steps_per_epoch = None if steps_per_epoch is None else check_int("steps_per_epoch", steps_per_epoch, 1)
        self.params: list[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        if not self.params:
            raise ValueError(f"{type(self).__name__}: the optimizer has no parameters")
        self._index = {id(p): i for i, p in enumerate(self.params)}
        options = getattr(optimizer, "group_options", lambda g: {})
        with torch.no_grad():
            self.averages: list[torch.Tensor] = [p.detach().to(average_dtype(options(g), p.dtype), copy=True)
                                                 for g in optimizer.param_groups for p in g["params"]]
        # NOTE [averaged buffers]: with model=, its buffers are averaged too.
        self.model = model
        if model is not None:
            self._check_model(model, "model")
        self.buffer_names = [n for n, _ in model.named_buffers()] if model is not None else []
        with torch.no_grad():
            self.buffer_averages = [b.detach().clone() for _, b in model.named_buffers()] if model is not None else []
        self._warned: set[str] = set()
        self._unsettled: DeferredFlag | None = None  # found_inf of a sample not yet counted
        self.step_in_epoch = 0   # i: optimizer steps in this epoch
        self.samples = self.epoch_samples = self.total_samples = 0
        self.total_steps = 0
        self.epoch = 0
        self._handles = []
        self.fused = False
        if fused is not False and hasattr(optimizer, "attach_averager"):
            self.fused = optimizer.attach_averager(self)
        if fused and not self.fused:
            raise RuntimeError(f"{type(self).__name__}(fused=True): the optimizer is not a fasttricks optimizer "
                               "or already has a fused sampler")
        if not self.fused:
            self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs:
                                                                   self.sample_after_step()))
        # NOTE [sampler checkpoints]: saved with the optimizer under a stable key.
        self.key = sampler_key(optimizer, type(self).__name__, name)
        samplers_of(optimizer).append(self)
        self._loading = None
        self._handles.append(optimizer.register_state_dict_pre_hook(lambda opt: self._publish(counters=True)))
        self._handles.append(optimizer.register_load_state_dict_pre_hook(self._optimizer_load_hook))
        self._handles.append(optimizer.register_load_state_dict_post_hook(self._optimizer_loaded_hook))
        pending = getattr(optimizer, "_ft_pending_samplers", None)
        if pending:  # attached after optimizer.load_state_dict (timm's order): claim the saved state
            saved_key = find_saved(pending, self.key, type(self).__name__)
            if saved_key is not None:
                entry = pending[saved_key]
                if entry is None:  # in optimizer.state
                    entry = self._state_from_entries(lambda i: optimizer.state.get(self.params[i]))
                self.load_state_dict(entry)
                del pending[saved_key]
                self._publish(counters=True)

    # ---- what a method defines -------------------------------------------

    #: samples once per epoch on its last step; if the epoch ends before step
    #: `steps_per_epoch`, end_epoch() takes the missed sample
    _ONCE_PER_EPOCH = False

    def _samples_step(self) -> bool:
        """Whether the step just counted (self.step_in_epoch, 1-based) samples."""
        raise NotImplementedError

    def _sample_coef(self) -> float:
        """c of the next sample, given the samples taken so far."""
        raise NotImplementedError

    def _coefficient(self) -> float:
        return self._sample_coef() if self._samples_step() else 0.0

    def _epoch_eligible(self) -> bool:
        return True

    def _epoch_end_action(self) -> tuple[bool, bool]:
        """(reassign params <- w_hat, reset the averaging window) at epoch end."""
        return False, False

    def _extra_state(self) -> dict:
        return {}

    def _check_extra_state(self, state: dict) -> None:
        """Raise if `state` cannot be loaded; writes nothing."""

    def _load_extra_state(self, state: dict) -> None:
        pass

    # ---- the step ----------------------------------------------------------

    def begin_step(self) -> float:
        self.step_in_epoch += 1
        self.total_steps += 1
        try:
            coef = float(self._coefficient())
            if not 0.0 <= coef <= 1.0:
                raise RuntimeError(f"{type(self).__name__}: coefficient {coef} outside [0, 1]")
        except BaseException:
            self.cancel_step()
            raise
        return coef

    def cancel_step(self) -> None:
        """Undo begin_step's count: the step failed before writing anything."""
        self.step_in_epoch -= 1
        self.total_steps -= 1

    def end_step(self, coef: float, found_inf) -> None:
        """After the step's kernels are queued: count its sample unless found_inf
        skipped it; a device found_inf is read later (NOTE [deferred found_inf])."""
        if coef != 0.0:
            if found_inf is None:
                self._count_sample()
            else:
                self._settle()
                self._unsettled = DeferredFlag(found_inf)
                if self._unsettled.ready():  # host memory: no reason to wait
                    self._settle()
            self._average_buffers(coef, found_inf)
        anchor = self._anchor
        if anchor is not None:
            own = self.optimizer.state.get(anchor[0])
            if (own or {}).get(self._average_key) is not anchor[1] and self._publishes(anchor[0], own):
                self._publish(counters=False)  # first step, or the state was cleared or replaced

    def _settle(self) -> None:
        """Count the last sample if its step was not skipped."""
        unsettled = self.__dict__.get("_unsettled")
        if unsettled is not None:
            self._unsettled = None
            if not unsettled.is_set():
                self._count_sample()

    def _count_sample(self) -> None:
        for slot in ("_samples", "_epoch_samples", "_total_samples"):
            self.__dict__[slot] += 1

    def sample_after_step(self) -> None:
        """Post-hook path: count the step and lerp toward the updated weights."""
        coef = self.begin_step()
        found_inf = getattr(self.optimizer, "found_inf", None)
        if coef != 0.0:
            self._lerp_now(coef, only_with_grad=True, found_inf=found_inf)
        self.end_step(coef, found_inf)

    def _lerp_now(self, coef: float, only_with_grad: bool, found_inf=None) -> None:
        # Like the fused kernels, the post-hook skips params the step skipped.
        avgs, weights = [], []
        for p, avg in zip(self.params, self.averages):
            if p.grad is not None or not only_with_grad:
                avgs.append(avg)
                weights.append(self._weight(p, avg))
        average_reference_(avgs, weights, coef, skip=found_inf)

    # NOTE [averaged buffers]
    # With model=, a sampler averages the model's buffers too: floating-point
    # buffers take the params' coefficient (as AveragedModel(use_buffers=True));
    # the others (BN's num_batches_tracked) are copied, as timm's ModelEmaV3
    # does. Nothing changes where found_inf is set.
    @torch.no_grad()
    def _average_buffers(self, coef: float, found_inf=None) -> None:
        if not self.buffer_averages:
            return
        live = self._live_buffers()
        floats = [(a, b) for a, b in zip(self.buffer_averages, live) if a.is_floating_point()]
        if floats:
            average_reference_([a for a, _ in floats], [b for _, b in floats], coef, skip=found_inf)
        for a, b in zip(self.buffer_averages, live):
            if not a.is_floating_point():
                a.copy_(b if found_inf is None else torch.where(found_inf.to(a.device) != 0, a, b))

    def _live_buffers(self) -> list[torch.Tensor]:
        buffers = dict(self.model.named_buffers())
        if [n for n in buffers] != self.buffer_names:
            raise RuntimeError(f"{type(self).__name__}: the model's buffers changed since the sampler was created")
        return [buffers[n].detach() for n in self.buffer_names]

    def _check_model(self, model, what: str) -> None:
        ours = {id(p) for p in self.params}
        theirs = [p for p in model.parameters()]
        if not any(id(p) in ours for p in theirs):
            raise ValueError(f"{type(self).__name__}: {what} is not the model this optimizer trains (none of its "
                             "parameters is in the optimizer); pass the model whose parameters it steps")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{type(self).__name__}: {message}", UserWarning, stacklevel=3)

    def _weight(self, p: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        """What the average follows: the fp32 master copy when the optimizer keeps one."""
        if avg.dtype != p.dtype:
            master = self.optimizer.state.get(p, {}).get("master_param")
            if master is not None:
                return master
        return p.detach()

    def averages_for(self, params, dtype: torch.dtype) -> list[torch.Tensor]:
        """The averages of one fused plan bucket, in `dtype` (the bucket's average_dtype)."""
        out = []
        for p in params:
            i = self._index.get(id(p))
            if i is None:  # a param group added after the sampler was created
                self._add_param(p, dtype)
                i = self._index[id(p)]
            avg = self.averages[i]
            want = dtype
            if avg.dtype != want or avg.device != p.device:
                avg = self.averages[i] = avg.to(device=p.device, dtype=want)
                if self.optimizer.state.get(p, {}).get(self._average_key) is not None:
                    write_state(self.optimizer, [(p, self._average_key, avg)])
            out.append(avg)
        return out

    def _add_param(self, p, dtype: torch.dtype) -> None:
        self._index[id(p)] = len(self.params)
        self.params.append(p)
        with torch.no_grad():
            self.averages.append(p.detach().to(dtype, copy=True))

    # ---- epoch end ---------------------------------------------------------

    def end_epoch(self, model: torch.nn.Module | None = None, bn_loader=None, bn_fraction: float = 1.0,
                  forward_fn=None) -> bool:
        """Call once at the end of every epoch. Does the method's epoch-end work
        (reassignment params <- w_hat for the periodic methods, then BN
        recalibration on `bn_fraction` of `bn_loader` when both `model` and
        `bn_loader` are given) and starts the next epoch's count. Returns
        whether the params were reassigned."""
        if bn_loader is not None and model is None:
            raise ValueError("end_epoch: bn_loader needs model")
        if model is not None:
            self._check_model(model, "end_epoch(model=...)")
        b = self.steps_per_epoch
        # Fewer steps than b are normal under a GradScaler, which skips the
        # step on an overflow; fewer than half, or more, is a wrong b (the
        # number of samples, or of batches under gradient accumulation).
        if b is not None and (self.step_in_epoch > b or 2 * self.step_in_epoch < b):
            self._warn_once("steps_per_epoch", (
                f"end_epoch() after {self.step_in_epoch} optimizer steps, but steps_per_epoch={b}; pass "
                "steps_per_epoch=len(train_loader) (the steps of an epoch, not the number of samples), or the "
                "schedule of sampled steps does not match the epoch"))
        if (self._ONCE_PER_EPOCH and self.epoch_samples == 0 and self.step_in_epoch > 0
                and self._epoch_eligible()):
            self._lerp_now(self._sample_coef(), only_with_grad=False)
            self._count_sample()
        reassign, reset = self._epoch_end_action()
        reassigned = False
        if reassign and self.samples > 0 and bn_loader is None and self._has_batchnorm(model):
            known = model is not None or self.model is not None
            self._warn_once("bn", "the params were reassigned but BatchNorm statistics were not recalibrated; "
                                  "pass end_epoch(model=model, bn_loader=train_loader, bn_fraction=...)" +
                            ("" if known else " (a model without BatchNorm: pass model= to say so)"))
        if reassign and self.samples > 0:
            self.assign(model=model, bn_loader=bn_loader, bn_fraction=bn_fraction, forward_fn=forward_fn)
            reassigned = True
        if reset:
            self.samples = 0
        self.step_in_epoch = 0
        self.epoch_samples = 0
        self.epoch += 1
        self._start_epoch()
        return reassigned

    def _start_epoch(self) -> None:
        pass

    def _has_batchnorm(self, model) -> bool:
        model = model if model is not None else self.model
        if model is None:
            return True  # unknown: say so, once
        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    # ---- lifecycle -----------------------------------------------------------------

    def detach(self) -> None:
        """Stop sampling: remove the hooks and un-fuse from the optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.fused:
            self.optimizer.detach_averager(self)
            self.fused = False
        samplers = samplers_of(self.optimizer)
        if self in samplers:
            samplers.remove(self)
        drop_extras(self.optimizer, [self.key])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(epoch={self.epoch}, step_in_epoch={self.step_in_epoch}, "
                f"samples={self.samples}, fused={self.fused})")
