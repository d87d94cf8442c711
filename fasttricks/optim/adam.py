"""Drop-in Adam and AdamW: torch's classes with a fused multi-tensor step."""
from __future__ import annotations

import torch

from fasttricks.ops.adam import ADAM_FAMILY, ADAMW_FAMILY
from fasttricks.optim._fused import FusedOptimizerMixin

__all__ = ["Adam", "AdamW"]

_EXTRA_DOC = """
    fasttricks additions (keyword-only):
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda". "auto" picks the
            fastest backend available for the params' device; an explicit backend
            that is unavailable raises RuntimeError.
        master_weights: for bf16/fp16 params keep an fp32 master copy in the state
            ("master_param") and fp32 moments; the math runs on the master and the
            param receives it rounded.
        stochastic_rounding: for bf16/fp16 params without master weights, round
            each fp32 update to the param's dtype stochastically (and the
            moments too when they are bf16/fp16), so that updates below half an
            ulp still move the weights on average. Reproducible: the random bits
            depend on (rounding_seed, step, param index, element) only.
        state_dtype: None (fp32 with master weights, else the param's dtype),
            torch.float32 or torch.bfloat16: the dtype of exp_avg / exp_avg_sq.
        rounding_seed: the seed of the stochastic rounding, saved in state_dict().
        See docs/precision.md for when to choose which.
    The options are kept per param group beside `param_groups` (a group dict
    may carry them; see group_options / set_group_options), so that the
    groups hold torch's keys only.
    The step is always one fused pass: `foreach` is accepted and ignored.
    `fused=True` is torch's opt-in to the fused unscale under a GradScaler
    (the kernels divide by the scale and skip on found_inf); by default the
    scaler unscales and skips, as for torch's non-fused optimizers.
    `differentiable=True` runs torch's own step.
"""


class Adam(FusedOptimizerMixin, torch.optim.Adam):
    __doc__ = (torch.optim.Adam.__doc__ or "") + _EXTRA_DOC
    _family = ADAM_FAMILY

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend="auto", master_weights=False, stochastic_rounding=False,
                 state_dtype=None, rounding_seed=0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)
        self._ft_init(backend, master_weights, stochastic_rounding, state_dtype, rounding_seed)


class AdamW(FusedOptimizerMixin, torch.optim.AdamW):
    __doc__ = (torch.optim.AdamW.__doc__ or "") + _EXTRA_DOC
    _family = ADAMW_FAMILY

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 backend="auto", master_weights=False, stochastic_rounding=False, state_dtype=None, rounding_seed=0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused)
        self._ft_init(backend, master_weights, stochastic_rounding, state_dtype, rounding_seed)
