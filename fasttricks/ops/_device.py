"""Host side of the multi-tensor GPU kernels (Triton and CUDA share it).

Each step the kernels get one int64 buffer, copied to the device at once
(NOTE [pointer table] in csrc/include/fasttricks/table.h and fasttricks/_table.py):

    ptrs[R, n]      data pointer of each of the R tensor lists (0 = unused),
                    or a plain integer for "flag" rows
    numels[n]       elements per tensor
    chunk_tensor[C] tensor index of each chunk
    chunk_start[C]  first element of each chunk

and launch one program (Triton) / block (CUDA) per chunk of CHUNK elements.
The buffer is rebuilt only when a pointer changed since the last step.

A device plan is given its launch function (fasttricks/kernels/<op>.py for Triton, the
CUDA extension's binding for CUDA): the kernels are leaves and import nothing
from here. `DevicePlan.step` is the one launch helper: it packs the table,
sets the device guard (Triton and the CUDA binding both launch on the
current stream of the current device), launches, and writes back.

`DevicePlan.pack()` validates the step's params, packs that buffer and bumps
the step counters. It runs in C++ (fasttricks._C.DeviceTable,
csrc/host/device_table.cpp) when the CPU extension loaded: the Python loop
below is the same logic at about a millisecond per step for 161 params,
against the GPU host-overhead target of 50 us. The Python path remains for
installs without the extension (and the tests run both).
"""
from __future__ import annotations

import contextlib

import torch

from fasttricks import _backends
from fasttricks._table import CHUNK, grad_multiplier, scalar_arg
from fasttricks.ops._plan import PlanBase, is_dense

NATIVE = True  # use fasttricks._C.DeviceTable when it loaded (tests switch it off)


def cuda_launch(op: str, hyper_floats: tuple[str, ...]):
    """The CUDA backend's launch of family `op`: the extension's `<op>_step`
    binding (csrc/cuda/bindings.cpp), called as the Triton launch of
    fasttricks/kernels/<op>.py is, with everything after the table by keyword.
    `hyper_floats`: the fields of the family's hyper record it passes as they are."""

    def launch(tables, hyper, *, device, **switches):
        ptrs, numels, chunk_tensor, chunk_start, n, _ = tables
        lr, lr_tensor = scalar_arg(hyper.lr, device)
        floats = {name: float(getattr(hyper, name)) for name in hyper_floats}
        getattr(_backends.cuda_ext(), f"{op}_step")(
            ptrs, numels, chunk_tensor, chunk_start, n, lr=lr, lr_tensor=lr_tensor, grad_mul=grad_multiplier(hyper),
            round_key=int(hyper.round_key), **floats, **switches)

    return launch


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    return t.shape == ref.shape and t.stride() == ref.stride()


