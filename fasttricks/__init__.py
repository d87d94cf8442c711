"""fasttricks: fused, drop-in PyTorch optimizers and the classic training tricks.

Nothing here touches a GPU or compiles anything at import; see
:func:`fasttricks.backends` for which kernels loaded.
"""
from fasttricks._backends import backends
from fasttricks import losses, mixup, models, ops, optim, sampling, schedules, tricks
from fasttricks.lr_find import lr_find

__version__ = "0.1.0"
__all__ = ["backends", "losses", "lr_find", "mixup", "models", "ops", "optim", "sampling", "schedules", "tricks", "__version__"]
