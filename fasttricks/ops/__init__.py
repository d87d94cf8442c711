"""Per-op references (pure torch, the formulas) and plan dispatchers."""
from fasttricks.ops.adam import adam_reference_, make_adam_plan
from fasttricks.ops.sgd import make_sgd_plan, sgd_reference_

__all__ = ["adam_reference_", "make_adam_plan", "sgd_reference_", "make_sgd_plan"]
