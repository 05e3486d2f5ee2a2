"""The reparam family as torch ops: registration (`genkern::`), fake implementations, autograd.

Each op takes an explicit backend name, resolved by the public functions in genkern.reparam. Kernel
backends get contiguous inputs and preallocated outputs; reductions see their input as (outer, dim, inner)
over the reduced dims [start, end). Random ops carry (seed, offset) as int64 and regenerate their noise in
backward instead of saving it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._checks import reduce_shape
from . import reference as ref
from .. import _native
from .._kernels import KernelGroup, to_unsigned


def _triton_reparam():
    from ..kernels.reparam import reparam

    return reparam


KERNELS = KernelGroup("reparam", native=lambda: _native._C.reparam, triton=_triton_reparam)


def _contig(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def _empty(shape, like: Tensor) -> Tensor:
    """A fresh contiguous output: what the kernels write and what the fake implementations promise."""
    return torch.empty(list(shape), dtype=like.dtype, device=like.device)


def _fresh(*outputs: Tensor):
    """Reference results in the layout the fake implementations promise (contiguous)."""
    outputs = tuple(o.contiguous() for o in outputs)
    return outputs if len(outputs) > 1 else outputs[0]


def _require(ok: bool, message: str) -> None:
    """The ops are public too (torch.ops.genkern.*): check what the kernels rely on, for every backend."""
    if not ok:
        raise ValueError(message)


def _check_pair(mu: Tensor, logvar: Tensor) -> None:
    _require(mu.shape == logvar.shape, f"logvar has shape {tuple(logvar.shape)}, expected {tuple(mu.shape)}")
    _require(mu.dtype == logvar.dtype and mu.device == logvar.device, "mu and logvar differ in dtype or device")


def _check_range(x: Tensor, start: int, end: int) -> None:
    _require(0 <= start < end <= max(x.dim(), 1), f"reduced dims [{start}, {end}) out of range for {x.dim()} dims")


def _check_eps(eps: Optional[Tensor], shape, mu: Tensor) -> None:
    if eps is not None:
        _require(tuple(eps.shape) == tuple(shape), f"eps has shape {tuple(eps.shape)}, expected {tuple(shape)}")
        _require(eps.dtype == mu.dtype and eps.device == mu.device, "eps differs from mu in dtype or device")


def _reduced(shape, start: int, end: int) -> list[int]:
    return list(shape[:start]) + list(shape[end:])


def _sample_shape(mu: Tensor, num_samples: int) -> list[int]:
    return list(mu.shape) if num_samples == 0 else [num_samples, *mu.shape]


# ---------------------------------------------------------------------------------------------------------
# reparameterize: z = mu + exp(logvar / 2) * eps
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::reparameterize", mutates_args=())
def reparameterize(
    mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int, offset: int, num_samples: int, backend: str
) -> Tensor:
    _check_pair(mu, logvar)
    _require(num_samples >= 0, "num_samples must be >= 0 (0: no sample dimension)")
    _check_eps(eps, _sample_shape(mu, num_samples), mu)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        return _fresh(ref.reparameterize(mu, logvar, eps, seed, offset, num_samples or None))
    z = _empty(_sample_shape(mu, num_samples), mu)
    KERNELS.on(backend).sample(mu.contiguous(), logvar.contiguous(), _contig(eps), z, seed, offset)
    return z


@reparameterize.register_fake
def _(mu, logvar, eps, seed, offset, num_samples, backend):
    return _empty(_sample_shape(mu, num_samples), mu)


@torch.library.custom_op("genkern::reparameterize_backward", mutates_args=())
def reparameterize_backward(
    grad_z: Tensor, mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int, offset: int, backend: str
) -> tuple[Tensor, Tensor]:
    _check_pair(mu, logvar)
    _require(grad_z.shape[grad_z.dim() - mu.dim():] == mu.shape and grad_z.dim() - mu.dim() in (0, 1),
             f"grad_z has shape {tuple(grad_z.shape)}, expected (K, *{tuple(mu.shape)}) or {tuple(mu.shape)}")
    _check_eps(eps, grad_z.shape, mu)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        return _fresh(*ref.reparameterize_backward(grad_z, mu, logvar, eps, seed, offset))
    grad_mu, grad_logvar = _empty(mu.shape, mu), _empty(mu.shape, mu)
    KERNELS.on(backend).sample_backward(
        grad_z.contiguous(), mu.contiguous(), logvar.contiguous(), _contig(eps), grad_mu, grad_logvar, seed, offset
    )
    return grad_mu, grad_logvar


@reparameterize_backward.register_fake
def _(grad_z, mu, logvar, eps, seed, offset, backend):
    return _empty(mu.shape, mu), _empty(mu.shape, mu)


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, eps, seed, offset, num_samples, backend = inputs
    ctx.save_for_backward(mu, logvar, eps)
    ctx.seed, ctx.offset, ctx.backend = seed, offset, backend


def _reparameterize_grad(ctx, grad_z):
    mu, logvar, eps = ctx.saved_tensors
    grad_mu, grad_logvar = reparameterize_backward(grad_z, mu, logvar, eps, ctx.seed, ctx.offset, ctx.backend)
    grad_eps = _grad_eps(grad_z, logvar) if eps is not None and ctx.needs_input_grad[2] else None
    return grad_mu, grad_logvar, grad_eps, None, None, None, None


def _grad_eps(grad_z: Tensor, logvar: Tensor) -> Tensor:
    """dz/deps = exp(logvar / 2), in float32 for half types as the kernels compute."""
    compute = torch.float32 if grad_z.dtype in (torch.float16, torch.bfloat16) else grad_z.dtype
    return (grad_z.to(compute) * torch.exp(0.5 * logvar.to(compute))).to(grad_z.dtype)


reparameterize.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)


# ---------------------------------------------------------------------------------------------------------
# gaussian_kl: sum over dims [start, end) of KL(N(mu, exp(logvar)) || N(0, 1))
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::gaussian_kl", mutates_args=())
def gaussian_kl(mu: Tensor, logvar: Tensor, start: int, end: int, backend: str) -> Tensor:
    _check_pair(mu, logvar)
    _check_range(mu, start, end)
    if backend == "reference":
        return _fresh(ref.gaussian_kl(mu, logvar, tuple(range(start, end))))
    out = _empty(_reduced(mu.shape, start, end), mu)
    KERNELS.on(backend).kl(mu.contiguous(), logvar.contiguous(), out, *reduce_shape(mu.shape, start, end))
    return out


@gaussian_kl.register_fake
def _(mu, logvar, start, end, backend):
    return _empty(_reduced(mu.shape, start, end), mu)


@torch.library.custom_op("genkern::gaussian_kl_backward", mutates_args=())
def gaussian_kl_backward(
    grad_kl: Tensor, mu: Tensor, logvar: Tensor, start: int, end: int, backend: str
) -> tuple[Tensor, Tensor]:
    _check_pair(mu, logvar)
    _check_range(mu, start, end)
    _require(list(grad_kl.shape) == _reduced(mu.shape, start, end), f"grad_kl has shape {tuple(grad_kl.shape)}")
    if backend == "reference":
        return _fresh(*ref.gaussian_kl_backward(grad_kl, mu, logvar, tuple(range(start, end))))
    grad_mu, grad_logvar = _empty(mu.shape, mu), _empty(mu.shape, mu)
    KERNELS.on(backend).kl_backward(
        grad_kl.contiguous(), mu.contiguous(), logvar.contiguous(), grad_mu, grad_logvar,
        *reduce_shape(mu.shape, start, end),
    )
    return grad_mu, grad_logvar


@gaussian_kl_backward.register_fake
def _(grad_kl, mu, logvar, start, end, backend):
    return _empty(mu.shape, mu), _empty(mu.shape, mu)


def _kl_setup(ctx, inputs, output):
    mu, logvar, start, end, backend = inputs
    ctx.save_for_backward(mu, logvar)
    ctx.start, ctx.end, ctx.backend = start, end, backend


def _kl_grad(ctx, grad_kl):
    mu, logvar = ctx.saved_tensors
    grad_mu, grad_logvar = gaussian_kl_backward(grad_kl, mu, logvar, ctx.start, ctx.end, ctx.backend)
    return grad_mu, grad_logvar, None, None, None


gaussian_kl.register_autograd(_kl_grad, setup_context=_kl_setup)


# ---------------------------------------------------------------------------------------------------------
# reparameterize_kl: (z, kl) in one pass
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::reparameterize_kl", mutates_args=())
def reparameterize_kl(
    mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int, offset: int, start: int, end: int, backend: str
) -> tuple[Tensor, Tensor]:
    _check_pair(mu, logvar)
    _check_range(mu, start, end)
    _check_eps(eps, mu.shape, mu)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        return _fresh(*ref.reparameterize_kl(mu, logvar, eps, seed, offset, tuple(range(start, end))))
    z, kl = _empty(mu.shape, mu), _empty(_reduced(mu.shape, start, end), mu)
    KERNELS.on(backend).sample_kl(
        mu.contiguous(), logvar.contiguous(), _contig(eps), z, kl, *reduce_shape(mu.shape, start, end), seed, offset
    )
    return z, kl


@reparameterize_kl.register_fake
def _(mu, logvar, eps, seed, offset, start, end, backend):
    return _empty(mu.shape, mu), _empty(_reduced(mu.shape, start, end), mu)


@torch.library.custom_op("genkern::reparameterize_kl_backward", mutates_args=())
def reparameterize_kl_backward(
    grad_z: Optional[Tensor], grad_kl: Optional[Tensor], mu: Tensor, logvar: Tensor, eps: Optional[Tensor],
    seed: int, offset: int, start: int, end: int, backend: str,
) -> tuple[Tensor, Tensor]:
    _check_pair(mu, logvar)
    _check_range(mu, start, end)
    _check_eps(eps, mu.shape, mu)
    if grad_z is not None:
        _require(grad_z.shape == mu.shape, f"grad_z has shape {tuple(grad_z.shape)}, expected {tuple(mu.shape)}")
    if grad_kl is not None:
        _require(list(grad_kl.shape) == _reduced(mu.shape, start, end), f"grad_kl has shape {tuple(grad_kl.shape)}")
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        grads = ref.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, offset, tuple(range(start, end)))
        return _fresh(*grads)
    grad_mu, grad_logvar = _empty(mu.shape, mu), _empty(mu.shape, mu)
    KERNELS.on(backend).sample_kl_backward(
        _contig(grad_z), _contig(grad_kl), mu.contiguous(), logvar.contiguous(), _contig(eps), grad_mu, grad_logvar,
        *reduce_shape(mu.shape, start, end), seed, offset,
    )
    return grad_mu, grad_logvar


@reparameterize_kl_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, eps, seed, offset, start, end, backend):
    return _empty(mu.shape, mu), _empty(mu.shape, mu)


def _reparameterize_kl_setup(ctx, inputs, output):
    mu, logvar, eps, seed, offset, start, end, backend = inputs
    # An unused output's gradient stays None: the backward then skips its term (no noise for kl alone).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(mu, logvar, eps)
    ctx.args = (seed, offset, start, end, backend)


def _reparameterize_kl_grad(ctx, grad_z, grad_kl):
    mu, logvar, eps = ctx.saved_tensors
    if grad_z is None and grad_kl is None:
        return None, None, None, None, None, None, None, None
    grad_mu, grad_logvar = reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, *ctx.args)
    grad_eps = None
    if eps is not None and ctx.needs_input_grad[2] and grad_z is not None:
        grad_eps = _grad_eps(grad_z, logvar)
    return grad_mu, grad_logvar, grad_eps, None, None, None, None, None


reparameterize_kl.register_autograd(_reparameterize_kl_grad, setup_context=_reparameterize_kl_setup)


# ---------------------------------------------------------------------------------------------------------
# gaussian_log_prob: sum over dims [start, end) of log N(z; mu, exp(logvar))
# mu and logvar (each optional) have z's shape or a suffix of it: z = (prefix..., *mu.shape).
# ---------------------------------------------------------------------------------------------------------
def _check_log_prob(z: Tensor, mu: Optional[Tensor], logvar: Optional[Tensor], start: int, end: int) -> None:
    _check_range(z, start, end)
    for name, p in (("mu", mu), ("logvar", logvar)):
        if p is None:
            continue
        lead = z.dim() - p.dim()
        _require(p.dtype == z.dtype and p.device == z.device, f"{name} differs from z in dtype or device")
        _require(0 <= lead <= start and p.shape == z.shape[lead:],
                 f"{name} of shape {tuple(p.shape)} must be z's shape {tuple(z.shape)} or a suffix of it "
                 f"covering the reduced dims")
    if mu is not None and logvar is not None:
        _require(mu.shape == logvar.shape, "mu and logvar must have the same shape")


def _param_outer(z: Tensor, param: Optional[Tensor], start: int, end: int) -> int:
    """How many rows of the (outer, dim, inner) view the parameters have (they repeat over the rest)."""
    if param is None:
        return 1
    outer, dim, inner = reduce_shape(z.shape, start, end)
    return param.numel() // max(dim * inner, 1) if dim * inner else outer


@torch.library.custom_op("genkern::gaussian_log_prob", mutates_args=())
def gaussian_log_prob(
    z: Tensor, mu: Optional[Tensor], logvar: Optional[Tensor], start: int, end: int, backend: str
) -> Tensor:
    _check_log_prob(z, mu, logvar, start, end)
    if backend == "reference":
        return _fresh(ref.gaussian_log_prob(z, mu, logvar, tuple(range(start, end))))
    out = _empty(_reduced(z.shape, start, end), z)
    param = mu if mu is not None else logvar
    KERNELS.on(backend).log_prob(
        z.contiguous(), _contig(mu), _contig(logvar), out, *reduce_shape(z.shape, start, end),
        _param_outer(z, param, start, end),
    )
    return out


@gaussian_log_prob.register_fake
def _(z, mu, logvar, start, end, backend):
    return _empty(_reduced(z.shape, start, end), z)


@torch.library.custom_op("genkern::gaussian_log_prob_backward", mutates_args=())
def gaussian_log_prob_backward(
    grad_out: Tensor, z: Tensor, mu: Optional[Tensor], logvar: Optional[Tensor], start: int, end: int, backend: str
) -> tuple[Tensor, Tensor]:
    """Per-element gradients at z's shape: (d/dz, d/dlogvar); d/dmu is -d/dz. The second is empty without logvar."""
    _check_log_prob(z, mu, logvar, start, end)
    _require(list(grad_out.shape) == _reduced(z.shape, start, end), f"grad_out has shape {tuple(grad_out.shape)}")
    grad_logvar = _empty(z.shape if logvar is not None else (0,), z)
    if backend == "reference":
        grad_z, grad_lv = ref.gaussian_log_prob_backward(grad_out, z, mu, logvar, tuple(range(start, end)))
        return _fresh(grad_z, grad_lv if logvar is not None else grad_logvar)
    grad_z = _empty(z.shape, z)
    param = mu if mu is not None else logvar
    KERNELS.on(backend).log_prob_backward(
        grad_out.contiguous(), z.contiguous(), _contig(mu), _contig(logvar), grad_z,
        grad_logvar if logvar is not None else None, *reduce_shape(z.shape, start, end),
        _param_outer(z, param, start, end),
    )
    return grad_z, grad_logvar