class DevicePlan(PlanBase):
    """Subclasses list the pointer rows (`ROWS`: "param", "grad", then the
    param-shaped state rows and "avg", then the `STEP_ROW` of step counters if
    any, then the `FLAG_ROWS` of per-param integers) and implement `launch`."""

    ROWS: tuple[str, ...] = ()
    STEP_ROW: str | None = None
    FLAG_ROWS: tuple[str, ...] = ()

    def __init__(self, params, slots, launch, switches: dict, rounding=None):
        super().__init__(params, slots, rounding)
        self.launch = launch
        # compile-time switches of the family's kernel
        self.switches = {**switches, "master": self.master, "stochastic_rounding": self.rounding is not None}
        self._key = None
        self._tables = None
        self._native = None
        self._flags = {name: [0] * len(self.params) for name in self.FLAG_ROWS}
        if "key" in self._flags and self.rounding is not None:
            self._flags["key"] = list(self.rounding)
        self._last_index: list[int] = []
        self._last_steps: list[torch.Tensor] = []

    def _tensor_rows(self) -> list[str]:
        """The rows after param and grad that hold tensors (the flag rows come last)."""
        names = list(self.ROWS[2:len(self.ROWS) - len(self.FLAG_ROWS)])
        if self.ROWS[:2] != ("param", "grad") or tuple(self.ROWS[len(self.ROWS) - len(self.FLAG_ROWS):]) != \
                self.FLAG_ROWS or (self.STEP_ROW and names[-1] != self.STEP_ROW):
            raise AssertionError(f"{type(self).__name__}: ROWS out of the order the tables need")
        return names

    def _row(self, name: str):
        if name == "avg":
            return self.averages
        if name == self.STEP_ROW:
            return self.steps
        return self.slots.get(name)

    def _table(self):
        """The C++ table, built on first use (None: the Python path)."""
        if self._native is None and NATIVE and _backends.cpu_ext() is not None:
            names = self._tensor_rows()
            n_state = len(names) - (1 if self.STEP_ROW else 0)
            rows = [list(self._row(n) or []) for n in names]
            dtypes = [self.row_dtype(n) for n in names[:n_state]]
            self._native = _backends.cpu_ext().DeviceTable(
                op=self.op, params=self.params, rows=rows, n_state_rows=n_state,
                step_row=n_state if self.STEP_ROW else -1, n_flag_rows=len(self.FLAG_ROWS), row_dtypes=dtypes,
                chunk=CHUNK)
            for k, name in enumerate(self.FLAG_ROWS):
                self._native.set_flags(k, self._flags[name])
        return self._native

    def row_dtype(self, name: str) -> torch.dtype:
        return {"master": torch.float32, "avg": self.avg_dtype}.get(name, self.state_dtype)

    def set_averages(self, averages) -> None:
        super().set_averages(averages)
        if self._native is not None:
            self._native.set_row(self._tensor_rows().index("avg"), list(self.averages or []))
        self._key = None

    # ---- the step ------------------------------------------------------------

    def step(self, hyper, grad_scale, found_inf, avg_coef) -> int:
        """One launch over the params with a grad: returns how many were stepped
        (-1 is never returned: found_inf is read on the device, NOTE [found_inf contract])."""
        n, tables, writeback, keep = self.pack()
        if not n:
            return 0
        found_inf, grad_scale = self.on_device(found_inf), self.on_device(grad_scale)
        try:
            with self.device_guard():
                self.launch(tables, hyper, param_dtype=self.param_dtype, state_dtype=self.state_dtype,
                            grad_scale=grad_scale, found_inf=found_inf, avg_coef=avg_coef,
                            average=self.averages is not None and avg_coef != 0, device=self.device, **self.switches)
        except BaseException:
            if self.STEP_ROW:  # a launch that failed wrote nothing: the counts pack() bumped go back
                self.unbump_steps(torch.ones((), dtype=torch.float32, device=self.device))
            raise
        del keep  # the temporaries the kernel reads lived through its launch
        if found_inf is not None and self.STEP_ROW:
            self.unbump_steps(found_inf)
        self.write_back(writeback)
        self.after_step(found_inf)
        return n

    def device_guard(self):
        """The plan's GPU made current for a launch (Triton and the CUDA binding launch on the current device)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def after_step(self, found_inf) -> None:
        """Host bookkeeping after a launch (SGD's first-step flags)."""

    # ---- the per-step interface (C++ or Python) ---------------------------

    def pack(self):
        """(n, tables, writeback, keep): n params with a grad, validated before
        anything is written; the table for `launch` (None when n == 0); the
        (destination, temporary) pairs to copy back after it; temporaries the
        kernel reads, to hold until it is launched. Bumps the steps."""
        table = self._table()
        if table is not None:
            return table.gather()
        index, grads = self.gather()
        self._last_index = index
        if not index:
            return 0, None, [], []
        rows, writeback = self.prepare(index, grads)
        if self.STEP_ROW:
            rows[self.STEP_ROW] = self._last_steps = [self.steps[i] for i in index]
        tables = self.tables(rows, {name: [self._flags[name][i] for i in index] for name in self.FLAG_ROWS})
        if self.STEP_ROW:
            torch._foreach_add_(self._last_steps, 1.0)
        return len(index), tables, writeback, rows["grad"]

    def on_device(self, scalar: torch.Tensor | None) -> torch.Tensor | None:
        """found_inf / grad_scale as the kernels read them: float32 on the plan's device."""
        return None if scalar is None else scalar.to(device=self.device, dtype=torch.float32)

    def unbump_steps(self, found_inf: torch.Tensor) -> None:
        """NOTE [found_inf contract]: the last step takes its count back, on the device."""
        table = self._table()
        if table is not None:
            table.unbump_steps(found_inf)
        elif self._last_steps:
            torch._foreach_sub_(self._last_steps, [found_inf] * len(self._last_steps))

    def set_flags(self, name: str, values) -> None:
        self._flags[name] = [int(v) for v in values]
        if self._native is not None:
            self._native.set_flags(self.FLAG_ROWS.index(name), self._flags[name])

    def flags(self, name: str) -> list[int]:
        table = self._table()
        return list(table.flags(self.FLAG_ROWS.index(name))) if table is not None else list(self._flags[name])

    def any_gathered_flag(self, name: str) -> bool:
        table = self._table()
        if table is not None:
            return table.any_gathered_flag(self.FLAG_ROWS.index(name))
        return any(self._flags[name][i] for i in self._last_index)

    def clear_gathered_flags(self, name: str) -> None:
        table = self._table()
        if table is not None:
            table.clear_gathered_flags(self.FLAG_ROWS.index(name))
        for i in self._last_index:
            self._flags[name][i] = 0

    # ---- the Python path ---------------------------------------------------

    def prepare(self, index, grads):
        """Per-row tensor lists for the params in `index`; tensors whose
        layouts differ from the param's go through contiguous temporaries,
        returned as (destination, temporary) pairs to copy back."""
        rows = {name: [] for name in self.ROWS}
        rows["grad"] = []
        writeback = []
        for i, g in zip(index, grads):
            p = self.params[i]
            named = {"param": p, "avg": self.averages[i] if self.averages is not None else None}
            for name, tensors in self.slots.items():
                named[name] = tensors[i] if tensors is not None else None
            dense = p.is_contiguous() or is_dense(p)
            dense = dense and _same_layout(g, p) and all(
                t is None or _same_layout(t, p) for t in named.values())
            if not dense:
                g = g.contiguous()
                for name, t in named.items():
                    if t is not None and not t.is_contiguous():
                        tmp = t.contiguous()
                        writeback.append((t, tmp))
                        named[name] = tmp
            rows["grad"].append(g)
            for name in self.ROWS:
                if name != "grad" and name in named:
                    rows[name].append(named[name])
        return rows, writeback

    @staticmethod
    def write_back(writeback) -> None:
        """Copies the temporaries of `prepare` back (under no_grad: the
        destination may be a leaf param that requires grad)."""
        with torch.no_grad():
            for dst, tmp in writeback:
                dst.copy_(tmp)

    def tables(self, rows: dict[str, list], flags: dict[str, list[int]] | None = None):
        """The packed device buffer: (ptrs, numels, chunk_tensor, chunk_start, n)."""
        flags = flags or {}
        n = len(rows["grad"])
        ptr_rows = []
        for name in self.ROWS:
            if name in flags:
                ptr_rows.append(list(flags[name]))
            else:
                tensors = rows.get(name) or []
                ptr_rows.append([t.data_ptr() if t is not None else 0 for t in tensors] if tensors else [0] * n)
        numels = [g.numel() for g in rows["grad"]]
        key = (tuple(map(tuple, ptr_rows)), tuple(numels))
        if key != self._key:
            chunk_tensor, chunk_start = [], []
            for t, ne in enumerate(numels):
                for s in range(0, ne, CHUNK):
                    chunk_tensor.append(t)
                    chunk_start.append(s)
            flat = [v for r in ptr_rows for v in r] + numels + chunk_tensor + chunk_start
            host = torch.tensor(flat, dtype=torch.int64)
            # Off the CPU: through pinned memory, so that the copy does not block the host.
            buf = host.pin_memory().to(self.device, non_blocking=True) if self.device.type != "cpu" else host
            R, C = len(self.ROWS), len(chunk_tensor)
            self._tables = (buf[: R * n], buf[R * n: R * n + n], buf[R * n + n: R * n + n + C],
                            buf[R * n + n + C:], n, C)
            self._key = key
        return self._tables
