"""The reparam family as torch ops: registration (`genkern::`), checks, kernels, fake implementations, autograd.

Each op's decorated body is its reference; `@KERNELS.register(op, check=...)` adds the kernel for cpu and
cuda tensors, which runs on the backend genkern.backend.selects. Every op validates its arguments in one
`_check_<op>` function (errors name the argument), run before a backend is picked or a kernel asked for,
and by the fake implementation too, so a traced call fails the same way. Kernels get contiguous inputs
and preallocated outputs; reductions see their input as (outer, dim, inner) over the reduced dims
[start, end). Random ops carry (seed, offset) as int64 and regenerate their noise in backward instead of
saving it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _checks, _native
from .. import backend as _backend
from .._checks import reduce_shape
from .._kernels import KernelGroup, to_unsigned
from . import reference as ref


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
    if not ok:
        raise ValueError(message)


def _reduced(shape, start: int, end: int) -> list[int]:
    return list(shape[:start]) + list(shape[end:])


def _sample_shape(mu: Tensor, num_samples: int) -> list[int]:
    return list(mu.shape) if num_samples == 0 else [num_samples, *mu.shape]


# ---------------------------------------------------------------------------------------------------------
# Checks: what every backend relies on. The ops are public too (torch.ops.genkern.*), so each op checks its
# own arguments, once, with errors that name them (TypeError for a wrong dtype, ValueError otherwise).
# ---------------------------------------------------------------------------------------------------------
def _check_pair(mu: Tensor, logvar: Tensor) -> None:
    _checks.float_tensor("mu", mu)
    _checks.like("logvar", logvar, "mu", mu)


def _check_range(x: Tensor, start: int, end: int) -> None:
    _require(
        0 <= start < end <= max(x.dim(), 1),
        f"start, end: reduced dims [{start}, {end}) out of range for {x.dim()} dims",
    )


def _check_optional(name: str, x: Optional[Tensor], mu: Tensor, shape) -> None:
    """x (eps, or a gradient that may be absent) is None or like mu with the given shape."""
    if x is not None:
        _checks.like(name, x, "mu", mu, shape=shape)


def _check_reparameterize(mu, logvar, eps, seed, offset, num_samples) -> None:
    _check_pair(mu, logvar)
    _require(num_samples >= 0, f"num_samples must be >= 0 (0: no sample dimension), got {num_samples}")
    # Sample k draws stream elements k * mu.numel() + j: the output's size bounds every stream index.
    _checks.allocation("num_samples", _sample_shape(mu, num_samples), mu.element_size(), mu.device)
    _check_optional("eps", eps, mu, _sample_shape(mu, num_samples))


def _check_reparameterize_backward(grad_z, mu, logvar, eps, seed, offset) -> None:
    _check_pair(mu, logvar)
    k = tuple(grad_z.shape[:1]) if grad_z.dim() == mu.dim() + 1 else ()  # (K, *mu.shape) or mu.shape
    _checks.like("grad_z", grad_z, "mu", mu, shape=(*k, *mu.shape))
    _check_optional("eps", eps, mu, grad_z.shape)


def _check_gaussian_kl(mu, logvar, start, end) -> None:
    _check_pair(mu, logvar)
    _check_range(mu, start, end)


def _check_gaussian_kl_backward(grad_kl, mu, logvar, start, end) -> None:
    _check_gaussian_kl(mu, logvar, start, end)
    _checks.like("grad_kl", grad_kl, "mu", mu, shape=_reduced(mu.shape, start, end))


def _check_reparameterize_kl(mu, logvar, eps, seed, offset, start, end) -> None:
    _check_gaussian_kl(mu, logvar, start, end)
    _check_optional("eps", eps, mu, mu.shape)


def _check_reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, offset, start, end) -> None:
    _check_reparameterize_kl(mu, logvar, eps, seed, offset, start, end)
    _check_optional("grad_z", grad_z, mu, mu.shape)
    _check_optional("grad_kl", grad_kl, mu, _reduced(mu.shape, start, end))


def _check_gaussian_log_prob(z, mu, logvar, start, end) -> None:
    """mu and logvar (each optional) have z's shape or a suffix of it that covers the reduced dims."""
    _checks.float_tensor("z", z)
    _check_range(z, start, end)
    for name, p in (("mu", mu), ("logvar", logvar)):
        if p is None:
            continue
        _checks.float_tensor(name, p)
        _checks.same_place(name, p, "z", z)
        lead = z.dim() - p.dim()
        _require(
            0 <= lead <= start and p.shape == z.shape[lead:],
            f"{name} of shape {tuple(p.shape)} must be z's shape {tuple(z.shape)} or a suffix of it "
            f"covering the reduced dims",
        )
    if mu is not None and logvar is not None:
        _require(
            mu.shape == logvar.shape,
            f"logvar has shape {tuple(logvar.shape)} but mu has shape {tuple(mu.shape)}: they must agree",
        )


