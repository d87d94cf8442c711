"""No host sync in a training step, checked on the CPU (NOTE [deferred found_inf]).

On a GPU, `torch.cuda.set_sync_debug_mode("error")` catches a step that
waits for the device (tests/test_gpu.py). Here the tensors a GPU run would
hold on the device are tracked: the model's params, the batch, the tensor
lr, and everything computed from them, created with `device=<a tensor's
device>` or moved with `.to(device)`. The host draws (mixup's lam, boxes and
partners, made on a CPU generator) stay host tensors. A mode then records
every way a tracked value reaches the host: a scalar read (`.item()`,
`bool()`, `float()`, `int()`, and ops that need one, such as `nonzero`) and a
copy to the host (`.cpu()`, `.tolist()`, `.numpy()`, a blocking `.to("cpu")`).

A read counts against the code that made it: fasttricks or the frameworks it
drives, never Triton's interpreter, which emulates the GPU on the host.
Allowed: DeferredFlag's load of its own host copy, and check_values_in's
branch for CPU tensors (on a GPU it asserts on the device).

Mixup, forward, the soft-target loss, backward, GradScaler with the fused
unscale, the step (the triton backend, the device path) with a tensor lr,
and fused and hooked samplers run for several steps, an overflow among them.
"""
from __future__ import annotations

import os
import traceback
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fasttricks import optim as fo
from fasttricks.losses import soft_target_cross_entropy
from fasttricks.mixup import Mixup
from fasttricks.sampling import EMA, PSWA
from helpers import BACKENDS

_HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
_SCALAR_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal",
               "aten::masked_select", "aten::unique_consecutive", "aten::_unique2"}
_ALLOWED = ((os.path.join("fasttricks", "ops", "host_flag.py"), None),
            (os.path.join("fasttricks", "_checks.py"), "check_values_in"))


def _culprit() -> str | None:
    """The innermost frame outside torch and this file: None when it is
    Triton's (its interpreter runs the kernels on the host) or allowed."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename
        if os.sep + "torch" + os.sep in path or path.endswith("test_no_host_sync.py"):
            continue
        if os.sep + "triton" + os.sep in path or any(
                path.endswith(f) and name in (None, frame.name) for f, name in _ALLOWED):
            return None
        return f"{path}:{frame.lineno} {frame.name}: {frame.line}"
    return None


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class HostSyncs(TorchFunctionMode):
    """Records the reads of device-bound values a GPU would wait for (see the
    module docstring); `track()` marks the tensors that start on the device."""

    def __init__(self, *tracked):
        super().__init__()
        self.found: list[str] = []
        self.device_bound = weakref.WeakValueDictionary()  # id -> tensor (tensors do not compare by identity)
        self.track(*tracked)
        self._dispatch = _Propagate(self)

    def track(self, *trees) -> None:
        for t in _tensors(trees):
            self.device_bound[id(t)] = t

    def bound(self, tree) -> bool:
        return any(self.device_bound.get(id(t)) is t for t in _tensors(tree))

    def __enter__(self):
        self._dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._dispatch.__exit__(*exc)

    def note(self, what: str) -> None:
        where = _culprit()
        if where is not None:
            self.found.append(f"{what} at {where}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_COPIES and self.bound(args[:1]):
            self.note(func.__name__)
        if func is torch.Tensor.to:
            target = _target_device(args, kwargs)
            if isinstance(target, str) and target.startswith("cpu"):  # a literal "cpu": to the host
                if self.bound(args[:1]) and not kwargs.get("non_blocking"):
                    self.note("to(cpu)")
            elif isinstance(target, torch.device):
                # .to(t.device): a GPU run gets a device tensor; copy, so that the
                # host original keeps its place (on the CPU .to returns it).
                out = func(*args, **{**kwargs, "copy": True})
                self.track(out)
                return out
        out = func(*args, **kwargs)
        if isinstance(kwargs.get("device"), torch.device):  # device=t.device (a string names the host)
            self.track(out)
        return out


class _Propagate(TorchDispatchMode):
    """Whatever is computed from a device-bound tensor is device-bound; scalar
    reads of it are recorded."""

    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs_bound = self.owner.bound((args, kwargs))
        if func._schema.name in _SCALAR_OPS and inputs_bound:
            self.owner.note(func._schema.name)
        out = func(*args, **kwargs)
        if inputs_bound:
            self.owner.track(out)
        return out


def _target_device(args, kwargs):
    for t in list(args[1:]) + [kwargs.get("device")]:
        if isinstance(t, (str, torch.device)):
            return t
    return None


def test_the_detector_sees_each_kind_of_read():
    """The probe itself: each read of a device-bound value is recorded, and
    host draws, non-blocking copies and device-side work are not."""
    x = torch.ones(3)
    reads = [lambda: x.sum().item(), lambda: bool(x[0] > 0), lambda: float(x[0]), lambda: x.tolist(),
             lambda: x.cpu(), lambda: x.to("cpu"), lambda: torch.nonzero(x),
             lambda: torch.zeros(2, device=x.device).sum().item(), lambda: int(torch.ones(1).to(x.device))]
    for read in reads:
        with HostSyncs(x) as syncs:
            read()
        assert len(syncs.found) >= 1, read
    with HostSyncs(x) as syncs:
        y = x * 2 + x.sum()
        x.to("cpu", non_blocking=True)
        torch.where(y > 0, y, x)
        host = torch.rand(3) < 2
        assert bool(host.any())
    assert syncs.found == []


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 10))


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend (the device path)")
@pytest.mark.parametrize("family, clip", [("AdamW", False), ("SGD", False), ("AdamW", True)])
def test_a_training_step_reads_nothing_on_the_host(family, clip):
    model = _model()
    lr = torch.tensor(0.01)  # a tensor lr on the params' device
    if family == "AdamW":
        opt = fo.AdamW(model.parameters(), lr=lr, weight_decay=0.05, backend="triton", fused=True)
        samplers = [EMA(opt, decay=0.9, model=model), PSWA(opt, 4, alpha=0.5, seed=1, fused=False)]
    else:
        opt = fo.SGD(model.parameters(), lr=lr, momentum=0.9, dampening=0.1, backend="triton", fused=True)
        samplers = [PSWA(opt, 4, alpha=1.0, seed=1, model=model), EMA(opt, decay=0.9, fused=False)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    mixer = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=10, label_smoothing=0.1, seed=0)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]

    found = []
    device_bound = [lr, list(model.parameters()), list(model.buffers())]
    for k, (x, y) in enumerate(batches):
        with HostSyncs(x, y, *device_bound) as syncs:
            x, target = mixer(x, y)
            logits = model(x)
            loss = soft_target_cross_entropy(logits, target)
            opt.zero_grad()
            scaler.scale(loss * (float("inf") if k == 2 else 1.0)).backward()  # step 2 overflows
            if clip:  # NOTE [clip in the step]: the norm now, the clip in the step
                opt.clip_grad_norm_(0.5)
            scaler.step(opt)
            scaler.update()
        found += [f"step {k}: {f}" for f in syncs.found]
    assert found == []
    # The run did what it should: the overflow skipped one step, and the counts saw it.
    assert scaler.get_scale() == 2.0 ** 7
    assert samplers[0].total_steps == len(batches)
    assert all(torch.isfinite(p).all() for p in model.parameters())
