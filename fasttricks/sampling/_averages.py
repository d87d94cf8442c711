"""The averages put to use: assigned, swapped in for evaluation, exported, copied.

Assigned into the params (the periodic methods' reassignment, SWA's end of
training), swapped in for evaluation, exported as a model state dict, copied
into another model. A part of WeightSampler
(fasttricks/sampling/_base.py), which keeps them up to date.
"""
from __future__ import annotations

import contextlib

import torch


class AveragesInUse:
    """WeightSampler's methods that read its averages out (see the module docstring)."""

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