def _check_gaussian_log_prob_backward(grad_out, z, mu, logvar, start, end) -> None:
    _check_gaussian_log_prob(z, mu, logvar, start, end)
    _checks.like("grad_out", grad_out, "z", z, shape=_reduced(z.shape, start, end))


def _check_iwae_bound(log_px_z, z, mu, logvar) -> None:
    _checks.float_tensor("z", z)
    _require(z.dim() == 3 and z.shape[0] >= 1, f"z must have shape (K >= 1, B, D), got {tuple(z.shape)}")
    _checks.like("log_px_z", log_px_z, "z", z, shape=z.shape[:2])
    _checks.like("mu", mu, "z", z, shape=z.shape[1:])
    _checks.like("logvar", logvar, "z", z, shape=z.shape[1:])


def _check_iwae_bound_backward(grad_bound, log_w, bound, log_px_z, z, mu, logvar) -> None:
    _check_iwae_bound(log_px_z, z, mu, logvar)
    _checks.like("log_w", log_w, "z", z, shape=z.shape[:2])
    _checks.like("bound", bound, "z", z, shape=z.shape[1:2])
    _checks.like("grad_bound", grad_bound, "z", z, shape=z.shape[1:2])


# ---------------------------------------------------------------------------------------------------------
# reparameterize: z = mu + exp(logvar / 2) * eps
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::reparameterize", mutates_args=())
def reparameterize(
    mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int, offset: int, num_samples: int
) -> Tensor:
    _check_reparameterize(mu, logvar, eps, seed, offset, num_samples)
    return _fresh(ref.reparameterize(mu, logvar, eps, to_unsigned(seed), to_unsigned(offset), num_samples or None))


@KERNELS.register(reparameterize, check=_check_reparameterize)
def _(kernels, mu, logvar, eps, seed, offset, num_samples):
    z = _empty(_sample_shape(mu, num_samples), mu)
    kernels.sample(mu.contiguous(), logvar.contiguous(), _contig(eps), z, to_unsigned(seed), to_unsigned(offset))
    return z


@reparameterize.register_fake
def _(mu, logvar, eps, seed, offset, num_samples):
    _check_reparameterize(mu, logvar, eps, seed, offset, num_samples)
    return _empty(_sample_shape(mu, num_samples), mu)


@torch.library.custom_op("genkern::reparameterize_backward", mutates_args=())
def reparameterize_backward(
    grad_z: Tensor, mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int, offset: int
) -> tuple[Tensor, Tensor]:
    _check_reparameterize_backward(grad_z, mu, logvar, eps, seed, offset)
    return _fresh(*ref.reparameterize_backward(grad_z, mu, logvar, eps, to_unsigned(seed), to_unsigned(offset)))


@KERNELS.register(reparameterize_backward, check=_check_reparameterize_backward)
def _(kernels, grad_z, mu, logvar, eps, seed, offset):
    grad_mu, grad_logvar = _empty(mu.shape, mu), _empty(mu.shape, mu)
    kernels.sample_backward(
        grad_z.contiguous(),
        mu.contiguous(),
        logvar.contiguous(),
        _contig(eps),
        grad_mu,
        grad_logvar,
        to_unsigned(seed),
        to_unsigned(offset),
    )
    return grad_mu, grad_logvar


