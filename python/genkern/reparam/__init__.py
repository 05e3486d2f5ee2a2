"""Reparameterized Gaussian sampling for VAEs and latent-variable models: the public functions.

    z = genkern.reparameterize(mu, logvar, seed=0)                 # mu + exp(logvar / 2) * eps
    z, kl = genkern.reparameterize_kl(mu, logvar, seed=0)         # and KL(q || N(0, I)), in one pass
    bound = genkern.iwae_bound(log_px_z, z, mu, logvar)           # importance-weighted bound

Every function checks its arguments, picks a backend (see genkern.backend) and calls its `genkern::` op,
so it works under autograd and torch.compile.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from . import _ops  # noqa: F401 - registers the genkern:: ops
from .._kernels import to_signed
from ..random import check_offset, resolve_seed


def _noise_args(eps, seed, offset, eps_shape, mu) -> tuple[int, int]:
    """(seed, offset) for the op: a seed is only drawn when the kernel makes the noise itself.

    Under torch.compile(fullgraph=True) pass an explicit seed: drawing one from torch's generator reads a
    tensor value on the host, which is a graph break."""
    offset = check_offset(offset)
    if eps is not None:
        _checks.like("eps", eps, "mu", mu, shape=eps_shape)
        if seed is not None:
            resolve_seed(seed)  # still validated, though unused
        return 0, 0
    return to_signed(resolve_seed(seed)), to_signed(offset)


def _mu_logvar(mu, logvar) -> None:
    _checks.float_tensor("mu", mu)
    _checks.like("logvar", logvar, "mu", mu)


def _dim_range(name: str, dim, ndim: int) -> tuple[int, int, tuple[int, ...] | None]:
    """The reduced dims as a contiguous range [start, end), and the permutation that makes them one when
    they are not (the op then reduces the trailing dims of the permuted tensor)."""
    dims = _checks.reduced_dims(name, dim, ndim)
    if ndim == 0:
        return 0, 1, None  # a 0-d tensor is reduced as a 1-element vector (see _as_vector)
    if not dims:
        raise ValueError(f"{name} must name at least one dimension")
    if dims[-1] - dims[0] + 1 == len(dims):
        return dims[0], dims[-1] + 1, None
    kept = [d for d in range(ndim) if d not in dims]
    return len(kept), ndim, (*kept, *dims)


def _as_vector(*tensors):
    """0-d tensors as 1-element vectors: the ops reduce over a dim, and a reduction of one element is it."""
    return [t.reshape(1) if t is not None and t.dim() == 0 else t for t in tensors]


def reparameterize(mu: Tensor, logvar: Tensor, *, eps: Tensor | None = None, seed: int | None = None,
                   offset: int = 0, num_samples: int | None = None, backend: str | None = None) -> Tensor:
    """z = mu + exp(logvar / 2) * eps.

    eps is drawn inside the kernel from the genkern stream for (seed, offset) unless given. With
    `num_samples=K`, z has shape (K, *mu.shape), sample k using stream elements k*mu.numel() + j, and mu is
    never copied K times. Differentiable w.r.t. mu and logvar (and eps when given).
    """
    _mu_logvar(mu, logvar)
    if num_samples is not None:
        num_samples = _checks.integer("num_samples", num_samples, low=1)
    shape = tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)
    name = _backend.resolve(backend, mu.device, mu.dtype)
    seed, offset = _noise_args(eps, seed, offset, shape, mu)
    return torch.ops.genkern.reparameterize(mu, logvar, eps, seed, offset, num_samples or 0, name)


def gaussian_kl(mu: Tensor, logvar: Tensor, dim=-1, *, backend: str | None = None) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over `dim` (an int, a tuple of ints, or None for all)."""
    _mu_logvar(mu, logvar)
    start, end, perm = _dim_range("dim", dim, mu.dim())
    mu, logvar = _as_vector(mu, logvar)
    if perm is not None:
        mu, logvar = mu.permute(perm), logvar.permute(perm)
    name = _backend.resolve(backend, mu.device, mu.dtype)
    return torch.ops.genkern.gaussian_kl(mu, logvar, start, end, name)


