"""The CUDA backend's plans: the device plans of ops/adam.py and ops/sgd.py
with the launch done by the extension fasttricks._C_cuda."""
from __future__ import annotations

from fasttricks import _backends
from fasttricks.ops._device import scalar_arg
from fasttricks.ops.adam import DeviceAdamPlan
from fasttricks.ops.sgd import DeviceSgdPlan


def _launch_adam(tables, *, param_dtype, state_dtype, lr, beta1, beta2, eps, weight_decay, grad_mul,
                 grad_scale, found_inf, avg_coef, amsgrad, decoupled, average, device):
    ptrs, numels, chunk_tensor, chunk_start, n, _ = tables
    lr_value, lr_tensor = scalar_arg(lr, device)
    _backends.cuda_ext().adam_step(ptrs, numels, chunk_tensor, chunk_start, n, param_dtype, state_dtype,
                                   lr_value, lr_tensor, float(beta1), float(beta2), float(eps),
                                   float(weight_decay), float(grad_mul), grad_scale, found_inf, float(avg_coef),
                                   amsgrad, decoupled, average)


def _launch_sgd(tables, *, param_dtype, state_dtype, lr, weight_decay, momentum, dampening, grad_mul,
                grad_scale, found_inf, avg_coef, nesterov, decoupled, average, device):
    ptrs, numels, chunk_tensor, chunk_start, n, _ = tables
    lr_value, lr_tensor = scalar_arg(lr, device)
    _backends.cuda_ext().sgd_step(ptrs, numels, chunk_tensor, chunk_start, n, param_dtype, state_dtype,
                                  lr_value, lr_tensor, float(weight_decay), float(momentum), float(dampening),
                                  float(grad_mul), grad_scale, found_inf, float(avg_coef), nesterov, decoupled,
                                  average)


class CudaAdamPlan(DeviceAdamPlan):
    launch = staticmethod(_launch_adam)


class CudaSgdPlan(DeviceSgdPlan):
    launch = staticmethod(_launch_sgd)
