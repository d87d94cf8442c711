"""Containers that count their own changes, for the plan cache.

With them the cache can tell in O(1) whether anything a user may edit through torch's public surface changed
since the plans were built (NOTE [plan cache] in fasttricks/optim/_plan_cache.py).

* `StateDict` is `optimizer.state`: a `defaultdict(dict)` whose per-param
  dicts are `ParamState`s (a value that is not a dict, which torch allows
  under any key, is stored as it is). Setting, deleting or clearing an entry at either
  level bumps one counter shared by the whole state, `state.version.n`.
* `ParamList` is `param_group["params"]`: a list that bumps its own counter on
  any mutation (item assignment, append, insert, ...).

They behave as the dict and list they subclass in every other respect. A
value assigned with `optimizer.state[p] = d` is stored as a `ParamState` copy
of `d` (the optimizer then no longer sees later edits made through `d`
itself, only those made through `optimizer.state[p]`); `state_dict()` hands
out plain dicts and lists, so a checkpoint never holds these types.
"""
from __future__ import annotations

from collections import defaultdict


class Version:
    """A change counter shared by a StateDict and its ParamStates."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __deepcopy__(self, memo):  # a deep copy of an optimizer counts on its own
        return Version()


def _bumping(name: str, cls: type):
    base = getattr(cls.__mro__[1], name)

    def method(self, *args, **kwargs):
        out = base(self, *args, **kwargs)
        self._bump()
        return out

    method.__name__ = name
    method.__doc__ = base.__doc__
    return method


class ParamState(dict):
    """One param's optimizer state; every change bumps the owning StateDict's version."""

    __slots__ = ("version",)

    def __init__(self, *args, version: Version | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.version = version if version is not None else Version()

    def _bump(self) -> None:
        self.version.n += 1

    def setdefault(self, key, default=None):
        if key in self:
            return self[key]
        self[key] = default
        return default

    def __reduce__(self):  # pickles (and deep-copies) as a plain dict
        return (dict, (dict(self),))


for _name in ("__setitem__", "__delitem__", "clear", "pop", "popitem", "update", "__ior__"):
    setattr(ParamState, _name, _bumping(_name, ParamState))


class StateDict(defaultdict):
    """`optimizer.state`: see the module docstring."""

    def __init__(self, items=()) -> None:
        super().__init__(None)
        self.version = Version()
        for key, value in dict(items).items():
            super().__setitem__(key, self._own(value))

    def _own(self, value):
        # Only dict entries (a param's state) are tracked; anything else, as
        # torch's own tests and hooks store under non-param keys, is kept as it is.
        if not isinstance(value, dict) or isinstance(value, ParamState) and value.version is self.version:
            return value
        return ParamState(value, version=self.version)

    def _bump(self) -> None:
        self.version.n += 1

    def __missing__(self, key):
        # A new empty entry changes nothing a plan holds: no bump.
        value = ParamState(version=self.version)
        super().__setitem__(key, value)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, self._own(value))
        self._bump()

    def setdefault(self, key, default=None):
        if key in self:
            return self[key]
        self[key] = {} if default is None else default
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def copy(self):
        return StateDict(self)

    def __reduce__(self):  # pickles as torch's own defaultdict(dict) of plain dicts
        return (_plain_state, (dict(self.items()),))


def plain(value):
    """A ParamState as the plain dict it stands for; any other value as it is."""
    return dict(value) if isinstance(value, ParamState) else value


def _plain_state(items):
    return defaultdict(dict, {k: plain(v) for k, v in items.items()})


for _name in ("__delitem__", "clear", "pop", "popitem"):
    setattr(StateDict, _name, _bumping(_name, StateDict))


class ParamList(list):
    """`param_group["params"]`; `version` counts its mutations."""

    __slots__ = ("version",)

    def __init__(self, items=()) -> None:
        super().__init__(items)
        self.version = 0

    def _bump(self) -> None:
        self.version += 1

    def __reduce__(self):  # pickles as a plain list
        return (list, (list(self),))


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop",
              "remove", "clear", "sort", "reverse"):
    setattr(ParamList, _name, _bumping(_name, ParamList))
