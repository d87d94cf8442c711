"""Argument checks shared by the public constructors (one message format)."""
from __future__ import annotations


def check_int(name: str, value, minimum: int) -> int:
    """`value` as an int >= minimum (bools refused), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_values_in(t, low, high, exc: type, message: str) -> None:
    """Every value of tensor `t` in [low, high], else `exc(message)`. Off the CPU
    the check runs on the device (torch._assert_async, a device-side assert like
    torch's own index checks), so that it never synchronises with the host."""
    import torch

    if t.numel() == 0:
        return
    if t.device.type == "cpu":
        if bool(t.min() < low) or bool(t.max() > high):
            raise exc(f"{message}, got values in [{t.min().item()}, {t.max().item()}]")
    else:
        torch._assert_async(((t >= low) & (t <= high)).all(), message)