@reparameterize_backward.register_fake
def _(grad_z, mu, logvar, eps, seed, offset):
    _check_reparameterize_backward(grad_z, mu, logvar, eps, seed, offset)
    return _empty(mu.shape, mu), _empty(mu.shape, mu)


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, eps, seed, offset, num_samples = inputs
    ctx.save_for_backward(mu, logvar, eps)
    ctx.seed, ctx.offset = seed, offset
    ctx.backend = _backend.scoped_choice()  # the backward runs on the forward's backend


def _reparameterize_grad(ctx, grad_z):
    mu, logvar, eps = ctx.saved_tensors
    with _backend.scoped(ctx.backend):
        grad_mu, grad_logvar = reparameterize_backward(grad_z, mu, logvar, eps, ctx.seed, ctx.offset)
    grad_eps = _grad_eps(grad_z, logvar) if eps is not None and ctx.needs_input_grad[2] else None
    return grad_mu, grad_logvar, grad_eps, None, None, None


def _grad_eps(grad_z: Tensor, logvar: Tensor) -> Tensor:
    """dz/deps = exp(logvar / 2), in float32 for half types as the kernels compute."""
    compute = torch.float32 if grad_z.dtype in (torch.float16, torch.bfloat16) else grad_z.dtype
    return (grad_z.to(compute) * torch.exp(0.5 * logvar.to(compute))).to(grad_z.dtype)


reparameterize.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)


# ---------------------------------------------------------------------------------------------------------
# gaussian_kl: sum over dims [start, end) of KL(N(mu, exp(logvar)) || N(0, 1))
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::gaussian_kl", mutates_args=())
def gaussian_kl(mu: Tensor, logvar: Tensor, start: int, end: int) -> Tensor:
    _check_gaussian_kl(mu, logvar, start, end)
    return _fresh(ref.gaussian_kl(mu, logvar, tuple(range(start, end))))


@KERNELS.register(gaussian_kl, check=_check_gaussian_kl)
def _(kernels, mu, logvar, start, end):
    out = _empty(_reduced(mu.shape, start, end), mu)
    kernels.kl(mu.contiguous(), logvar.contiguous(), out, *reduce_shape(mu.shape, start, end))
    return out


@gaussian_kl.register_fake
def _(mu, logvar, start, end):
    _check_gaussian_kl(mu, logvar, start, end)
    return _empty(_reduced(mu.shape, start, end), mu)


