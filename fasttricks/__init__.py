"""fasttricks: fused, drop-in PyTorch optimizers and the classic training tricks.

Nothing here touches a GPU or compiles anything at import; see
:func:`fasttricks.backends` for which kernels loaded.
"""
from fasttricks._backends import backends
from fasttricks import ops, optim, sampling

__version__ = "0.1.0"
__all__ = ["backends", "ops", "optim", "sampling", "__version__"]