@gaussian_log_prob_backward.register_fake
def _(grad_out, z, mu, logvar, start, end, backend):
    return _empty(z.shape, z), _empty(z.shape if logvar is not None else (0,), z)


def _log_prob_setup(ctx, inputs, output):
    z, mu, logvar, start, end, backend = inputs
    ctx.save_for_backward(z, mu, logvar)
    ctx.args = (start, end, backend)


def _sum_to(grad: Tensor, param: Tensor) -> Tensor:
    """Sum a gradient at z's shape over the leading dims the parameter was repeated along."""
    lead = grad.dim() - param.dim()
    return grad.sum(dim=tuple(range(lead))) if lead else grad


def _log_prob_grad(ctx, grad_out):
    z, mu, logvar = ctx.saved_tensors
    grad_z, grad_logvar = gaussian_log_prob_backward(grad_out, z, mu, logvar, *ctx.args)
    grad_mu = _sum_to(-grad_z, mu) if mu is not None and ctx.needs_input_grad[1] else None
    grad_lv = _sum_to(grad_logvar, logvar) if logvar is not None and ctx.needs_input_grad[2] else None
    return grad_z, grad_mu, grad_lv, None, None, None


gaussian_log_prob.register_autograd(_log_prob_grad, setup_context=_log_prob_setup)


