"""Reference implementation of the NADE family (shared/math.md, section 4): the spec.

NADE (Larochelle & Murray, 2011) models a binary vector x in {0, 1}^D autoregressively, with parameters
W (H, D), c (H), V (D, H), b (D) shared across the D conditionals:

    a_1 = c,   a_{i+1} = a_i + W[:, i] x_i,   h_i = sigmoid(a_i),   l_i = b_i + V_i . h_i,
    p(x_i = 1 | x_<i) = sigmoid(l_i),   log p(x) = sum_i x_i l_i - softplus(l_i)   (nats).

Sampling draws dimension i of sample s (s counted from `first`) from the genkern stream (seed, offset) at
element s * D + i: with u = ((bits >> 8) + 0.5) 2^-24 the stream's uniform, x_i = 1 iff u < p(x_i = 1 | x_<i),
compared exactly. A sample therefore depends on (seed, offset, s) only, never on how many are drawn at once.

Half types compute in float32, as the kernels do; random uniforms are exact (float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import random as _random


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def logits(x, weight, c, v, b):
    """l (B, D): the logit of p(x_i = 1 | x_<i) for each example and dimension. x (B, D), W (H, D), c (H),
    V (D, H), b (D). The pre-activations a_i = c + sum_{k < i} W[:, k] x_k come from one exclusive cumulative
    sum over k, (B, H, D) in memory."""
    x, weight, c, v, b = (_compute(t) for t in (x, weight, c, v, b))
    steps = x[:, None, :] * weight[None]  # W[:, k] x_k, (B, H, D)
    h = torch.sigmoid(c[None, :, None] + _sum_before(steps))
    return b + torch.einsum("bhd,dh->bd", h, v)


def _sum_before(t: torch.Tensor) -> torch.Tensor:
    """[..., i] = sum over k < i of t[..., k] (exclusive cumulative sum over the last dim)."""
    return F.pad(t.cumsum(-1), (1, 0))[..., :-1]


def log_prob(x, weight, c, v, b):
    """log p(x) in nats, (B,), in the parameters' dtype (half types: computed in float32, rounded once)."""
    l = logits(x, weight, c, v, b)
    return (_compute(x) * l - F.softplus(l)).sum(-1).to(weight.dtype)


def sample(num_samples: int, weight, c, v, b, seed: int, offset: int = 0, first: int = 0):
    """(num_samples, D) samples first .. first + num_samples - 1, 0.0 / 1.0 in the parameters' dtype: one step
    per dimension, as written in the module docstring."""
    dtype = weight.dtype
    weight, c, v, b = (_compute(t) for t in (weight, c, v, b))
    hidden, dims = weight.shape
    device = weight.device
    index = (torch.arange(num_samples, dtype=torch.int64)[:, None] + first) * dims + torch.arange(dims)
    bits = _bits_at(index.reshape(-1), seed, offset).reshape(num_samples, dims).to(device)
    # u < p  <=>  2k + 1 < p 2^25 with k = bits >> 8, both sides exact in float64.
    twice_u = (2 * (bits >> 8) + 1).to(torch.float64)
    x = torch.zeros(num_samples, dims, dtype=weight.dtype, device=device)
    a = c.expand(num_samples, hidden).clone()
    for i in range(dims):
        p = torch.sigmoid(b[i] + torch.sigmoid(a) @ v[i])
        x[:, i] = (twice_u[:, i] < p.to(torch.float64) * 2.0**25).to(weight.dtype)
        a = a + x[:, i, None] * weight[:, i]
    return x.to(dtype)


def log_prob_backward(grad_out, x, weight, c, v, b):
    """(grad_weight, grad_c, grad_v, grad_b) of sum_n grad_out[n] log p(x[n]), written out: what the backward
    kernels compute (they run the recurrence backwards instead of holding (B, H, D) in memory)."""
    dtype = weight.dtype
    g, x, weight, c, v, b = (_compute(t) for t in (grad_out, x, weight, c, v, b))
    h = torch.sigmoid(c[None, :, None] + _sum_before(x[:, None, :] * weight[None]))  # h[n, :, i] = h_i
    l = b + torch.einsum("bhd,dh->bd", h, v)
    delta = g[:, None] * (x - torch.sigmoid(l))  # dL/dl_i
    da = delta[:, None, :] * v.t()[None] * h * (1 - h)  # dL/da_i, (B, H, D)
    after = _sum_before(da.flip(-1)).flip(-1)  # sum over steps i > k
    grads = (torch.einsum("bhd,bd->hd", after, x), da.sum((0, 2)), torch.einsum("bd,bhd->dh", delta, h),
             delta.sum(0))
    return tuple(t.to(dtype) for t in grads)


def _bits_at(index: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """Stream elements at the given (int64) indices: lane index % 4 of Philox block index // 4."""
    blocks = index >> 2
    mask = _random.MASK32
    words = _random.philox4x32_10(blocks & mask, blocks >> 32, torch.full_like(blocks, offset & mask),
                                  torch.full_like(blocks, (offset >> 32) & mask), seed & mask, (seed >> 32) & mask)
    return torch.stack(words, dim=-1).gather(-1, (index & 3)[:, None])[:, 0]
