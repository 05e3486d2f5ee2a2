"""Reference implementations of the reparam family (docs/math.md, section 2).

The gradients are written out below as well: they are what the backward kernels compute, and the
tests check them against autograd through the forward functions.
"""

from __future__ import annotations

import math

import torch

from ..random.reference import randn

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
    return (
        _compute(log_px_z)
        + gaussian_log_prob(_compute(z), None, None, -1)
        - gaussian_log_prob(_compute(z), _compute(mu), _compute(logvar), -1)
    )


def iwae_bound(log_px_z, z, mu, logvar):
    """The importance-weighted bound per example: logsumexp_k log w - log K."""
    log_w = iwae_log_weights(log_px_z, z, mu, logvar)
    return (torch.logsumexp(log_w, dim=0) - math.log(z.shape[0])).to(z.dtype)


# --- Gradients (docs/math.md, section 2), written out: they are the spec the backward kernels follow.


def _unsqueeze(g, dims, ndim):
    """A reduced gradient with the reduced dims put back as size 1, to broadcast over them."""
    for d in sorted(x % max(ndim, 1) for x in dims):
        g = g.unsqueeze(d) if ndim else g
    return g


def reparameterize_backward(grad_z, mu, logvar, eps=None, seed=0, offset=0):
    """(d/dmu, d/dlogvar): dz/dmu = 1, dz/dlogvar = exp(logvar / 2) * eps / 2, summed over samples."""
    dtype, g, lv = mu.dtype, _compute(grad_z), _compute(logvar)
    if eps is None:
        eps = randn(tuple(grad_z.shape), seed, offset, dtype=lv.dtype, device=mu.device)
    samples = tuple(range(g.dim() - mu.dim()))
    grad_mu = g.sum(samples) if samples else g.clone()
    grad_logvar = g * 0.5 * torch.exp(0.5 * lv) * _compute(eps)
    grad_logvar = grad_logvar.sum(samples) if samples else grad_logvar
    return grad_mu.to(dtype), grad_logvar.to(dtype)


def gaussian_kl_backward(grad_kl, mu, logvar, dim=-1):
    """(d/dmu, d/dlogvar) = (g mu, g (exp(logvar) - 1) / 2), g the gradient of the row."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    g = _unsqueeze(_compute(grad_kl), dims, mu.dim())
    m, lv = _compute(mu), _compute(logvar)
    grad_mu = (g * m).expand(m.shape).contiguous()
    grad_logvar = (g * 0.5 * (torch.exp(lv) - 1.0)).expand(m.shape).contiguous()
    return grad_mu.to(mu.dtype), grad_logvar.to(mu.dtype)


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps=None, seed=0, offset=0, dim=-1):
    grads = [torch.zeros_like(mu), torch.zeros_like(logvar)]
    if grad_z is not None:
        grads = [a + b for a, b in zip(grads, reparameterize_backward(grad_z, mu, logvar, eps, seed, offset))]
    if grad_kl is not None:
        grads = [a + b for a, b in zip(grads, gaussian_kl_backward(grad_kl, mu, logvar, dim))]
    return tuple(grads)


def gaussian_log_prob_backward(grad_out, z, mu=None, logvar=None, dim=-1):
    """Per-element (d/dz, d/dlogvar) at z's shape: (-g (z - mu) e^-logvar, g ((z - mu)^2 e^-logvar - 1) / 2);
    d/dmu = -d/dz."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    zc = _compute(z)
    g = _unsqueeze(_compute(grad_out), dims, z.dim())
    d = zc - (0.0 if mu is None else _compute(mu))
    precision = torch.exp(-_compute(logvar)) if logvar is not None else torch.ones_like(zc)
    grad_z = -g * d * precision
    grad_logvar = g * 0.5 * (d * d * precision - 1.0)
    return grad_z.expand(z.shape).contiguous().to(z.dtype), grad_logvar.expand(z.shape).contiguous().to(z.dtype)


def iwae_bound_backward(grad_bound, log_px_z, z, mu, logvar):
    """With w = softmax_k(log w): d/dlog_px_z = g w, d/dz = g w ((z - mu) e^-logvar - z), and d/dmu,
    d/dlogvar of the latent terms summed over k."""
    dtype = z.dtype
    w = torch.softmax(iwae_log_weights(log_px_z, z, mu, logvar), dim=0)
    gw = _compute(grad_bound) * w  # (K, B)
    zc, m, lv = _compute(z), _compute(mu), _compute(logvar)
    d, precision = zc - m, torch.exp(-lv)
    grad_z = gw[..., None] * (d * precision - zc)
    grad_mu = (gw[..., None] * (-d * precision)).sum(0)
    grad_logvar = (gw[..., None] * 0.5 * (1.0 - d * d * precision)).sum(0)
    return gw.to(dtype), grad_z.to(dtype), grad_mu.to(dtype), grad_logvar.to(dtype)
