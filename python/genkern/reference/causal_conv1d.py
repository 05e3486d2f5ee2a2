"""Reference implementations of the causal_conv1d family (shared/math.md, section 4): the spec.

    y[b, o, l] = act(bias[o] + sum_{i, k} w[o, i, k] * x[b, i, l - (K - 1 - k) * dilation])

with x zero left of position 0, so output l sees inputs <= l only. A depthwise weight (C, K) pairs output
channel o with input channel o. `gated_activation` (WaveNet's tanh(a) * sigmoid(b) gate) lives here too:
it is the nonlinearity these convolutions feed. Half types compute in float32, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "silu", "tanh")


def _compute(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is not None and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _conv_weight(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The weight as F.conv1d takes it, and its groups: depthwise (C, K) is (C, 1, K) with C groups."""
    return (weight.unsqueeze(1), weight.shape[0]) if weight.dim() == 2 else (weight, 1)


def _activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    return z


def _activate_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2
    return torch.ones_like(z)


def receptive_field(kernel_size: int, dilation: int) -> int:
    """How many past inputs an output sees besides the current one: the causal left padding."""
    return (kernel_size - 1) * dilation


def _degenerate(x, weight) -> bool:
    """No length or no channels: F.conv1d rejects these, but the convolution is still well defined."""
    return x.shape[2] == 0 or x.shape[1] == 0 or weight.shape[0] == 0


def _pre_activation(x, weight, bias, dilation):
    if _degenerate(x, weight):
        z = _compute(x).new_zeros(x.shape[0], weight.shape[0], x.shape[2])
        return z if bias is None else z + _compute(bias)[:, None]
    w, groups = _conv_weight(_compute(weight))
    pad = receptive_field(weight.shape[-1], dilation)
    return F.conv1d(F.pad(_compute(x), (pad, 0)), w, _compute(bias), dilation=dilation, groups=groups)


def causal_conv1d(x, weight, bias=None, dilation=1, activation="none"):
    """x (B, C_in, L), weight (C_out, C_in, K) or depthwise (C, K), bias (C_out,) or None -> (B, C_out, L)."""
    return _activate(_pre_activation(x, weight, bias, dilation), activation).to(x.dtype)


def causal_conv1d_backward(grad_y, x, weight, bias=None, dilation=1, activation="none"):
    """(grad_x, grad_weight, grad_bias or None), written out: what the backward kernels compute."""
    gz = _compute(grad_y) * _activate_grad(_pre_activation(x, weight, bias, dilation), activation)
    grad_b = gz.sum((0, 2)).to(bias.dtype) if bias is not None else None
    if _degenerate(x, weight):
        return torch.zeros_like(x), torch.zeros_like(weight), grad_b
    w, groups = _conv_weight(_compute(weight))
    pad = receptive_field(weight.shape[-1], dilation)
    x_pad = F.pad(_compute(x), (pad, 0))
    grad_x = torch.nn.grad.conv1d_input(x_pad.shape, w, gz, dilation=dilation, groups=groups)[..., pad:]
    grad_w = torch.nn.grad.conv1d_weight(x_pad, w.shape, gz, dilation=dilation, groups=groups).reshape(weight.shape)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b


def causal_conv1d_update(x, state, weight, bias=None, dilation=1, activation="none"):
    """One generation step. x (B, C_in) is the next input; state (B, C_in, W), W >= (K - 1) * dilation, holds
    the W previous inputs, oldest first (zeros before the sequence starts: the causal padding). Returns
    (y (B, C_out), new_state): y is the convolution's output at x's position, new_state is state shifted left
    by one with x appended."""
    need = receptive_field(weight.shape[-1], dilation)
    window = torch.cat([state[..., state.shape[-1] - need:], x.unsqueeze(-1)], dim=-1)
    y = causal_conv1d(window, weight, bias, dilation, activation)[..., -1]
    new_state = torch.cat([state[..., 1:], x.unsqueeze(-1)], dim=-1) if state.shape[-1] else state
    return y, new_state


def gated_activation(x, dim=1):
    """tanh(a) * sigmoid(b) with (a, b) the two halves of `dim` of x, a first."""
    a, b = _compute(x).chunk(2, dim=dim)
    return (torch.tanh(a) * torch.sigmoid(b)).to(x.dtype)


def gated_activation_backward(grad_y, x, dim=1):
    a, b = _compute(x).chunk(2, dim=dim)
    t, s, g = torch.tanh(a), torch.sigmoid(b), _compute(grad_y)
    return torch.cat([g * (1 - t * t) * s, g * t * s * (1 - s)], dim=dim).to(x.dtype)