# ---------------------------------------------------------------------------------------------------------
# iwae_bound: logsumexp_k(log p(x|z_k) + log p(z_k) - log q(z_k|x)) - log K, with the log-weights
# ---------------------------------------------------------------------------------------------------------
def _check_iwae(log_px_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> None:
    _require(z.dim() == 3 and z.shape[0] >= 1, f"z must have shape (K >= 1, B, D), got {tuple(z.shape)}")
    _require(log_px_z.shape == z.shape[:2], f"log_px_z has shape {tuple(log_px_z.shape)}, expected {tuple(z.shape[:2])}")
    _check_pair(mu, logvar)
    _require(mu.shape == z.shape[1:], f"mu has shape {tuple(mu.shape)}, expected {tuple(z.shape[1:])}")


@torch.library.custom_op("genkern::iwae_bound", mutates_args=())
def iwae_bound(log_px_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(bound, log_w); log_w is kept for the backward and is not differentiable."""
    _check_iwae(log_px_z, z, mu, logvar)
    if backend == "reference":
        log_w = ref.iwae_log_weights(log_px_z, z, mu, logvar)
        return _fresh((torch.logsumexp(log_w, dim=0) - math.log(z.shape[0])).to(z.dtype), log_w.to(z.dtype))
    bound, log_w = _empty(z.shape[1:2], z), _empty(z.shape[:2], z)
    KERNELS.on(backend).iwae(
        log_px_z.contiguous(), z.contiguous(), mu.contiguous(), logvar.contiguous(), bound, log_w
    )
    return bound, log_w


@iwae_bound.register_fake
def _(log_px_z, z, mu, logvar, backend):
    return _empty(z.shape[1:2], z), _empty(z.shape[:2], z)


@torch.library.custom_op("genkern::iwae_bound_backward", mutates_args=())
def iwae_bound_backward(
    grad_bound: Tensor, log_w: Tensor, bound: Tensor, log_px_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_iwae(log_px_z, z, mu, logvar)
    _require(log_w.shape == z.shape[:2] and bound.shape == z.shape[1:2] and grad_bound.shape == z.shape[1:2],
             "log_w, bound and grad_bound must have shapes (K, B), (B,) and (B,)")
    if backend == "reference":
        return _fresh(*ref.iwae_bound_backward(grad_bound, log_px_z, z, mu, logvar))
    grad_log_px_z, grad_z = _empty(log_w.shape, z), _empty(z.shape, z)
    grad_mu, grad_logvar = _empty(mu.shape, z), _empty(mu.shape, z)
    KERNELS.on(backend).iwae_backward(
        grad_bound.contiguous(), log_w.contiguous(), bound.contiguous(), z.contiguous(), mu.contiguous(),
        logvar.contiguous(), grad_log_px_z, grad_z, grad_mu, grad_logvar,
    )
    return grad_log_px_z, grad_z, grad_mu, grad_logvar


@iwae_bound_backward.register_fake
def _(grad_bound, log_w, bound, log_px_z, z, mu, logvar, backend):
    return _empty(log_px_z.shape, z), _empty(z.shape, z), _empty(mu.shape, z), _empty(mu.shape, z)


def _iwae_setup(ctx, inputs, output):
    log_px_z, z, mu, logvar, backend = inputs
    bound, log_w = output
    ctx.mark_non_differentiable(log_w)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(log_w, bound, log_px_z, z, mu, logvar)
    ctx.backend = backend


def _iwae_grad(ctx, grad_bound, _grad_log_w):
    if grad_bound is None:
        return None, None, None, None, None
    grads = iwae_bound_backward(grad_bound, *ctx.saved_tensors, ctx.backend)
    return (*grads, None)


iwae_bound.register_autograd(_iwae_grad, setup_context=_iwae_setup)
