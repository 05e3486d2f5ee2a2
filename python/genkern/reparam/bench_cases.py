"""Benchmark cases of the reparam family: the five ops of genkern.reparam, forward pass.

The eager baselines are the code a PyTorch user writes: the formulas of genkern.reparam.reference, with
noise from torch.randn inside the call for the random ops, because that is how eager code draws it. The
genkern calls leave `seed` unset, so they too draw fresh noise on every call.
"""

from __future__ import annotations

import math

import torch

import genkern

from ..bench import BenchCase, matrix_shape
from . import reference as ref

FAMILY = "reparam"
IWAE_SAMPLES = 16  # K importance samples per example, a common IWAE setting


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _mu_logvar(size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = matrix_shape(size)
    mu = torch.randn(shape, device=device, dtype=dtype)
    logvar = 0.5 * torch.randn(shape, device=device, dtype=dtype)  # variances around 1, as after training
    return mu, logvar


def _z_mu_logvar(size, device, dtype):
    mu, logvar = _mu_logvar(size, device, dtype)
    return torch.randn_like(mu), mu, logvar


def _rows(size: int) -> int:
    return matrix_shape(size)[0]


# --- eager baselines ---------------------------------------------------------------------------------------
def eager_reparameterize(mu, logvar):
    return ref.reparameterize(mu, logvar, eps=torch.randn_like(mu))


def eager_reparameterize_kl(mu, logvar):
    return ref.reparameterize_kl(mu, logvar, eps=torch.randn_like(mu))


def eager_iwae_bound(log_px_z, z, mu, logvar):
    """The bound as a user writes it. The reference spells the prior as log N(z; 0, I) with zero tensors
    for mu and logvar, which costs two extra full-size tensors and would flatter genkern."""
    log_pz = -0.5 * (ref.LOG_2PI + z * z).sum(-1)
    log_qz = ref.gaussian_log_prob(z, mu, logvar)
    log_w = log_px_z + log_pz - log_qz
    return torch.logsumexp(log_w, dim=0) - math.log(z.shape[0])


# --- iwae_bound shapes: z is (K, B, D) with K * B = rows and D = cols of the size's matrix -----------------
def _iwae_shape(size: int) -> tuple[int, int, int]:
    rows, cols = matrix_shape(size)
    k = math.gcd(rows, IWAE_SAMPLES)
    return k, rows // k, cols


def _iwae_inputs(size, device, dtype):
    k, b, d = _iwae_shape(size)
    mu = torch.randn(b, d, device=device, dtype=dtype)
    logvar = 0.5 * torch.randn(b, d, device=device, dtype=dtype)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(k, b, d, device=device, dtype=dtype)
    log_px_z = -float(d) + torch.randn(k, b, device=device, dtype=dtype)  # a decoder log-likelihood's scale
    return log_px_z, z, mu, logvar


def _iwae_bytes(size, dtype):
    k, b, d = _iwae_shape(size)
    # z read once, mu and logvar once (not once per sample), log_px_z read, the (B,) bound written.
    return (k * b * d + 2 * b * d + k * b + b) * _itemsize(dtype)


CASES = (
    BenchCase(
        name="reparameterize_kl",
        family=FAMILY,
        make_inputs=_mu_logvar,
        genkern=genkern.reparameterize_kl,
        eager=eager_reparameterize_kl,
        shape=matrix_shape,
        # reads mu and logvar, writes z and one KL per row
        bytes_moved=lambda n, dt: (3 * n + _rows(n)) * _itemsize(dt),
    ),
    BenchCase(
        name="reparameterize",
        family=FAMILY,
        make_inputs=_mu_logvar,
        genkern=genkern.reparameterize,
        eager=eager_reparameterize,
        shape=matrix_shape,
        # reads mu and logvar, writes z; the noise is generated, never read from memory
        bytes_moved=lambda n, dt: 3 * n * _itemsize(dt),
        default=False,
    ),
    BenchCase(
        name="gaussian_kl",
        family=FAMILY,
        make_inputs=_mu_logvar,
        genkern=genkern.gaussian_kl,
        eager=ref.gaussian_kl,
        shape=matrix_shape,
        # reads mu and logvar, writes one KL per row
        bytes_moved=lambda n, dt: (2 * n + _rows(n)) * _itemsize(dt),
        default=False,
    ),
    BenchCase(
        name="gaussian_log_prob",
        family=FAMILY,
        make_inputs=_z_mu_logvar,
        genkern=genkern.gaussian_log_prob,
        eager=ref.gaussian_log_prob,
        shape=matrix_shape,
        # reads z, mu and logvar, writes one log-density per row
        bytes_moved=lambda n, dt: (3 * n + _rows(n)) * _itemsize(dt),
        default=False,
    ),
    BenchCase(
        name="iwae_bound",
        family=FAMILY,
        make_inputs=_iwae_inputs,
        genkern=genkern.iwae_bound,
        eager=eager_iwae_bound,
        shape=_iwae_shape,
        bytes_moved=_iwae_bytes,
    ),
)
