"""The causal_conv1d family as torch ops: registration (`genkern::`), fake implementations, autograd.

Each op takes an explicit backend name, resolved by the public functions in genkern.causal_conv1d:
`cpu` or `cuda` (the compiled kernels), `triton`, or `reference`. Kernel backends get contiguous inputs and
preallocated outputs. The activation travels as its name ("none", "silu", "tanh"); backward recomputes the
pre-activation instead of forward saving it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import reduce_shape
from ..reference import causal_conv1d as ref
from ._backends import kernels

_ACTIVATION_CODES = {name: code for code, name in enumerate(ref.ACTIVATIONS)}  # the kernels' enum


def _contig(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def _empty(shape, like: Tensor) -> Tensor:
    return torch.empty(list(shape), dtype=like.dtype, device=like.device)


def _require(ok: bool, message: str) -> None:
    """The ops are public too (torch.ops.genkern.*): check what the kernels rely on, for every backend."""
    if not ok:
        raise ValueError(message)


def _check_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, activation: str, step: bool) -> int:
    """Checks shared by the convolution ops; returns C_out."""
    _require(x.dim() == (2 if step else 3), f"x has shape {tuple(x.shape)}, expected {'(B, C)' if step else '(B, C, L)'}")
    _require(weight.dim() in (2, 3) and weight.shape[-1] >= 1,
             f"weight has shape {tuple(weight.shape)}, expected (C, K) or (C_out, C_in, K) with K >= 1")
    _require(weight.shape[0 if weight.dim() == 2 else 1] == x.shape[1],
             f"weight of shape {tuple(weight.shape)} does not match the {x.shape[1]} channels of x")
    c_out = weight.shape[0]
    for name, t in (("weight", weight), ("bias", bias)):
        _require(t is None or (t.dtype == x.dtype and t.device == x.device), f"{name} differs from x in dtype or device")
    _require(bias is None or tuple(bias.shape) == (c_out,), f"bias must have shape ({c_out},)")
    _require(dilation >= 1, "dilation must be >= 1")
    _require(activation in _ACTIVATION_CODES, f"activation must be one of {ref.ACTIVATIONS}, got {activation!r}")
    return c_out


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d: y = act(bias + causal dilated convolution of x)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, activation: str,
                  backend: str) -> Tensor:
    c_out = _check_conv(x, weight, bias, dilation, activation, step=False)
    if backend == "reference":
        return ref.causal_conv1d(x, weight, bias, dilation, activation).contiguous()
    y = _empty((x.shape[0], c_out, x.shape[2]), x)
    kernels("causal_conv1d", backend).forward(
        x.contiguous(), weight.contiguous(), _contig(bias), y, dilation, _ACTIVATION_CODES[activation]
    )
    return y


@causal_conv1d.register_fake
def _(x, weight, bias, dilation, activation, backend):
    return _empty((x.shape[0], weight.shape[0], x.shape[2]), x)


@torch.library.custom_op("genkern::causal_conv1d_backward", mutates_args=())
def causal_conv1d_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int,
                           activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); grad_bias is empty (0,) without a bias."""
    c_out = _check_conv(x, weight, bias, dilation, activation, step=False)
    _require(tuple(grad_y.shape) == (x.shape[0], c_out, x.shape[2]), f"grad_y has shape {tuple(grad_y.shape)}")
    _require(grad_y.dtype == x.dtype and grad_y.device == x.device, "grad_y differs from x in dtype or device")
    no_bias = _empty((0,), x)
    if backend == "reference":
        gx, gw, gb = ref.causal_conv1d_backward(grad_y, x, weight, bias, dilation, activation)
        return gx.contiguous(), gw.contiguous(), no_bias if gb is None else gb.contiguous()
    grad_x, grad_w = _empty(x.shape, x), _empty(weight.shape, x)
    grad_b = _empty((c_out,), x) if bias is not None else None
    kernels("causal_conv1d", backend).backward(
        grad_y.contiguous(), x.contiguous(), weight.contiguous(), _contig(bias), grad_x, grad_w, grad_b, dilation,
        _ACTIVATION_CODES[activation],
    )
    return grad_x, grad_w, no_bias if grad_b is None else grad_b