@torch.library.custom_op("genkern::gaussian_kl_backward", mutates_args=())
def gaussian_kl_backward(grad_kl: Tensor, mu: Tensor, logvar: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    _check_gaussian_kl_backward(grad_kl, mu, logvar, start, end)
    return _fresh(*ref.gaussian_kl_backward(grad_kl, mu, logvar, tuple(range(start, end))))


@KERNELS.register(gaussian_kl_backward, check=_check_gaussian_kl_backward)
def _(kernels, grad_kl, mu, logvar, start, end):
    grad_mu, grad_logvar = _empty(mu.shape, mu), _empty(mu.shape, mu)
    kernels.kl_backward(
        grad_kl.contiguous(),
        mu.contiguous(),
        logvar.contiguous(),
        grad_mu,
        grad_logvar,
        *reduce_shape(mu.shape, start, end),
    )
    return grad_mu, grad_logvar


@gaussian_kl_backward.register_fake
def _(grad_kl, mu, logvar, start, end):
    _check_gaussian_kl_backward(grad_kl, mu, logvar, start, end)
    return _empty(mu.shape, mu), _empty(mu.shape, mu)


def _kl_setup(ctx, inputs, output):
    mu, logvar, start, end = inputs
    ctx.save_for_backward(mu, logvar)
    ctx.start, ctx.end = start, end
    ctx.backend = _backend.scoped_choice()


def _kl_grad(ctx, grad_kl):
    mu, logvar = ctx.saved_tensors
    with _backend.scoped(ctx.backend):
        grad_mu, grad_logvar = gaussian_kl_backward(grad_kl, mu, logvar, ctx.start, ctx.end)
    return grad_mu, grad_logvar, None, None


gaussian_kl.register_autograd(_kl_grad, setup_context=_kl_setup)


# ---------------------------------------------------------------------------------------------------------
# reparameterize_kl: (z, kl) in one pass
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::reparameterize_kl", mutates_args=())
def reparameterize_kl(
    mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int, offset: int, start: int, end: int
) -> tuple[Tensor, Tensor]:
    _check_reparameterize_kl(mu, logvar, eps, seed, offset, start, end)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    return _fresh(*ref.reparameterize_kl(mu, logvar, eps, seed, offset, tuple(range(start, end))))


@KERNELS.register(reparameterize_kl, check=_check_reparameterize_kl)
def _(kernels, mu, logvar, eps, seed, offset, start, end):
    z, kl = _empty(mu.shape, mu), _empty(_reduced(mu.shape, start, end), mu)
    kernels.sample_kl(
        mu.contiguous(),
        logvar.contiguous(),
        _contig(eps),
        z,
        kl,
        *reduce_shape(mu.shape, start, end),
        to_unsigned(seed),
        to_unsigned(offset),
    )
    return z, kl


@reparameterize_kl.register_fake
def _(mu, logvar, eps, seed, offset, start, end):
    _check_reparameterize_kl(mu, logvar, eps, seed, offset, start, end)
    return _empty(mu.shape, mu), _empty(_reduced(mu.shape, start, end), mu)


@torch.library.custom_op("genkern::reparameterize_kl_backward", mutates_args=())
def reparameterize_kl_backward(
    grad_z: Optional[Tensor],
    grad_kl: Optional[Tensor],
    mu: Tensor,
    logvar: Tensor,
    eps: Optional[Tensor],
    seed: int,
    offset: int,
    start: int,
    end: int,
) -> tuple[Tensor, Tensor]:
    _check_reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, offset, start, end)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    grads = ref.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, offset, tuple(range(start, end)))
    return _fresh(*grads)


@KERNELS.register(reparameterize_kl_backward, check=_check_reparameterize_kl_backward)
def _(kernels, grad_z, grad_kl, mu, logvar, eps, seed, offset, start, end):
    grad_mu, grad_logvar = _empty(mu.shape, mu), _empty(mu.shape, mu)
    kernels.sample_kl_backward(
        _contig(grad_z),
        _contig(grad_kl),
        mu.contiguous(),
        logvar.contiguous(),
        _contig(eps),
        grad_mu,
        grad_logvar,
        *reduce_shape(mu.shape, start, end),
        to_unsigned(seed),
        to_unsigned(offset),
    )
    return grad_mu, grad_logvar


@reparameterize_kl_backward.register_fake
def _(grad_z, grad_kl, mu, logvar, eps, seed, offset, start, end):
    _check_reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, seed, offset, start, end)
    return _empty(mu.shape, mu), _empty(mu.shape, mu)


def _reparameterize_kl_setup(ctx, inputs, output):
    mu, logvar, eps, seed, offset, start, end = inputs
    # An unused output's gradient stays None: the backward then skips its term (no noise for kl alone).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(mu, logvar, eps)
    ctx.args = (seed, offset, start, end)
    ctx.backend = _backend.scoped_choice()


def _reparameterize_kl_grad(ctx, grad_z, grad_kl):
    mu, logvar, eps = ctx.saved_tensors
    if grad_z is None and grad_kl is None:
        return None, None, None, None, None, None, None
    with _backend.scoped(ctx.backend):
        grad_mu, grad_logvar = reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, eps, *ctx.args)
    grad_eps = None
    if eps is not None and ctx.needs_input_grad[2] and grad_z is not None:
        grad_eps = _grad_eps(grad_z, logvar)
    return grad_mu, grad_logvar, grad_eps, None, None, None, None


