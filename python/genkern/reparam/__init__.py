"""Reparameterized Gaussian sampling for VAEs and latent-variable models: the public functions.

    z = genkern.reparameterize(mu, logvar, seed=0)                 # mu + exp(logvar / 2) * eps
    z, kl = genkern.reparameterize_kl(mu, logvar, seed=0)         # and KL(q || N(0, I)), in one pass
    bound = genkern.iwae_bound(log_px_z, z, mu, logvar)           # importance-weighted bound

Every function normalises its arguments (dims, defaults, seeds) and calls its `genkern::` op, which checks
them and runs on the selected backend (see genkern.backend), so it works under autograd and torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .._kernels import to_signed
from ..random import check_offset, resolve_seed
from . import _ops  # noqa: F401 - registers the genkern:: ops


def _tensors(**named) -> None:
    """The ops take tensors only, and torch rejects anything else with an error that names no argument:
    name it here. Dtype, device and shape are the op's checks."""
    for name, x in named.items():
        if x is not None:
            _checks.tensor(name, x)


def _noise_args(eps, seed, offset) -> tuple[int, int]:
    """(seed, offset) for the op: a seed is only drawn when the kernel makes the noise itself.

    Under torch.compile(fullgraph=True) pass an explicit seed: drawing one from torch's generator reads a
    tensor value on the host, which is a graph break."""
    offset = check_offset(offset)
    if eps is not None:
        if seed is not None:
            resolve_seed(seed)  # still validated, though unused
        return 0, 0
    return to_signed(resolve_seed(seed)), to_signed(offset)


def _dim_range(name: str, dim, ndim: int) -> tuple[int, int, tuple[int, ...] | None]:
    """The reduced dims as a contiguous range [start, end), and the permutation that makes them one when
    they are not (the op then reduces the trailing dims of the permuted tensor)."""
    dims = _checks.reduced_dims(name, dim, ndim)
    if ndim == 0:
        return 0, 1, None  # a 0-d tensor is reduced as a 1-element vector (see _as_vectors)
    if not dims:
        raise ValueError(f"{name} must name at least one dimension")
    if dims[-1] - dims[0] + 1 == len(dims):
        return dims[0], dims[-1] + 1, None
    kept = [d for d in range(ndim) if d not in dims]
    return len(kept), ndim, (*kept, *dims)


def _as_vectors(*tensors):
    """0-d tensors as 1-element vectors: the ops reduce over a dim, and a reduction of one element is it.
    All of them or none: a mix of shapes goes to the op as given, which reports it."""
    if all(t is None or t.dim() == 0 for t in tensors):
        return [None if t is None else t.reshape(1) for t in tensors]
    return list(tensors)


def _permuted(perm: tuple[int, ...], *tensors):
    """The tensors with their dims permuted; one with the wrong number of dims goes to the op unpermuted,
    which reports it."""
    return [t.permute(perm) if t is not None and t.dim() == len(perm) else t for t in tensors]