@causal_conv1d_backward.register_fake
def _(grad_y, x, weight, bias, dilation, activation, backend):
    return _empty(x.shape, x), _empty(weight.shape, x), _empty((weight.shape[0],) if bias is not None else (0,), x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, dilation, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (dilation, activation, backend)


def _conv_grad(ctx, grad_y):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_b = causal_conv1d_backward(grad_y, x, weight, bias, *ctx.args)
    return grad_x, grad_w, grad_b if bias is not None else None, None, None, None


causal_conv1d.register_autograd(_conv_grad, setup_context=_conv_setup)


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d_update: one generation step with a rolling state of past inputs (mutated in place)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::causal_conv1d_update", mutates_args=("state",))
def causal_conv1d_update(x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int,
                         activation: str, backend: str) -> Tensor:
    """y (B, C_out) for the new input x (B, C_in); state (B, C_in, W >= (K - 1) * dilation) shifts by one.
    Not differentiable: it serves generation, where the state's history is gone."""
    c_out = _check_conv(x, weight, bias, dilation, activation, step=True)
    need = ref.receptive_field(weight.shape[-1], dilation)
    _require(state.dim() == 3 and tuple(state.shape[:2]) == tuple(x.shape) and state.shape[2] >= need,
             f"state has shape {tuple(state.shape)}, expected ({x.shape[0]}, {x.shape[1]}, W >= {need})")
    _require(state.dtype == x.dtype and state.device == x.device, "state differs from x in dtype or device")
    if backend == "reference":
        y, new_state = ref.causal_conv1d_update(x, state, weight, bias, dilation, activation)
        state.copy_(new_state)
        return y.contiguous()
    y = _empty((x.shape[0], c_out), x)
    work = state if state.is_contiguous() else state.contiguous()
    kernels("causal_conv1d", backend).update(
        x.contiguous(), work, weight.contiguous(), _contig(bias), y, dilation, _ACTIVATION_CODES[activation]
    )
    if work is not state:
        state.copy_(work)
    return y


@causal_conv1d_update.register_fake
def _(x, state, weight, bias, dilation, activation, backend):
    return _empty((x.shape[0], weight.shape[0]), x)


# ---------------------------------------------------------------------------------------------------------
# gated_activation: tanh(a) * sigmoid(b) over the two halves of one dim
# ---------------------------------------------------------------------------------------------------------
def _gated_shape(x: Tensor, dim: int) -> tuple[int, int]:
    """(outer, inner) of x seen as (outer, 2, inner): the halves are contiguous runs of inner elements."""
    _require(0 <= dim < x.dim(), f"dim {dim} out of range for {x.dim()} dims")
    _require(x.shape[dim] % 2 == 0, f"dim {dim} of x has odd size {x.shape[dim]}: it must split in two halves")
    outer, size, inner = reduce_shape(x.shape, dim, dim + 1)
    return outer, size // 2 * inner


def _halved(x: Tensor, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] //= 2
    return shape


@torch.library.custom_op("genkern::gated_activation", mutates_args=())
def gated_activation(x: Tensor, dim: int, backend: str) -> Tensor:
    outer, inner = _gated_shape(x, dim)
    if backend == "reference":
        return ref.gated_activation(x, dim).contiguous()
    y = _empty(_halved(x, dim), x)
    kernels("causal_conv1d", backend).gated(x.contiguous(), y, outer, inner)
    return y


@gated_activation.register_fake
def _(x, dim, backend):
    return _empty(_halved(x, dim), x)


@torch.library.custom_op("genkern::gated_activation_backward", mutates_args=())
def gated_activation_backward(grad_y: Tensor, x: Tensor, dim: int, backend: str) -> Tensor:
    outer, inner = _gated_shape(x, dim)
    _require(list(grad_y.shape) == _halved(x, dim), f"grad_y has shape {tuple(grad_y.shape)}")
    _require(grad_y.dtype == x.dtype and grad_y.device == x.device, "grad_y differs from x in dtype or device")
    if backend == "reference":
        return ref.gated_activation_backward(grad_y, x, dim).contiguous()
    grad_x = _empty(x.shape, x)
    kernels("causal_conv1d", backend).gated_backward(grad_y.contiguous(), x.contiguous(), grad_x, outer, inner)
    return grad_x


@gated_activation_backward.register_fake
def _(grad_y, x, dim, backend):
    return _empty(x.shape, x)


def _gated_setup(ctx, inputs, output):
    x, dim, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (dim, backend)


def _gated_grad(ctx, grad_y):
    (x,) = ctx.saved_tensors
    return gated_activation_backward(grad_y, x, *ctx.args), None, None


gated_activation.register_autograd(_gated_grad, setup_context=_gated_setup)
