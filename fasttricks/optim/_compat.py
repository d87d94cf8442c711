"""The pieces of torch.optim's private surface the fasttricks optimizers lean on.

Kept in one place so that a torch upgrade has one file to check: the
hook-firing wrapper around `step` and the `differentiable=True` fallback to
torch's own step."""
from __future__ import annotations

import functools
import itertools

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


def profile_hook_step(func):
    """torch wraps `step` to fire the optimizer hooks inside a profiler range.
    Same hooks, same order; the range only when the profiler is on, since it
    costs several microseconds of the step's host overhead."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        self = args[0]
        if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{self.__class__.__name__}.step"):
                return _run_with_hooks(self, func, args, kwargs)
        return _run_with_hooks(self, func, args, kwargs)

    return wrapper


def _run_with_hooks(self, func, args, kwargs):
    # The emptiness tests skip building chains on the common no-hook path.
    pre_hooks = self._optimizer_step_pre_hooks
    for pre_hook in itertools.chain(_global_optimizer_pre_hooks.values(), pre_hooks.values()) \
            if _global_optimizer_pre_hooks or pre_hooks else ():
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = func(*args, **kwargs)
    self._optimizer_step_code()
    post_hooks = self._optimizer_step_post_hooks
    for post_hook in itertools.chain(post_hooks.values(), _global_optimizer_post_hooks.values()) \
            if post_hooks or _global_optimizer_post_hooks else ():
        post_hook(self, args, kwargs)
    return out


def torch_step(optimizer, closure):
    """differentiable=True: torch's own (autograd-tracked) implementation."""
    for base in type(optimizer).__mro__:
        if base.__module__.startswith("torch.optim") and "step" in base.__dict__:
            fn = base.__dict__["step"]
            fn = getattr(fn, "__wrapped__", fn) if getattr(fn, "hooked", False) else fn
            return fn(optimizer, closure)
    raise RuntimeError("no torch.optim step to fall back to")