reparameterize_kl.register_autograd(_reparameterize_kl_grad, setup_context=_reparameterize_kl_setup)


# ---------------------------------------------------------------------------------------------------------
# gaussian_log_prob: sum over dims [start, end) of log N(z; mu, exp(logvar))
# mu and logvar (each optional) have z's shape or a suffix of it: z = (prefix..., *mu.shape).
# ---------------------------------------------------------------------------------------------------------
def _param_outer(z: Tensor, mu: Optional[Tensor], logvar: Optional[Tensor], start: int, end: int) -> int:
    """How many rows of the (outer, dim, inner) view the parameters have (they repeat over the rest)."""
    param = mu if mu is not None else logvar
    if param is None:
        return 1
    outer, dim, inner = reduce_shape(z.shape, start, end)
    return param.numel() // max(dim * inner, 1) if dim * inner else outer


@torch.library.custom_op("genkern::gaussian_log_prob", mutates_args=())
def gaussian_log_prob(z: Tensor, mu: Optional[Tensor], logvar: Optional[Tensor], start: int, end: int) -> Tensor:
    _check_gaussian_log_prob(z, mu, logvar, start, end)
    return _fresh(ref.gaussian_log_prob(z, mu, logvar, tuple(range(start, end))))


@KERNELS.register(gaussian_log_prob, check=_check_gaussian_log_prob)
def _(kernels, z, mu, logvar, start, end):
    out = _empty(_reduced(z.shape, start, end), z)
    kernels.log_prob(
        z.contiguous(),
        _contig(mu),
        _contig(logvar),
        out,
        *reduce_shape(z.shape, start, end),
        _param_outer(z, mu, logvar, start, end),
    )
    return out


@gaussian_log_prob.register_fake
def _(z, mu, logvar, start, end):
    _check_gaussian_log_prob(z, mu, logvar, start, end)
    return _empty(_reduced(z.shape, start, end), z)


@torch.library.custom_op("genkern::gaussian_log_prob_backward", mutates_args=())
def gaussian_log_prob_backward(
    grad_out: Tensor, z: Tensor, mu: Optional[Tensor], logvar: Optional[Tensor], start: int, end: int
) -> tuple[Tensor, Tensor]:
    """Per-element gradients at z's shape: (d/dz, d/dlogvar); d/dmu is -d/dz. The second is empty without logvar."""
    _check_gaussian_log_prob_backward(grad_out, z, mu, logvar, start, end)
    grad_z, grad_logvar = ref.gaussian_log_prob_backward(grad_out, z, mu, logvar, tuple(range(start, end)))
    return _fresh(grad_z, grad_logvar if logvar is not None else _empty((0,), z))


@KERNELS.register(gaussian_log_prob_backward, check=_check_gaussian_log_prob_backward)
def _(kernels, grad_out, z, mu, logvar, start, end):
    grad_z, grad_logvar = _empty(z.shape, z), _empty(z.shape if logvar is not None else (0,), z)
    kernels.log_prob_backward(
        grad_out.contiguous(),
        z.contiguous(),
        _contig(mu),
        _contig(logvar),
        grad_z,
        grad_logvar if logvar is not None else None,
        *reduce_shape(z.shape, start, end),
        _param_outer(z, mu, logvar, start, end),
    )
    return grad_z, grad_logvar


@gaussian_log_prob_backward.register_fake
def _(grad_out, z, mu, logvar, start, end):
    _check_gaussian_log_prob_backward(grad_out, z, mu, logvar, start, end)
    return _empty(z.shape, z), _empty(z.shape if logvar is not None else (0,), z)


def _log_prob_setup(ctx, inputs, output):
    z, mu, logvar, start, end = inputs
    ctx.save_for_backward(z, mu, logvar)
    ctx.args = (start, end)
    ctx.backend = _backend.scoped_choice()


def _sum_to(grad: Tensor, param: Tensor) -> Tensor:
    """Sum a gradient at z's shape over the leading dims the parameter was repeated along."""
    lead = grad.dim() - param.dim()
    return grad.sum(dim=tuple(range(lead))) if lead else grad


