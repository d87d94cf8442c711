"""BatchNorm recalibration after the weights were replaced (docs/sampling.md).

Averaged weights do not match the running statistics the BN layers collected
along the way, so after a reassignment the statistics are recomputed: reset,
then a forward pass over ceil(fraction * batches) training batches in train
mode with cumulative averaging (momentum=None), as
torch.optim.swa_utils.update_bn does for fraction = 1 (Tripathi & Shah's beta).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recalibrate_bn"]


def _default_forward(model, batch):
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    elif isinstance(batch, dict):
        raise TypeError("recalibrate_bn: dict batches need a forward_fn(model, batch)")
    device = next((p.device for p in model.parameters()), None)
    if device is not None and torch.is_tensor(batch):
        batch = batch.to(device)
    return model(batch)


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, loader, fraction: float = 1.0, forward_fn=None) -> int:
    """Recompute the running statistics of every BatchNorm layer of `model`
    from the first ceil(fraction * len(loader)) batches of `loader`.

    `forward_fn(model, batch)` runs one batch (default: `model(batch[0])` for
    tuple/list batches, `model(batch)` otherwise, moved to the model's
    device). Each layer's momentum and the model's train/eval mode are
    restored. Under torch.distributed (initialised, world size > 1) the
    statistics are averaged across ranks afterwards. Returns the number of
    batches used; a model without BatchNorm is left alone (returns 0).
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"recalibrate_bn: fraction must be in (0, 1], got {fraction}")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    if fraction < 1.0:
        try:
            total = len(loader)
        except TypeError:
            raise TypeError("recalibrate_bn: fraction < 1 needs a loader with len()") from None
        limit = max(1, math.ceil(fraction * total))
    else:
        limit = None
    forward_fn = forward_fn or _default_forward
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    model.train()
    used = 0
    try:
        for batch in loader:
            if limit is not None and used >= limit:
                break
            forward_fn(model, batch)
            used += 1
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _average_across_ranks(bns)
    return used


def _average_across_ranks(bns) -> None:
    # Mean of the per-rank statistics: exact for the means with equal batch
    # counts per rank; for the variances it omits the spread of the rank means.
    tensors = [t for m in bns for t in (m.running_mean, m.running_var) if t is not None]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n