def reparameterize(
    mu: Tensor,
    logvar: Tensor,
    *,
    eps: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    num_samples: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """z = mu + exp(logvar / 2) * eps.

    eps is drawn inside the kernel from the genkern stream for (seed, offset) unless given. With
    `num_samples=K`, z has shape (K, *mu.shape), sample k using stream elements k*mu.numel() + j, and mu is
    never copied K times. Differentiable w.r.t. mu and logvar (and eps when given).
    """
    _tensors(mu=mu, logvar=logvar, eps=eps)
    # The op takes 0 for "no sample dimension"; here that is None, and a count is at least 1.
    num_samples = 0 if num_samples is None else _checks.int64("num_samples", num_samples, low=1)
    seed, offset = _noise_args(eps, seed, offset)
    return _backend.call(backend, torch.ops.genkern.reparameterize, mu, logvar, eps, seed, offset, num_samples)


def gaussian_kl(mu: Tensor, logvar: Tensor, dim=-1, *, backend: str | None = None) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over `dim` (an int, a tuple of ints, or None for all)."""
    _tensors(mu=mu, logvar=logvar)
    start, end, perm = _dim_range("dim", dim, mu.dim())
    mu, logvar = _as_vectors(mu, logvar)
    if perm is not None:
        mu, logvar = _permuted(perm, mu, logvar)
    return _backend.call(backend, torch.ops.genkern.gaussian_kl, mu, logvar, start, end)


def reparameterize_kl(
    mu: Tensor,
    logvar: Tensor,
    *,
    eps: Tensor | None = None,
    seed: int | None = None,
    offset: int = 0,
    dim=-1,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(z, kl) in one pass over memory: z as `reparameterize` gives for the same (seed, offset), and
    `gaussian_kl(mu, logvar, dim)`."""
    _tensors(mu=mu, logvar=logvar, eps=eps)
    start, end, perm = _dim_range("dim", dim, mu.dim())
    seed, offset = _noise_args(eps, seed, offset)
    if perm is not None:
        # The stream follows z's own element order, so z is made in place and only the KL is permuted.
        z = _backend.call(backend, torch.ops.genkern.reparameterize, mu, logvar, eps, seed, offset, 0)
        return z, _backend.call(backend, torch.ops.genkern.gaussian_kl, *_permuted(perm, mu, logvar), start, end)
    shape = mu.shape
    mu, logvar, eps = _as_vectors(mu, logvar, eps)
    z, kl = _backend.call(backend, torch.ops.genkern.reparameterize_kl, mu, logvar, eps, seed, offset, start, end)
    return z.reshape(shape), kl


def _broadcast_param(name: str, p: Tensor | None, z: Tensor, start: int) -> Tensor | None:
    """A parameter as the op takes it: z's shape, or a suffix of it that covers the reduced dims."""
    if p is None:
        return None
    lead = z.dim() - p.dim()
    if lead >= 0 and tuple(p.shape) == tuple(z.shape[lead:]) and lead <= start:
        return p
    return _expanded(name, p, z)


def _expanded(name: str, p: Tensor, z: Tensor) -> Tensor:
    try:
        return p.expand(z.shape)
    except RuntimeError:
        message = f"{name} of shape {tuple(p.shape)} does not broadcast to z of shape {tuple(z.shape)}"
        raise ValueError(message) from None


def gaussian_log_prob(
    z: Tensor, mu: Tensor | None = None, logvar: Tensor | None = None, dim=-1, *, backend: str | None = None
) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over `dim`; mu = 0 and logvar = 0 when None (standard normal).

    mu and logvar broadcast to z; leading dims that z has and they lack (K samples of a batch of
    parameters) cost nothing, other broadcasts are expanded."""
    _tensors(z=z, mu=mu, logvar=logvar)
    start, end, perm = _dim_range("dim", dim, z.dim())
    if z.dim() == 0:
        mu, logvar = (_expanded(n, p, z) if p is not None else None for n, p in (("mu", mu), ("logvar", logvar)))
        z, mu, logvar = _as_vectors(z, mu, logvar)
    if perm is not None:
        mu = _expanded("mu", mu, z) if mu is not None else None
        logvar = _expanded("logvar", logvar, z) if logvar is not None else None
        z, mu, logvar = _permuted(perm, z, mu, logvar)
    mu = _broadcast_param("mu", mu, z, start)
    logvar = _broadcast_param("logvar", logvar, z, start)
    if mu is not None and logvar is not None and mu.shape != logvar.shape:
        mu, logvar = mu.expand(z.shape), logvar.expand(z.shape)
    return _backend.call(backend, torch.ops.genkern.gaussian_log_prob, z, mu, logvar, start, end)


def iwae_bound(log_px_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, *, backend: str | None = None) -> Tensor:
    """The importance-weighted bound per example, in one streaming pass:
    logsumexp_k(log p(x|z_k) + log N(z_k; 0, I) - log N(z_k; mu, exp(logvar))) - log K.

    z: (K, B, *event), log_px_z: (K, B), mu and logvar: (B, *event). Returns (B,)."""
    _tensors(log_px_z=log_px_z, z=z, mu=mu, logvar=logvar)
    dtype = z.dtype
    if z.dim() >= 3:
        # The op takes one event dim: flatten them (a parameter of another shape goes to the op as given).
        mu, logvar = (p.flatten(1) if p.shape == z.shape[1:] else p for p in (mu, logvar))
        z = z.flatten(2)
    if dtype in (torch.float16, torch.bfloat16) and all(t.dtype == dtype for t in (log_px_z, mu, logvar)):
        # The weights exp(log w - bound) of the backward need the log-weights at float32 precision: with
        # |log p(x|z)| in the thousands, half-precision rounding of log w alone moves them by tens of percent.
        log_px_z, z, mu, logvar = (t.float() for t in (log_px_z, z, mu, logvar))
    bound, _ = _backend.call(backend, torch.ops.genkern.iwae_bound, log_px_z, z, mu, logvar)
    return bound.to(dtype)
