"""Causal 1-D convolutions for autoregressive sequence models (WaveNet, Mamba-style short convolutions):
the public functions.

    y = genkern.causal_conv1d(x, weight, bias, dilation=2, activation="silu")   # x (B, C, L)
    y = genkern.causal_conv1d_update(x_t, state, weight, bias, dilation=2)      # one step, state updated
    h = genkern.gated_activation(y)                                              # tanh(a) * sigmoid(b)

Output l sees inputs l, l - d, ..., l - (K - 1) d only (zeros before the start). A (C, K) weight is
depthwise, a (C_out, C_in, K) weight a full convolution. Kernels on every backend: `cpu`, `cuda`,
`triton`, and the `reference` (eager PyTorch, the spec); see genkern.backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from . import backend as _backend
from .ops import causal_conv1d as _ops  # noqa: F401 - registers the genkern:: ops
from .reference.causal_conv1d import receptive_field

FAMILY = "causal_conv1d"
_MAX_DILATION = 2**31


def _activation(activation) -> str:
    if activation is None:
        return "none"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None, 'silu' or 'tanh', got {type(activation).__name__}")
    if activation not in ("silu", "tanh"):
        raise ValueError(f"activation must be None, 'silu' or 'tanh', got {activation!r}")
    return activation


def _weight_and_bias(weight, bias, x: Tensor) -> int:
    """Checks weight (C, K) or (C_out, C_in, K) against x's channels, and bias (C_out,); returns C_out."""
    _checks.float_tensor("weight", weight)
    _checks.same_place("weight", weight, "x", x)
    if weight.dim() not in (2, 3) or weight.shape[-1] < 1:
        raise ValueError(f"weight must have shape (C, K) or (C_out, C_in, K) with K >= 1, got {tuple(weight.shape)}")
    c_in = weight.shape[0] if weight.dim() == 2 else weight.shape[1]
    if c_in != x.shape[1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the {x.shape[1]} channels of x")
    if bias is not None:
        _checks.like("bias", bias, "x", x, shape=(weight.shape[0],))
    return weight.shape[0]


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, dilation: int = 1,
                  activation: str | None = None, backend: str | None = None) -> Tensor:
    """y[b, o, l] = act(bias[o] + sum_{i, k} weight[o, i, k] x[b, i, l - (K - 1 - k) dilation]), x zero
    before position 0. x (B, C_in, L); weight (C_out, C_in, K), or (C, K) depthwise (output o sees input o
    only); bias (C_out,) or None; activation None, "silu" or "tanh". Returns (B, C_out, L), differentiable
    w.r.t. x, weight and bias."""
    _checks.float_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, C, L), got {tuple(x.shape)}")
    _weight_and_bias(weight, bias, x)
    dilation = _checks.integer("dilation", dilation, low=1, high=_MAX_DILATION)
    act = _activation(activation)
    name = _backend.resolve(backend, x.device, x.dtype, FAMILY)
    return torch.ops.genkern.causal_conv1d(x, weight, bias, dilation, act, name)


def causal_conv1d_update(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                         dilation: int = 1, activation: str | None = None, backend: str | None = None) -> Tensor:
    """One step of causal_conv1d for generation: x (B, C_in) is the next input, and the result (B, C_out)
    equals causal_conv1d's output at that position.

    state (B, C_in, W) holds the W previous inputs, oldest first, with W >= (K - 1) * dilation (the
    receptive field; extra older entries are ignored); start a sequence with
    zeros, which is the convolution's causal padding. state is updated in place: shifted left by one
    with x appended. Not differentiable."""
    _checks.float_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, C) (one step), got {tuple(x.shape)}")
    _weight_and_bias(weight, bias, x)
    dilation = _checks.integer("dilation", dilation, low=1, high=_MAX_DILATION)
    need = receptive_field(weight.shape[-1], dilation)
    _checks.float_tensor("state", state)
    _checks.same_place("state", state, "x", x)
    if state.dim() != 3 or tuple(state.shape[:2]) != tuple(x.shape) or state.shape[2] < need:
        raise ValueError(f"state has shape {tuple(state.shape)}, expected ({x.shape[0]}, {x.shape[1]}, W) "
                         f"with W >= (K - 1) * dilation = {need}")
    act = _activation(activation)
    name = _backend.resolve(backend, x.device, x.dtype, FAMILY)
    return torch.ops.genkern.causal_conv1d_update(x, state, weight, bias, dilation, act, name)


def gated_activation(x: Tensor, dim: int = 1, *, backend: str | None = None) -> Tensor:
    """tanh(a) * sigmoid(b), with a and b the first and second halves of x along `dim`, in one pass.
    Differentiable; the result has half of x's size along `dim`."""
    _checks.float_tensor("x", x)
    dim = _checks.integer("dim", dim)
    if not -max(x.dim(), 1) <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of {x.dim()} dims")
    dim %= x.dim()
    if x.shape[dim] % 2:
        raise ValueError(f"x has odd size {x.shape[dim]} along dim {dim}: it must split into two halves")
    name = _backend.resolve(backend, x.device, x.dtype, FAMILY)
    return torch.ops.genkern.gated_activation(x, dim, name)
