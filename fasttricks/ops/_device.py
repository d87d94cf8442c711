"""Host side of the multi-tensor GPU kernels (Triton and CUDA share it).

Each step the kernels get one int64 buffer, copied to the device at once:

    ptrs[R, n]      data pointer of each of the R tensor lists (0 = unused),
                    or a plain integer for "flag" rows
    numels[n]       elements per tensor
    chunk_tensor[C] tensor index of each chunk
    chunk_start[C]  first element of each chunk

and launch one program (Triton) / block (CUDA) per chunk of CHUNK elements.
The buffer is rebuilt only when a pointer changed since the last step.
"""
from __future__ import annotations

import torch

from fasttricks.ops._plan import PlanBase

CHUNK = 4096  # elements per program / CUDA block


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    return t.shape == ref.shape and t.stride() == ref.stride()


class DevicePlan(PlanBase):
    """Subclasses list the pointer rows (`ROWS`), and implement `launch`."""

    ROWS: tuple[str, ...] = ()

    def __init__(self, params, slots):
        super().__init__(params, slots)
        self._key = None
        self._tables = None

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
            dense = p.is_contiguous() or _is_dense(p)
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
            buf = host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host
            R, C = len(self.ROWS), len(chunk_tensor)
            self._tables = (buf[: R * n], buf[R * n: R * n + n], buf[R * n + n: R * n + n + C],
                            buf[R * n + n + C:], n, C)
            self._key = key
        return self._tables


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any permutation of a contiguous layout)."""
    if t.numel() <= 1:
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def scalar_arg(value, device):
    """(float value, tensor or None): a tensor stays a tensor on `device`
    (read in the kernel: no host sync, works with capturable/CUDA graphs)."""
    if torch.is_tensor(value):
        return 0.0, value.to(device=device, dtype=torch.float32)
    return float(value), None
