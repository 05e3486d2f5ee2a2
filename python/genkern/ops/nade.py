"""The NADE family as torch ops: registration (`genkern::`), fake implementations, autograd.

Each op takes an explicit backend name, resolved by the public functions in genkern.nade: `cpu` or `cuda`
(the compiled kernels), `triton`, or `reference`. Kernel backends get contiguous inputs and preallocated
outputs. x is a float tensor of the parameters' dtype here (the public functions convert it). Forward saves
nothing beyond its inputs: backward reruns the recurrence (backwards) in the fused backward op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import nade as ref
from ._backends import kernels, to_unsigned

INT64_MAX = (1 << 63) - 1


def _empty(shape, like: Tensor) -> Tensor:
    return torch.empty(list(shape), dtype=like.dtype, device=like.device)


def _require(ok: bool, message: str) -> None:
    """The ops are public too (torch.ops.genkern.*): check what the kernels rely on, for every backend."""
    if not ok:
        raise ValueError(message)


def check_params(weight: Tensor, c: Tensor, v: Tensor, b: Tensor) -> tuple[int, int]:
    """(D, H) of parameters W (H, D), c (H), V (D, H), b (D) of one dtype and device."""
    _require(weight.dim() == 2, f"weight has shape {tuple(weight.shape)}, expected (H, D)")
    hidden, dims = weight.shape
    for name, t, shape in (("c", c, (hidden,)), ("v", v, (dims, hidden)), ("b", b, (dims,))):
        _require(tuple(t.shape) == shape, f"{name} has shape {tuple(t.shape)}, expected {shape}")
        _require(t.dtype == weight.dtype and t.device == weight.device, f"{name} differs from weight in dtype or device")
    return dims, hidden


def _check_x(x: Tensor, weight: Tensor, dims: int) -> None:
    _require(x.dim() == 2 and x.shape[1] == dims, f"x has shape {tuple(x.shape)}, expected (B, {dims})")
    _require(x.dtype == weight.dtype and x.device == weight.device, "x differs from weight in dtype or device")


def check_sample_range(num_samples: int, first: int, dims: int) -> None:
    """Stream indices (first + s) * D + i must fit int64, or two samples would share their noise."""
    _require(num_samples >= 0, f"num_samples must be >= 0, got {num_samples}")
    _require(first >= 0, f"first must be >= 0, got {first}")
    _require((first + num_samples) * max(dims, 1) <= INT64_MAX,
             "(first + num_samples) * D must stay below 2^63 (the stream index of the last draw)")


def _kernel_args(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


# ---------------------------------------------------------------------------------------------------------
# nade_log_prob: log p(x) per example, in nats
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::nade_log_prob", mutates_args=())
def nade_log_prob(x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor, backend: str) -> Tensor:
    dims, _ = check_params(weight, c, v, b)
    _check_x(x, weight, dims)
    if backend == "reference":
        return ref.log_prob(x, weight, c, v, b).contiguous()
    out = _empty((x.shape[0],), weight)
    kernels("nade", backend).log_prob(*_kernel_args(x, weight, c, v, b), out)
    return out


@nade_log_prob.register_fake
def _(x, weight, c, v, b, backend):
    return _empty((x.shape[0],), weight)


@torch.library.custom_op("genkern::nade_log_prob_backward", mutates_args=())
def nade_log_prob_backward(grad_out: Tensor, x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_weight, grad_c, grad_v, grad_b) of sum_n grad_out[n] log p(x[n])."""
    dims, _ = check_params(weight, c, v, b)
    _check_x(x, weight, dims)
    _require(tuple(grad_out.shape) == (x.shape[0],), f"grad_out has shape {tuple(grad_out.shape)}, expected ({x.shape[0]},)")
    _require(grad_out.dtype == weight.dtype and grad_out.device == weight.device,
             "grad_out differs from weight in dtype or device")
    if backend == "reference":
        return tuple(t.contiguous() for t in ref.log_prob_backward(grad_out, x, weight, c, v, b))
    grads = [_empty(t.shape, weight) for t in (weight, c, v, b)]
    kernels("nade", backend).log_prob_backward(*_kernel_args(grad_out, x, weight, c, v, b), *grads)
    return tuple(grads)


@nade_log_prob_backward.register_fake
def _(grad_out, x, weight, c, v, b, backend):
    return tuple(_empty(t.shape, weight) for t in (weight, c, v, b))


def _setup(ctx, inputs, output):
    x, weight, c, v, b, backend = inputs
    ctx.save_for_backward(x, weight, c, v, b)
    ctx.backend = backend


def _grad(ctx, grad_out):
    x, weight, c, v, b = ctx.saved_tensors
    grads = nade_log_prob_backward(grad_out.contiguous(), x, weight, c, v, b, ctx.backend)
    return None, *grads, None  # x is data: no gradient


nade_log_prob.register_autograd(_grad, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------------
# nade_sample: samples first .. first + num_samples - 1 from the genkern stream (seed, offset)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::nade_sample", mutates_args=())
def nade_sample(weight: Tensor, c: Tensor, v: Tensor, b: Tensor, num_samples: int, seed: int, offset: int,
                first: int, backend: str) -> Tensor:
    """(num_samples, D) of 0.0 / 1.0 in the parameters' dtype. seed and offset are uint64 carried as int64."""
    dims, _ = check_params(weight, c, v, b)
    check_sample_range(num_samples, first, dims)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        return ref.sample(num_samples, weight, c, v, b, seed, offset, first).contiguous()
    out = _empty((num_samples, dims), weight)
    kernels("nade", backend).sample(*_kernel_args(weight, c, v, b), out, seed, offset, first)
    return out


@nade_sample.register_fake
def _(weight, c, v, b, num_samples, seed, offset, first, backend):
    return _empty((num_samples, weight.shape[1]), weight)
