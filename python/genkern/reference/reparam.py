"""Reference implementations of the reparam family (shared/math.md, section 2).

Gradients are those of these functions (autograd through them); `vjp` below gives them to the
backward ops of the reference backend.
"""
from __future__ import annotations

import math

import torch

from .random import randn

LOG_2PI = math.log(2.0 * math.pi)


def _compute(x: torch.Tensor | None) -> torch.Tensor | None:
    """Half types compute in float32, as the kernels do."""
    if x is not None and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def reparameterize(mu, logvar, eps=None, seed=0, offset=0, num_samples=None):
    """z = mu + exp(logvar / 2) * eps, with eps the stream's normals for (seed, offset) unless given."""
    shape = tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)
    if eps is None:
        eps = randn(shape, seed, offset, dtype=_compute(mu).dtype, device=mu.device)
    z = _compute(mu) + torch.exp(0.5 * _compute(logvar)) * _compute(eps)
    return z.to(mu.dtype)


def gaussian_kl(mu, logvar, dim=-1):
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over `dim`."""
    mu, logvar, dtype = _compute(mu), _compute(logvar), mu.dtype
    return (0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar)).sum(dim).to(dtype)


def reparameterize_kl(mu, logvar, eps=None, seed=0, offset=0, dim=-1):
    return reparameterize(mu, logvar, eps, seed, offset), gaussian_kl(mu, logvar, dim)


def gaussian_log_prob(z, mu=None, logvar=None, dim=-1):
    """log N(z; mu, exp(logvar)) summed over `dim`; mu and logvar default to 0 (standard normal)."""
    dtype = z.dtype
    z = _compute(z)
    mu = torch.zeros_like(z) if mu is None else _compute(mu)
    logvar = torch.zeros_like(z) if logvar is None else _compute(logvar)
    d = z - mu
    return (-0.5 * (LOG_2PI + logvar + d * d * torch.exp(-logvar))).sum(dim).to(dtype)


def iwae_log_weights(log_px_z, z, mu, logvar):
    """log w[k, b] = log p(x | z_k) + log p(z_k) - log q(z_k | x) for z (K, B, D), mu and logvar (B, D)."""
    return _compute(log_px_z) + gaussian_log_prob(_compute(z), None, None, -1) - gaussian_log_prob(
        _compute(z), _compute(mu), _compute(logvar), -1
    )


def iwae_bound(log_px_z, z, mu, logvar):
    """The importance-weighted bound per example: logsumexp_k log w - log K."""
    log_w = iwae_log_weights(log_px_z, z, mu, logvar)
    return (torch.logsumexp(log_w, dim=0) - math.log(z.shape[0])).to(z.dtype)


def vjp(fn, inputs, grad_outputs):
    """Gradients of fn(*inputs) w.r.t. the tensor inputs (None elsewhere), by autograd through the reference."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) else x for x in inputs]
        outputs = fn(*leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        grads = torch.autograd.grad([o for o, _ in pairs], tensors, [g for _, g in pairs], allow_unused=True)
    it = iter(grads)
    return [next(it) if isinstance(x, torch.Tensor) else None for x in inputs]
