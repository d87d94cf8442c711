"""Argument checks shared by the public constructors (one message format)."""
from __future__ import annotations


def check_int(name: str, value, minimum: int) -> int:
    """`value` as an int >= minimum (bools refused), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
