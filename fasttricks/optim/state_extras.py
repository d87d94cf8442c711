"""What the optimizers and samplers keep in optimizer.state besides torch's own entries.

And the helpers that read and write it.

NOTE [state-resident extras]
What the optimizer and its samplers keep besides torch's own state lives in
`optimizer.state[p]` too, under keys that hold a '/' (torch's never do), so
that whatever saves the optimizer saves them: plain state_dict(), DCP
flattened or not, FSDP2's sharded state dicts, the frameworks' checkpoints.
A sampler's average of p is `state[p]["<sampler key>/average"]`; its
counters, hyper-parameters and averaged buffers, and the stochastic-rounding
counters ("rounding/seed", "rounding/step"), sit as ints, floats and tensors
in the state of the anchor param, the first param that requires grad (the
values are refreshed by every state_dict()). The math never reads these keys,
and a state that holds only them counts as empty (own_state_empty).
"""
from __future__ import annotations

from fasttricks.ops.family import is_extra_key, own_state_empty

__all__ = ["anchor_param", "write_state", "drop_extras", "is_extra_key", "own_state_empty",
           "ROUNDING_SEED_KEY", "ROUNDING_STEP_KEY", "LEGACY_SAMPLER_STATE_KEY", "LEGACY_ROUNDING_STATE_KEY"]

# Checkpoints of earlier versions kept these outside "state" (still read).
LEGACY_SAMPLER_STATE_KEY = "fasttricks_samplers"
LEGACY_ROUNDING_STATE_KEY = "fasttricks_rounding"
# NOTE [stochastic rounding], NOTE [state-resident extras]: on the anchor param.
ROUNDING_SEED_KEY, ROUNDING_STEP_KEY = "rounding/seed", "rounding/step"

def anchor_param(optimizer):
    """NOTE [state-resident extras]: the param whose state holds the
    optimizer-wide extras: the first that requires grad (DCP keeps no state
    for the others), else the first."""
    first = None
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                return p
            first = p if first is None else first
    return first


def write_state(optimizer, writes) -> None:
    """[(param, key, value)] into optimizer.state; on a fasttricks optimizer
    without invalidating its plans (extras change nothing a plan holds)."""
    engine = optimizer.__dict__.get("_ft_engine")
    if engine is not None:
        engine.write_state(optimizer.state, writes)
    else:
        for p, key, value in writes:
            optimizer.state[p][key] = value


def drop_extras(optimizer, owners) -> None:
    """Remove from optimizer.state the extras of `owners` (sampler keys):
    every entry named "<owner>/..."."""
    prefixes = tuple(f"{k}/" for k in owners)
    if not prefixes:
        return
    for state in list(optimizer.state.values()):
        if isinstance(state, dict):
            for k in [k for k in state if isinstance(k, str) and k.startswith(prefixes)]:
                del state[k]
