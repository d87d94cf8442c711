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
[state-resident extras] in fasttricks/optim/_fused.py): whatever saves the
optimizer saves them, and loading it restores them (NOTE [sampler
checkpoints] below).

Methods (fasttricks/sampling/methods.py) override `_coefficient()` and
`_epoch_end_action()`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import torch

from fasttricks._checks import check_int
from fasttricks.ops.average import average_reference_
from fasttricks.ops.host_flag import DeferredFlag
from fasttricks.optim._fused import LEGACY_SAMPLER_STATE_KEY, anchor_param, drop_extras, write_state
from fasttricks.ops.precision import average_dtype
from fasttricks.optim._plan_cache import own_state_empty


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


class WeightSampler:
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
        self.key = _sampler_key(optimizer, type(self).__name__, name)
        _samplers_of(optimizer).append(self)
        self._loading = None
        self._handles.append(optimizer.register_state_dict_pre_hook(lambda opt: self._publish(counters=True)))
        self._handles.append(optimizer.register_load_state_dict_pre_hook(self._optimizer_load_hook))
        self._handles.append(optimizer.register_load_state_dict_post_hook(self._optimizer_loaded_hook))
        pending = getattr(optimizer, "_ft_pending_samplers", None)
        if pending:  # attached after optimizer.load_state_dict (timm's order): claim the saved state
            saved_key = _find_saved(pending, self.key, type(self).__name__)
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

    @torch.no_grad()
    def assign(self, model: torch.nn.Module | None = None, bn_loader=None, bn_fraction: float = 1.0,
               forward_fn=None) -> None:
        """Copy the averages into the params (and into the optimizer's fp32
        master copies); optimizer moments are kept. With `model` and
        `bn_loader`, recalibrate BatchNorm statistics afterwards."""
        for p, avg in zip(self.params, self.averages):
            p.copy_(avg)
            master = self.optimizer.state.get(p, {}).get("master_param")
            if master is not None:
                master.copy_(avg)
        if bn_loader is not None:
            if model is None:
                raise ValueError("assign: bn_loader needs model")
            from fasttricks.sampling.bn import recalibrate_bn

            recalibrate_bn(model, bn_loader, fraction=bn_fraction, forward_fn=forward_fn)

    # ---- evaluation ----------------------------------------------------------

    @contextlib.contextmanager
    def averaged_parameters(self):
        """Swap the averages into the params (and, with model=, the averaged
        buffers into the model's buffers) for the duration of the block, then
        restore the live values exactly. Safe inside: forward passes and
        anything that reads or copies values (`copy.deepcopy(model)`,
        `{k: v.clone() for k, v in model.state_dict().items()}`). Not safe: a
        plain `model.state_dict()` kept past the block (its tensors are the
        live params, restored when the block ends: use averaged_state_dict()),
        and `optimizer.step()`, which raises here (its update would be lost)."""
        tensors = [p.detach() for p in self.params]
        averages = list(self.averages)
        if self.buffer_averages:
            tensors += self._live_buffers()
            averages += self.buffer_averages
        with torch.no_grad():
            live = [t.clone() for t in tensors]
            for t, avg in zip(tensors, averages):
                t.copy_(avg)

        def refuse_step(optimizer, args, kwargs):
            raise RuntimeError(f"{type(self).__name__}: optimizer.step() inside averaged_parameters() would be "
                               "undone when the live params come back; step outside the block")

        handle = self.optimizer.register_step_pre_hook(refuse_step)
        try:
            yield self
        finally:
            handle.remove()
            with torch.no_grad():
                for t, value in zip(tensors, live):
                    t.copy_(value)

    @torch.no_grad()
    def averaged_state_dict(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """`model.state_dict()` with the averages in, as fresh tensors: each
        averaged param (in the param's dtype), each averaged (or copied)
        buffer, and a copy of anything the sampler does not average. Params
        are matched by identity, so any param groups work. Load it into a
        fresh model with `load_state_dict` to evaluate or export the average."""
        model = model if model is not None else self.model
        if model is None:
            raise ValueError("averaged_state_dict needs the model (pass it here or as model= to the sampler)")
        self._check_model(model, "averaged_state_dict(model)")
        by_id = {id(p): avg for p, avg in zip(self.params, self.averages)}
        buffers = dict(zip(self.buffer_names, self.buffer_averages)) if model is self.model else {}
        out = {}
        for name, t in model.state_dict(keep_vars=True).items():
            avg = by_id.get(id(t))
            if avg is None:
                avg = buffers.get(name)
            out[name] = (avg if avg is not None else t).detach().to(t.dtype, copy=True)
        return out

    @torch.no_grad()
    def copy_to(self, target) -> None:
        """Write the averages into `target`: a module shaped like the trained
        one (a deepcopy, say), or a sequence of tensors in the order of the
        optimizer's params. With model= given to the sampler, a module is
        written by name (averaged_state_dict: params and buffers, whatever the
        param groups); without it, the module's parameters are taken in the
        order of the optimizer's param groups."""
        if isinstance(target, torch.nn.Module) and self.model is not None:
            target.load_state_dict(self.averaged_state_dict())
            return
        tensors = list(target.parameters()) if isinstance(target, torch.nn.Module) else list(target)
        hint = " (pass model= to the sampler to copy by name)" if isinstance(target, torch.nn.Module) else ""
        if len(tensors) != len(self.params):
            raise ValueError(f"copy_to: target has {len(tensors)} tensors, the sampler averages "
                             f"{len(self.params)}{hint}")
        for t, avg in zip(tensors, self.averages):
            if t.shape != avg.shape:
                raise ValueError(f"copy_to: shape {tuple(t.shape)} does not match average {tuple(avg.shape)}{hint}")
        for t, avg in zip(tensors, self.averages):
            t.copy_(avg)
        if isinstance(target, torch.nn.Module) and self.buffer_averages:
            buffers = dict(target.named_buffers())
            for name, avg in zip(self.buffer_names, self.buffer_averages):
                if name in buffers:
                    buffers[name].copy_(avg)

    # ---- lifecycle and checkpoints ----------------------------------------------

    def detach(self) -> None:
        """Stop sampling: remove the hooks and un-fuse from the optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.fused:
            self.optimizer.detach_averager(self)
            self.fused = False
        samplers = _samplers_of(self.optimizer)
        if self in samplers:
            samplers.remove(self)
        drop_extras(self.optimizer, [self.key])

    def state_dict(self) -> dict:
        state = {"method": type(self).__name__, "averages": list(self.averages)}
        if self.buffer_averages:
            state["buffers"] = dict(zip(self.buffer_names, self.buffer_averages))
        state.update({k: getattr(self, k) for k in self._COUNTERS})
        state.update(self._extra_state())
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Everything is checked before anything is written: a state that does
        not fit raises ValueError and leaves averages and counters as they were.
        An average given as None (a param the checkpoint kept none for) stays."""
        self.check_state_dict(state)
        for a, b in zip(self.averages, state["averages"]):
            if b is not None:
                a.copy_(b)  # in place: fused plans keep pointing at these tensors
        buffers = state.get("buffers", {})
        for name, a in zip(self.buffer_names, self.buffer_averages):
            if name in buffers:
                a.copy_(buffers[name])
        for k in self._COUNTERS:
            setattr(self, k, int(state[k]))
        self._load_extra_state(state)

    def check_state_dict(self, state: dict) -> None:
        """Raises ValueError if `state` cannot be loaded into this sampler; writes nothing."""
        name = type(self).__name__
        if state.get("method") != name:
            raise ValueError(f"{name}.load_state_dict: state is from {state.get('method')!r}")
        missing = [k for k in ("averages", *self._COUNTERS) if k not in state]
        if missing:
            raise ValueError(f"{name}.load_state_dict: state lacks {missing}")
        averages = state["averages"]
        if len(averages) != len(self.averages):
            raise ValueError(f"{name}.load_state_dict: {len(averages)} averages for {len(self.averages)} params")
        for a, b in zip(self.averages, averages):
            if b is not None and (not torch.is_tensor(b) or a.shape != b.shape):
                raise ValueError(f"{name}.load_state_dict: average shape {tuple(getattr(b, 'shape', ()))}, "
                                 f"expected {tuple(a.shape)}")
        buffers = state.get("buffers", {})
        mine = dict(zip(self.buffer_names, self.buffer_averages))
        if buffers and (set(buffers) != set(mine) or any(
                not torch.is_tensor(b) or b.shape != mine[n].shape for n, b in buffers.items())):
            raise ValueError(f"{name}.load_state_dict: averaged buffers {list(buffers)} do not match the model's "
                             f"{self.buffer_names}")
        self._check_extra_state(state)

    # ---- the sampler's entries in optimizer.state (NOTE [state-resident extras]) ----

    @property
    def _average_key(self) -> str:
        return f"{self.key}/average"

    def _anchor_param(self):
        return anchor_param(self.optimizer)

    @property
    def _anchor(self):
        """(anchor param, its average) or None."""
        p = self._anchor_param()
        i = self._index.get(id(p)) if p is not None else None
        return None if i is None else (p, self.averages[i])

    def _publishes(self, p, state) -> bool:
        # A torch optimizer that takes an empty state for "not initialised"
        # (Adam: len(state) == 0) must not find our entry alone there.
        return p.requires_grad and (hasattr(self.optimizer, "attach_averager")
                                    or isinstance(self.optimizer, torch.optim.SGD) or not own_state_empty(state))

    def _publish(self, counters: bool) -> None:
        """Put the averages (and, with counters, the counters, hyper-parameters
        and averaged buffers, on the anchor) into optimizer.state. Not before
        the first step: DCP takes an empty optimizer.state for one that has
        not stepped, and initialises it with a step of lr 0."""
        if self.total_steps == 0:
            return
        state, key = self.optimizer.state, self._average_key
        writes, anchor, holder = [], self._anchor_param(), None
        for p, avg in zip(self.params, self.averages):
            own = state.get(p)
            published = (own or {}).get(key) is avg
            if published or self._publishes(p, own):
                if not published:
                    writes.append((p, key, avg))
                # The counters go to the anchor, or (a torch optimizer that has
                # no state for it yet, which an entry of ours would pass for
                # initialised) to the first param that holds an average;
                # loading finds them anywhere.
                if holder is None or p is anchor:
                    holder = p
        if counters and holder is not None:
            p = holder
            writes += [(p, f"{self.key}/{k}", int(getattr(self, k))) for k in self._COUNTERS]
            for k, v in self._extra_state().items():
                if isinstance(v, dict):
                    writes += [(p, f"{self.key}/{k}/{kk}", vv) for kk, vv in v.items()]
                else:
                    writes.append((p, f"{self.key}/{k}", v))
            writes += [(p, f"{self.key}/buffer/{n}", b) for n, b in zip(self.buffer_names, self.buffer_averages)]
        write_state(self.optimizer, writes)

    def _state_from_entries(self, state_of) -> dict | None:
        """This sampler's state (as state_dict() gives it) rebuilt from
        per-param optimizer state entries; `state_of(i)` is the state of
        self.params[i] (or None). None when they hold none of this sampler."""
        prefix = f"{self.key}/"
        averages, meta = [], None
        for i in range(len(self.params)):
            st = state_of(i) or {}
            averages.append(st.get(prefix + "average"))
            if meta is None and prefix + "total_steps" in st:
                meta = st
        if meta is None:
            return None
        out: dict = {"method": type(self).__name__, "averages": averages}
        for k, v in meta.items():
            if not isinstance(k, str) or not k.startswith(prefix) or k == prefix + "average":
                continue
            field, _, sub = k[len(prefix):].partition("/")
            if sub:
                out.setdefault("buffers" if field == "buffer" else field, {})[sub] = v
            else:
                out[field] = v
        return out

    def _optimizer_load_hook(self, optimizer, state_dict):
        """Check this sampler's saved state before anything is loaded (NOTE
        [sampler checkpoints]); the post-hook loads it."""
        self._loading = None
        legacy = state_dict.get(LEGACY_SAMPLER_STATE_KEY, {})
        saved_key = _find_saved(legacy, self.key, type(self).__name__)
        if saved_key is not None:
            entry = legacy[saved_key]
        else:
            saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict.get("param_groups", ()))
            live = itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)
            by_param = {id(p): state_dict.get("state", {}).get(pid) for p, pid in zip(live, saved_ids)}
            entry = self._state_from_entries(lambda i: by_param.get(id(self.params[i])))
            saved_key = self.key
        if entry is not None:
            self.check_state_dict(entry)
            self._loading = entry
            optimizer.__dict__.setdefault("_ft_claimed_samplers", set()).add(saved_key)
        return None

    def _optimizer_loaded_hook(self, optimizer):
        entry, self._loading = self._loading, None
        if entry is not None:
            self.load_state_dict(entry)
        # The loaded state holds torch's copies (or nothing): ours go back in.
        self._publish(counters=True)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(epoch={self.epoch}, step_in_epoch={self.step_in_epoch}, "
                f"samples={self.samples}, fused={self.fused})")


