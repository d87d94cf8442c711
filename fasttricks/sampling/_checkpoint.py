"""A sampler's checkpoints: its state as optimizer state, and its own state_dict().

Saved and restored with the optimizer (NOTE [sampler checkpoints] below). A
part of WeightSampler (fasttricks/sampling/_base.py).
"""
from __future__ import annotations

import itertools

import torch

from fasttricks.optim.state_extras import LEGACY_SAMPLER_STATE_KEY, anchor_param, own_state_empty, write_state


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


def samplers_of(optimizer) -> list:
    samplers = optimizer.__dict__.get("_ft_samplers")
    if samplers is None:
        samplers = optimizer.__dict__["_ft_samplers"] = []
    return samplers


def sampler_key(optimizer, cls_name: str, name: str | None) -> str:
    taken = {s.key for s in samplers_of(optimizer)}
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


def find_saved(saved: dict, key: str, cls_name: str) -> str | None:
    """The key of this sampler's entry in a saved dict, or None."""
    if key in saved:
        return key
    legacy = [k for k, v in saved.items() if ":" in k and k.split(":", 1)[0].isdigit()
              and isinstance(v, dict) and v.get("method") == cls_name]
    return legacy[0] if len(legacy) == 1 and key == cls_name else None


class SamplerCheckpoints:
    """WeightSampler's checkpoint methods (see the module docstring)."""

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
        saved_key = find_saved(legacy, self.key, type(self).__name__)
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
