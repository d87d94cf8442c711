"""Bag-of-Tricks helpers (docs/tricks.md): random gradient (Wei), no bias
decay and zero gamma (Bag of Tricks), Fixup/ZeroInit-style initialisation and
shake-shake regularisation (Kolasiński's slides)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from fasttricks._checks import check_int

__all__ = ["RandomGradient", "param_groups", "zero_gamma_", "fixup_init_", "ShakeShake", "ShakeShakeBlock"]

_NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


class RandomGradient:
    """Random gradient (Wei; docs/tricks.md): the loss of each step is multiplied by r,
    r ~ U(low, high) ("uniform", default [0, 1]), or r following a triangular
    wave from low to high and back over 2 * `step_size` steps ("cyclic", the
    paper's future work with Smith's cyclical strategy).

        rg = RandomGradient()
        loss = rg(loss_fn(model(x), y)); loss.backward()   # scales the loss

    Since scaling the loss by r scales the gradient by r, a fasttricks
    optimizer can take r for free inside its fused step instead:

        rg.fold_into(optimizer)    # each optimizer.step() draws r into its gradient scale

    Use one or the other, not both. `seed` makes the draws reproducible.
    """

    def __init__(self, low: float = 0.0, high: float = 1.0, mode: str = "uniform", step_size: int = 100,
                 seed: int | None = None):
        low, high = float(low), float(high)
        if not 0.0 <= low <= high:
            raise ValueError(f"RandomGradient needs 0 <= low <= high, got low={low}, high={high}")
        if mode not in ("uniform", "cyclic"):
            raise ValueError(f"mode must be 'uniform' or 'cyclic', got {mode!r}")
        check_int("step_size", step_size, 1)
        self.low, self.high, self.mode, self.step_size = low, high, mode, step_size
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.initial_seed()) % (2**63))
        self.t = 0
        self.last = None
        self._handle = None

    def next_factor(self) -> float:
        """Draw (uniform) or compute (cyclic) the next r."""
        if self.mode == "uniform":
            u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
            r = self.low + (self.high - self.low) * u
        else:
            x = abs((self.t % (2 * self.step_size)) / self.step_size - 1.0)
            r = self.low + (self.high - self.low) * (1.0 - x)
        self.t += 1
        self.last = r
        return r

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.next_factor()

    def fold_into(self, optimizer) -> "RandomGradient":
        """Fold r into a fasttricks optimizer's gradient scale, drawn at each step."""
        if not hasattr(optimizer, "grad_multiplier"):
            raise TypeError("fold_into needs a fasttricks optimizer (it has grad_multiplier); "
                            "with another optimizer scale the loss: loss = rg(loss)")
        if self._handle is not None:
            raise RuntimeError("RandomGradient is already folded into an optimizer")

        def pre_hook(opt, args, kwargs):
            opt.grad_multiplier = self.next_factor()

        self._handle = optimizer.register_step_pre_hook(pre_hook)
        self._optimizer = optimizer
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._optimizer.grad_multiplier = 1.0
            self._handle = None

    def state_dict(self) -> dict:
        return {"t": self.t, "generator": self.generator.get_state(), "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.last = int(state["t"]), state["last"]
        self.generator.set_state(state["generator"])


def param_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool = True) -> list[dict]:
    """Parameter groups for an optimizer (Bag of Tricks, "no bias decay"): weight
    decay on conv / linear weights only; biases and normalisation-layer
    parameters (BN/LN/GN gamma and beta) go to a group with weight_decay=0.
    Frozen params (requires_grad=False) are left out. With
    no_bias_decay=False, one group with `weight_decay` for all."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if no_bias_decay and (isinstance(module, _NORMS) or name == "bias" or p.ndim <= 1):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@torch.no_grad()
def zero_gamma_(model: nn.Module) -> int:
    """Zero gamma (Bag of Tricks): set gamma = 0 in the last BN of every residual
    block, so each block starts as the identity. Blocks are modules with a
    `last_norm` (fasttricks.models) or torchvision-style BasicBlock (bn2) /
    Bottleneck (bn3). Returns the number of blocks changed."""
    count = 0
    for m in model.modules():
        norm = getattr(m, "last_norm", None)
        if norm is None and type(m).__name__ in ("BasicBlock", "Bottleneck"):
            norm = getattr(m, "bn3" if type(m).__name__ == "Bottleneck" else "bn2", None)
        if isinstance(norm, _NormBase) and norm.weight is not None:
            norm.weight.zero_()
            count += 1
    return count


@torch.no_grad()
def fixup_init_(model: nn.Module) -> int:
    """Fixup-style initialisation (Zhang et al. 2019; "ZeroInit" in Kolasiński's slides)
    for a network of L residual blocks with m convs per branch: He-initialise
    the branch convs, scale all but the last by L ** (-1 / (2m - 2)), zero the
    last conv of each branch, and zero the final linear layer, so that every
    block starts as the identity without relying on BN. Needs blocks that
    list their `branch_convs` (fasttricks.models). Returns L."""
    blocks = [m for m in model.modules() if hasattr(m, "branch_convs")]
    if not blocks:
        raise ValueError("fixup_init_: no residual blocks with branch_convs found")
    L = len(blocks)
    for block in blocks:
        convs = block.branch_convs
        m = len(convs)
        scale = L ** (-1.0 / (2 * m - 2)) if m > 1 else 1.0
        for conv in convs[:-1]:
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            conv.weight.mul_(scale)
        nn.init.zeros_(convs[-1].weight)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last_linear:
        nn.init.zeros_(last_linear[-1].weight)
        if last_linear[-1].bias is not None:
            nn.init.zeros_(last_linear[-1].bias)
    return L


class ShakeShake(torch.autograd.Function):
    """Shake-shake combination (Gastaldi 2017): forward alpha*a + (1-alpha)*b,
    backward with an independent beta: grads beta*g and (1-beta)*g."""

    @staticmethod
    def forward(ctx, a, b, alpha, beta):
        ctx.save_for_backward(beta)
        return alpha * a + (1 - alpha) * b

    @staticmethod
    def backward(ctx, grad):
        (beta,) = ctx.saved_tensors
        return beta * grad, (1 - beta) * grad, None, None


class ShakeShakeBlock(nn.Module):
    """A residual block with two 3x3-conv branches mixed by shake-shake
    ("Shake-Shake-Image": one alpha and beta per sample). In eval mode the
    branches are averaged (alpha = beta = 0.5)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.branch1 = self._branch(in_ch, out_ch, stride)
        self.branch2 = self._branch(in_ch, out_ch, stride)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                                          nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    @staticmethod
    def _branch(in_ch, out_ch, stride):
        return nn.Sequential(nn.ReLU(), nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch),
                             nn.ReLU(), nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch))

    @property
    def last_norm(self):
        return None  # two branches: zero gamma does not apply

    def forward(self, x):
        a, b = self.branch1(x), self.branch2(x)
        if self.training:
            shape = (x.shape[0],) + (1,) * (a.ndim - 1)
            alpha = torch.rand(shape, device=a.device, dtype=a.dtype)
            beta = torch.rand(shape, device=a.device, dtype=a.dtype)
            mixed = ShakeShake.apply(a, b, alpha, beta)
        else:
            mixed = 0.5 * (a + b)
        return mixed + (x if self.shortcut is None else self.shortcut(x))