# NOTE [sampler checkpoints]
# Each sampler's state is optimizer state (NOTE [state-resident extras]), under
# its key: the `name` given to the sampler, else its class name, with ":1",
# ":2", ... for a second and third sampler of one class on one optimizer. Each
# param's average is state[p]["<key>/average"]; the counters, the
# hyper-parameters ("<key>/config/<name>") and the averaged buffers
# ("<key>/buffer/<name>") sit on the anchor param, refreshed by every
# optimizer.state_dict(). It is restored whether the sampler is attached before
# optimizer.load_state_dict (checked in a load pre-hook, loaded in the
# post-hook, so that nothing is half-loaded) or after it (a fasttricks
# optimizer keeps the entries no sampler claimed, and a sampler claims its own
# when it is created). An entry no sampler has claimed by the next step() is an
# error (fasttricks optimizers): the run would silently restart its averages.
# Checkpoints of earlier versions kept the samplers' states in
# state_dict()["fasttricks_samplers"], keyed by sampler key, and before that by
# "<attach order>:<class>" (found by class when that is unambiguous): they load.


def _samplers_of(optimizer) -> list:
    samplers = optimizer.__dict__.get("_ft_samplers")
    if samplers is None:
        samplers = optimizer.__dict__["_ft_samplers"] = []
    return samplers


def _sampler_key(optimizer, cls_name: str, name: str | None) -> str:
    taken = {s.key for s in _samplers_of(optimizer)}
    if name is not None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls_name}: name must be a non-empty str, got {name!r}")
        if "/" in name:  # NOTE [state-resident extras]: the separator of its state keys
            raise ValueError(f"{cls_name}: name must not contain '/', got {name!r}")
        if name in taken:
            raise ValueError(f"{cls_name}: this optimizer already has a sampler named {name!r}")
        return name
    key, n = cls_name, 0
    while key in taken:
        n += 1
        key = f"{cls_name}:{n}"
    return key


def _find_saved(saved: dict, key: str, cls_name: str) -> str | None:
    """The key of this sampler's entry in a saved dict, or None."""
    if key in saved:
        return key
    legacy = [k for k, v in saved.items() if ":" in k and k.split(":", 1)[0].isdigit()
              and isinstance(v, dict) and v.get("method") == cls_name]
    return legacy[0] if len(legacy) == 1 and key == cls_name else None


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