def _log_prob_grad(ctx, grad_out):
    z, mu, logvar = ctx.saved_tensors
    with _backend.scoped(ctx.backend):
        grad_z, grad_logvar = gaussian_log_prob_backward(grad_out, z, mu, logvar, *ctx.args)
    grad_mu = _sum_to(-grad_z, mu) if mu is not None and ctx.needs_input_grad[1] else None
    grad_lv = _sum_to(grad_logvar, logvar) if logvar is not None and ctx.needs_input_grad[2] else None
    return grad_z, grad_mu, grad_lv, None, None


gaussian_log_prob.register_autograd(_log_prob_grad, setup_context=_log_prob_setup)


# ---------------------------------------------------------------------------------------------------------
# iwae_bound: logsumexp_k(log p(x|z_k) + log p(z_k) - log q(z_k|x)) - log K, with the log-weights
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::iwae_bound", mutates_args=())
def iwae_bound(log_px_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    """(bound, log_w); log_w is kept for the backward and is not differentiable."""
    _check_iwae_bound(log_px_z, z, mu, logvar)
    log_w = ref.iwae_log_weights(log_px_z, z, mu, logvar)
    return _fresh((torch.logsumexp(log_w, dim=0) - math.log(z.shape[0])).to(z.dtype), log_w.to(z.dtype))


@KERNELS.register(iwae_bound, check=_check_iwae_bound)
def _(kernels, log_px_z, z, mu, logvar):
    bound, log_w = _empty(z.shape[1:2], z), _empty(z.shape[:2], z)
    kernels.iwae(log_px_z.contiguous(), z.contiguous(), mu.contiguous(), logvar.contiguous(), bound, log_w)
    return bound, log_w


@iwae_bound.register_fake
def _(log_px_z, z, mu, logvar):
    _check_iwae_bound(log_px_z, z, mu, logvar)
    return _empty(z.shape[1:2], z), _empty(z.shape[:2], z)


@torch.library.custom_op("genkern::iwae_bound_backward", mutates_args=())
def iwae_bound_backward(
    grad_bound: Tensor, log_w: Tensor, bound: Tensor, log_px_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_iwae_bound_backward(grad_bound, log_w, bound, log_px_z, z, mu, logvar)
    return _fresh(*ref.iwae_bound_backward(grad_bound, log_px_z, z, mu, logvar))


@KERNELS.register(iwae_bound_backward, check=_check_iwae_bound_backward)
def _(kernels, grad_bound, log_w, bound, log_px_z, z, mu, logvar):
    grad_log_px_z, grad_z = _empty(log_w.shape, z), _empty(z.shape, z)
    grad_mu, grad_logvar = _empty(mu.shape, z), _empty(mu.shape, z)
    kernels.iwae_backward(
        grad_bound.contiguous(),
        log_w.contiguous(),
        bound.contiguous(),
        z.contiguous(),
        mu.contiguous(),
        logvar.contiguous(),
        grad_log_px_z,
        grad_z,
        grad_mu,
        grad_logvar,
    )
    return grad_log_px_z, grad_z, grad_mu, grad_logvar


@iwae_bound_backward.register_fake
def _(grad_bound, log_w, bound, log_px_z, z, mu, logvar):
    _check_iwae_bound_backward(grad_bound, log_w, bound, log_px_z, z, mu, logvar)
    return _empty(log_px_z.shape, z), _empty(z.shape, z), _empty(mu.shape, z), _empty(mu.shape, z)


def _iwae_setup(ctx, inputs, output):
    bound, log_w = output
    ctx.mark_non_differentiable(log_w)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(log_w, bound, *inputs)
    ctx.backend = _backend.scoped_choice()


def _iwae_grad(ctx, grad_bound, _grad_log_w):
    if grad_bound is None:
        return None, None, None, None
    with _backend.scoped(ctx.backend):
        return iwae_bound_backward(grad_bound, *ctx.saved_tensors)


iwae_bound.register_autograd(_iwae_grad, setup_context=_iwae_setup)
