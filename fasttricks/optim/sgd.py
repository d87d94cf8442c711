"""Drop-in SGD and SGDW (decoupled weight decay, Kolasiński's slides) with a fused step."""
from __future__ import annotations

import torch

from fasttricks.ops.sgd import SGD_FAMILY
from fasttricks.optim._fused import FT_OPTION_NAMES, FusedOptimizerMixin

__all__ = ["SGD", "SGDW"]


class SGD(FusedOptimizerMixin, torch.optim.SGD):
    __doc__ = (torch.optim.SGD.__doc__ or "") + """
    fasttricks additions (keyword-only): ``backend`` ("auto" | "reference" |
    "cpu" | "triton" | "cuda"), ``master_weights`` (fp32 master copy and
    momentum for bf16/fp16 params), ``stochastic_rounding``, ``state_dtype``
    (of the momentum buffer) and ``rounding_seed``, as for fasttricks.optim.Adam.

    The momentum buffer enters the state on the first step that commits, as
    torch records it: a step skipped by found_inf creates none, and a buffer
    set to None (torch's reset idiom, or an old checkpoint) starts again with
    buf = g.
"""

    _family = SGD_FAMILY
    _decoupled_default = False
    # torch's SGD has no such key: it is one of our options (NOTE [group options])
    _option_names = FT_OPTION_NAMES + ("decoupled_weight_decay",)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend="auto",
                 master_weights=False, stochastic_rounding=False, state_dtype=None, rounding_seed=0):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._ft_init(backend, master_weights, stochastic_rounding, state_dtype, rounding_seed)

    @property
    def _option_defaults(self):
        return {"decoupled_weight_decay": self._decoupled_default}


class SGDW(SGD):
    """SGD with decoupled weight decay (SGDW): each step first shrinks the
    weights, ``p <- p * (1 - lr * weight_decay)``, then applies the SGD update
    to the raw gradient. Same arguments as :class:`SGD`."""

    _decoupled_default = True