def reparameterize_kl(mu: Tensor, logvar: Tensor, *, eps: Tensor | None = None, seed: int | None = None,
                      offset: int = 0, dim=-1, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(z, kl) in one pass over memory: z as `reparameterize` gives for the same (seed, offset), and
    `gaussian_kl(mu, logvar, dim)`."""
    _mu_logvar(mu, logvar)
    start, end, perm = _dim_range("dim", dim, mu.dim())
    name = _backend.resolve(backend, mu.device, mu.dtype)
    seed, offset = _noise_args(eps, seed, offset, tuple(mu.shape), mu)
    if perm is not None:
        # The stream follows z's own element order, so z is made in place and only the KL is permuted.
        z = torch.ops.genkern.reparameterize(mu, logvar, eps, seed, offset, 0, name)
        return z, torch.ops.genkern.gaussian_kl(mu.permute(perm), logvar.permute(perm), start, end, name)
    shape = mu.shape
    mu, logvar, eps = _as_vector(mu, logvar, eps)
    z, kl = torch.ops.genkern.reparameterize_kl(mu, logvar, eps, seed, offset, start, end, name)
    return z.reshape(shape), kl


def _broadcast_param(name: str, p: Tensor | None, z: Tensor, start: int) -> Tensor | None:
    """A parameter as the op takes it: z's shape, or a suffix of it that covers the reduced dims."""
    if p is None:
        return None
    _checks.float_tensor(name, p)
    _checks.same_place(name, p, "z", z)
    lead = z.dim() - p.dim()
    if lead >= 0 and tuple(p.shape) == tuple(z.shape[lead:]) and lead <= start:
        return p
    return _expanded(name, p, z)


def _expanded(name: str, p: Tensor, z: Tensor) -> Tensor:
    _checks.float_tensor(name, p)
    try:
        return p.expand(z.shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(p.shape)} does not broadcast to z of shape {tuple(z.shape)}") from None


def gaussian_log_prob(z: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None, dim=-1, *,
                      backend: str | None = None) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over `dim`; mu = 0 and logvar = 0 when None (standard normal).

    mu and logvar broadcast to z; leading dims that z has and they lack (K samples of a batch of
    parameters) cost nothing, other broadcasts are expanded."""
    _checks.float_tensor("z", z)
    start, end, perm = _dim_range("dim", dim, z.dim())
    if z.dim() == 0:
        mu, logvar = (_expanded(n, p, z) if p is not None else None for n, p in (("mu", mu), ("logvar", logvar)))
        z, mu, logvar = _as_vector(z, mu, logvar)
    if perm is not None:
        mu = _expanded("mu", mu, z).permute(perm) if mu is not None else None
        logvar = _expanded("logvar", logvar, z).permute(perm) if logvar is not None else None
        z = z.permute(perm)
    mu = _broadcast_param("mu", mu, z, start)
    logvar = _broadcast_param("logvar", logvar, z, start)
    if mu is not None and logvar is not None and mu.shape != logvar.shape:
        mu, logvar = mu.expand(z.shape), logvar.expand(z.shape)
    name = _backend.resolve(backend, z.device, z.dtype)
    return torch.ops.genkern.gaussian_log_prob(z, mu, logvar, start, end, name)


def iwae_bound(log_px_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, *, backend: str | None = None) -> Tensor:
    """The importance-weighted bound per example, in one streaming pass:
    logsumexp_k(log p(x|z_k) + log N(z_k; 0, I) - log N(z_k; mu, exp(logvar))) - log K.

    z: (K, B, *event), log_px_z: (K, B), mu and logvar: (B, *event). Returns (B,)."""
    _checks.float_tensor("z", z)
    if z.dim() < 3:
        raise ValueError(f"z must have shape (K, B, *event) with at least 3 dims, got {tuple(z.shape)}")
    if z.shape[0] < 1:
        raise ValueError("z must hold at least one sample (K >= 1)")
    _checks.like("log_px_z", log_px_z, "z", z, shape=z.shape[:2])
    _checks.like("mu", mu, "z", z, shape=z.shape[1:])
    _checks.like("logvar", logvar, "z", z, shape=z.shape[1:])
    k, b = z.shape[:2]
    d = math.prod(z.shape[2:])
    name = _backend.resolve(backend, z.device, z.dtype)
    dtype = z.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # The weights exp(log w - bound) of the backward need the log-weights at float32 precision: with
        # |log p(x|z)| in the thousands, half-precision rounding of log w alone moves them by tens of percent.
        log_px_z, z, mu, logvar = (t.float() for t in (log_px_z, z, mu, logvar))
    bound, _ = torch.ops.genkern.iwae_bound(log_px_z, z.reshape(k, b, d), mu.reshape(b, d), logvar.reshape(b, d), name)
    return bound.to(dtype)
