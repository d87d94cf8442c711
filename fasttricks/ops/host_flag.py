"""Host decisions that depend on a device flag, taken without a stream sync.

NOTE [deferred found_inf]
Under a GradScaler with the fused unscale
(`fused=True`), `found_inf` lives on the device, and the kernels read it
there. Two pieces of host bookkeeping still depend on it: a sampler's sample
count (the next coefficient, 1/(j+1), needs j) and SGD's first-step flags (a
skipped first step leaves the momentum buffers fresh). Reading the flag at
once with `.item()` would stall the host until the GPU drains its queue,
every step. Instead the flag is copied non-blocking into pinned host memory
right after the kernels that consume it are queued, with an event behind the
copy; the bookkeeping is settled when it is next needed (the next step,
normally), by which time the event has almost always passed and the read is
a plain host load. If it has not, only that event is waited for; no stream
or device is synchronised. SGD clears its flags at once and puts them back
when the flag turns out set; a plan rebuilt in between takes the zero
buffer for a started one, which steps differently only with dampening != 0.
A flag in host memory (the CPU) is ready at once
and settles right after its step, as before.
"""
from __future__ import annotations

import torch

__all__ = ["DeferredFlag"]


class DeferredFlag:
    """Whether a 0-dim device flag was non-zero at the time of construction,
    answered later by `is_set()` (NOTE [deferred found_inf])."""

    __slots__ = ("_host", "_event")

    def __init__(self, flag: torch.Tensor):
        flag = flag.detach()
        if flag.device.type == "cuda":
            self._host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flag.device))
        else:  # host memory (the copy keeps the value if the flag is reused), or a device without events
            self._host = flag.to("cpu", copy=True)
            self._event = None

    def ready(self) -> bool:
        """Whether is_set() answers without waiting."""
        return self._event is None or self._event.query()

    def is_set(self) -> bool:
        if self._event is not None and not self._event.query():
            self._event.synchronize()
        return bool(self._host.item() != 0)

    # Copies (deepcopy, pickle) carry the answer, not the event.
    def __getstate__(self):
        return (self.is_set(),)

    def __setstate__(self, state) -> None:
        self._host, self._event = torch.tensor(float(state[0])), None
