"""The fused step inside torch.compile, as one custom op.

NOTE [compiled step]
`opt.step()` inside a torch.compile'd function.

Dynamo can trace the optimizer's Python but not a call into a plan's C++ or
Triton kernel, nor the building of a plan, which would break the graph. So
under compilation the whole fused step is one custom op,
`fasttricks::optimizer_step`: it names the params the step writes and the
grads (and GradScaler's tensors) it reads, so that the compiler orders it
right, and its implementation runs the optimizer's ordinary eager step
(plans, state creation, samplers, everything), found through a registry of
weak references by an integer id. A functionalizing backend (aot_eager,
inductor) hands the op copies of the params and copies them back afterwards,
so the op writes the stepped values into those copies too: one extra pass
over the params, under compilation only. Nothing of the hyper-parameters is baked
into the graph: the step reads them from `param_groups` when it runs, so a
schedule that changes the lr, float or tensor, recompiles nothing.
"""
from __future__ import annotations

import itertools
import weakref

import torch

_OPTIMIZERS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_ids = itertools.count()


def register(optimizer) -> None:
    """Give `optimizer` its registry id (at construction: not while tracing)."""
    key = next(_ids)
    optimizer._ft_compile_id = key
    _OPTIMIZERS[key] = optimizer


# The op reads the hyper-parameters from param_groups each time it runs, which
# a CUDA-graph replay (torch.compile(mode="reduce-overhead")) would skip,
# freezing a changing lr: the tag keeps the op out of captured graphs.
_CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("fasttricks::optimizer_step", mutates_args=("params",), tags=_CUDAGRAPH_UNSAFE)
def optimizer_step(optimizer_key: int, params: list[torch.Tensor], grads: list[torch.Tensor],
                   grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    optimizer = _OPTIMIZERS[optimizer_key]
    optimizer._eager_step(grad_scale, found_inf)
    # A functionalized graph hands the op copies of the params, and copies them
    # back over the params afterwards: give the copies the stepped values.
    with torch.no_grad():
        for given, param in zip(params, (p for group in optimizer.param_groups for p in group["params"])):
            if given.data_ptr() != param.data_ptr():
                given.copy_(param)


@optimizer_step.register_fake
def _(optimizer_key, params, grads, grad_scale, found_inf) -> None:
    return None


def step(optimizer, grad_scale, found_inf) -> None:
    """The traced form of the fused step: one call of the custom op."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    torch.ops.fasttricks.optimizer_step(optimizer._ft_compile_id, params, grads, grad_scale, found_inf)
