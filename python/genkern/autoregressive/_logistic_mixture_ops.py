"""The discretised logistic mixture (PixelCNN++'s head) as torch ops, imported by _ops.py (docs/math.md,
section 6.1): `genkern::logistic_mixture_log_prob` (log p per pixel, differentiable w.r.t. params), its fused
backward, and `genkern::logistic_mixture_sample`.

x travels as int64 levels. log p is float64 for float64 params and float32 otherwise (half types compute in
float32, and a loss summed over thousands of pixels belongs in float32). The forward keeps nothing but its
inputs and log p itself (the per-pixel logsumexp the responsibilities need): the backward recomputes every
term from them, in one pass. `genkern::logistic_mixture_nll_loss`, the training loss ("sum" and "mean" with
gradients needed), computes the gradient in its forward instead (on the CPU from one evaluation of the
terms), keeping it (params' size) for its backward, which only scales it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, _native
from .. import backend as _backend
from .._kernels import KernelGroup, to_unsigned
from . import reference as ref

INT64_MAX = (1 << 63) - 1
MAX_LEVELS = 1 << 24  # levels and y = 2x / (L - 1) - 1 stay exact in float32


def _triton_logistic_mixture():
    from ..kernels.autoregressive import logistic_mixture

    return logistic_mixture


MIXTURE_KERNELS = KernelGroup(
    "logistic_mixture", native=lambda: _native._C.logistic_mixture, triton=_triton_logistic_mixture
)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_params(params: Tensor, levels: int, num_mixtures: int, coupled: bool, colors: int) -> None:
    """params (B, P, H, W) with P = 10K coupled (C = 3) or (1 + 2C)K, and levels, K, C in range."""
    _checks.float_tensor("params", params)
    _require(params.dim() == 4, f"params must have shape (B, P, H, W), got {tuple(params.shape)}")
    _checks.integer("levels", levels, low=2, high=MAX_LEVELS)
    _checks.integer("num_mixtures", num_mixtures, low=1)
    _checks.integer("colour channels", colors, low=1)
    if not isinstance(coupled, bool):
        raise TypeError(f"rgb_coupling must be a bool, got {type(coupled).__name__}")
    _require(not coupled or colors == 3, f"rgb_coupling needs 3 colour channels, got C = {colors}")
    expected = ref.mixture_param_channels(colors, num_mixtures, coupled)
    layout = "10K (coupled RGB)" if coupled else f"(1 + 2C)K with C = {colors}"
    _require(
        params.shape[1] == expected,
        f"params has {params.shape[1]} channels, expected {layout} = {expected} for num_mixtures = {num_mixtures}",
    )


def _check_levels(name: str, x: Tensor, params: Tensor, levels: int) -> None:
    _checks.tensor(name, x)
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of levels, got {x.dtype}")
    _require(x.device == params.device, f"{name} is on {x.device} but params is on {params.device}")
    _require(
        x.dim() == 4 and x.shape[0] == params.shape[0] and x.shape[2:] == params.shape[2:],
        f"{name} must have shape (B, C, H, W) with params' B, H and W {tuple(params.shape[::2])}, got {tuple(x.shape)}",
    )
    # Data-dependent: on a GPU this waits for x; skipped for meta and fake tensors and while tracing.
    if x.numel() and _checks.has_values(x):
        lo, hi = torch.stack((x.min(), x.max())).tolist()
        _require(0 <= lo and hi < levels, f"{name} must hold integer levels in [0, {levels}), found {lo} .. {hi}")


def _check_log_prob(params, x, levels, num_mixtures, coupled) -> None:
    _checks.tensor("x", x)
    _require(x.dim() == 4, f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    check_params(params, levels, num_mixtures, coupled, x.shape[1])
    _check_levels("x", x, params, levels)


def _pixels_like(params: Tensor) -> Tensor:
    b, _, h, w = params.shape
    return torch.empty(b, h, w, dtype=compute_dtype(params.dtype), device=params.device)


# ---------------------------------------------------------------------------------------------------------
# logistic_mixture_log_prob: log p(x) per pixel (B, H, W), in nats
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::logistic_mixture_log_prob", mutates_args=())
def logistic_mixture_log_prob(params: Tensor, x: Tensor, levels: int, num_mixtures: int, coupled: bool) -> Tensor:
    _check_log_prob(params, x, levels, num_mixtures, coupled)
    return ref.logistic_mixture_log_prob(params, x, levels, num_mixtures, coupled).contiguous()


@MIXTURE_KERNELS.register(logistic_mixture_log_prob, check=_check_log_prob)
def _(kernels, params, x, levels, num_mixtures, coupled):
    out = _pixels_like(params)
    kernels.log_prob(params.contiguous(), x.contiguous(), out, levels, num_mixtures, coupled)
    return out


@logistic_mixture_log_prob.register_fake
def _(params, x, levels, num_mixtures, coupled):
    _check_log_prob(params, x, levels, num_mixtures, coupled)
    return _pixels_like(params)


def _check_backward(params, x, log_prob, grad, levels, num_mixtures, coupled) -> None:
    _check_log_prob(params, x, levels, num_mixtures, coupled)
    expected = (params.shape[0], params.shape[2], params.shape[3])
    for name, t in (("grad", grad), ("log_prob", log_prob)):
        _checks.float_tensor(name, t)
        _require(tuple(t.shape) == expected, f"{name} has shape {tuple(t.shape)}, expected {expected}")
        _require(
            t.dtype == compute_dtype(params.dtype) and t.device == params.device,
            f"{name} must be {compute_dtype(params.dtype)} on params' device, got {t.dtype} on {t.device}",
        )


@torch.library.custom_op("genkern::logistic_mixture_log_prob_backward", mutates_args=())
def logistic_mixture_log_prob_backward(
    params: Tensor, x: Tensor, log_prob: Tensor, grad: Tensor, levels: int, num_mixtures: int, coupled: bool
) -> Tensor:
    """d(sum grad * log p) / d params (params' shape and dtype). params comes first: the backend is picked by
    the first floating tensor's dtype, and grad is float32 for half params."""
    _check_backward(params, x, log_prob, grad, levels, num_mixtures, coupled)
    return ref.logistic_mixture_log_prob_backward(grad, params, x, log_prob, levels, num_mixtures, coupled).contiguous()


@MIXTURE_KERNELS.register(logistic_mixture_log_prob_backward, check=_check_backward)
def _(kernels, params, x, log_prob, grad, levels, num_mixtures, coupled):
    grad_params = torch.empty_like(params, memory_format=torch.contiguous_format)
    kernels.log_prob_backward(
        grad.contiguous(),
        params.contiguous(),
        x.contiguous(),
        log_prob.contiguous(),
        grad_params,
        levels,
        num_mixtures,
        coupled,
    )
    return grad_params


@logistic_mixture_log_prob_backward.register_fake
def _(params, x, log_prob, grad, levels, num_mixtures, coupled):
    _check_backward(params, x, log_prob, grad, levels, num_mixtures, coupled)
    return torch.empty_like(params, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    params, x, levels, num_mixtures, coupled = inputs
    ctx.save_for_backward(params, x, output)
    ctx.args = (levels, num_mixtures, coupled)
    ctx.backend = _backend.scoped_choice()


def _grad(ctx, grad):
    params, x, log_prob = ctx.saved_tensors
    with _backend.scoped(ctx.backend):
        grad_params = logistic_mixture_log_prob_backward(params, x, log_prob, grad.contiguous(), *ctx.args)
    return grad_params, None, None, None, None  # x is data: no gradient


logistic_mixture_log_prob.register_autograd(_grad, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------------
# logistic_mixture_nll_loss: the training loss -sum log p (mean: over the batch) and its gradient, together
# ---------------------------------------------------------------------------------------------------------
def _loss_weight(params: Tensor, mean: bool) -> float:
    """Every pixel's d loss / d log p."""
    return -1.0 / params.shape[0] if mean and params.shape[0] else -1.0


def _loss_of(log_p: Tensor, mean: bool) -> Tensor:
    nll = -log_p.sum((1, 2))  # the order discretized_logistic_mixture_nll sums in
    return nll.mean() if mean else nll.sum()


def _check_loss(params, x, levels, num_mixtures, coupled, mean) -> None:
    _check_log_prob(params, x, levels, num_mixtures, coupled)
    if not isinstance(mean, bool):
        raise TypeError(f"mean must be a bool, got {type(mean).__name__}")


@torch.library.custom_op("genkern::logistic_mixture_nll_loss", mutates_args=())
def logistic_mixture_nll_loss(
    params: Tensor, x: Tensor, levels: int, num_mixtures: int, coupled: bool, mean: bool
) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d params): loss = -sum log p(x) over pixels and images (mean: averaged over the batch),
    the gradient computed with it. The CPU kernel evaluates each term once for both, where the forward then
    the backward evaluate them twice; the backward of this op only scales the gradient."""
    _check_loss(params, x, levels, num_mixtures, coupled, mean)
    log_p = ref.logistic_mixture_log_prob(params, x, levels, num_mixtures, coupled)
    weight = torch.full_like(log_p, _loss_weight(params, mean))
    grad = ref.logistic_mixture_log_prob_backward(weight, params, x, log_p, levels, num_mixtures, coupled)
    return _loss_of(log_p, mean), grad.contiguous()


@MIXTURE_KERNELS.register(logistic_mixture_nll_loss, check=_check_loss)
def _(kernels, params, x, levels, num_mixtures, coupled, mean):
    log_p = _pixels_like(params)
    grad = torch.empty_like(params, memory_format=torch.contiguous_format)
    p, levels_x, weight = params.contiguous(), x.contiguous(), _loss_weight(params, mean)
    if params.device.type == "cpu" and isinstance(kernels, _native.Kernels):
        kernels.log_prob_with_grad(p, levels_x, log_p, grad, levels, num_mixtures, coupled, weight)
    else:  # CUDA and Triton: the forward and the backward kernels (recomputing is cheap next to the traffic)
        kernels.log_prob(p, levels_x, log_p, levels, num_mixtures, coupled)
        weights = torch.full_like(log_p, weight)
        kernels.log_prob_backward(weights, p, levels_x, log_p, grad, levels, num_mixtures, coupled)
    return _loss_of(log_p, mean), grad


@logistic_mixture_nll_loss.register_fake
def _(params, x, levels, num_mixtures, coupled, mean):
    _check_loss(params, x, levels, num_mixtures, coupled, mean)
    loss = params.new_empty((), dtype=compute_dtype(params.dtype))
    return loss, torch.empty_like(params, memory_format=torch.contiguous_format)


def _loss_setup(ctx, inputs, output):
    params, x, levels, num_mixtures, coupled, mean = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(params, x, grad)
    ctx.args, ctx.mean = (levels, num_mixtures, coupled), mean
    ctx.backend = _backend.scoped_choice()


def _loss_grad(ctx, grad_loss, _):
    params, x, grad = ctx.saved_tensors
    if torch.is_grad_enabled() and type(grad_loss) is Tensor and not torch.compiler.is_compiling():
        # create_graph=True: the backward op, as the per-pixel loss runs it (it refuses a second derivative
        # with torch's own message, where a scaled kept gradient would give a silently wrong one).
        with _backend.scoped(ctx.backend):
            log_p = logistic_mixture_log_prob(params.detach(), x, *ctx.args)
            weight = (grad_loss * _loss_weight(params, ctx.mean)).to(log_p.dtype).expand(log_p.shape).contiguous()
            return logistic_mixture_log_prob_backward(params, x, log_p, weight, *ctx.args), None, None, None, None, None
    # loss.backward() and autograd.grad(loss, ...) pass 1: the gradient itself, not a scaled copy (the copy
    # would double the head's peak memory). Checked on CPU values only: on a GPU it would wait for the device.
    # (A plain tensor: not a fake or functional one of tracing, which has no value to compare.)
    plain = type(grad_loss) is Tensor and not torch.compiler.is_compiling()
    eager_one = plain and grad_loss.device.type == "cpu" and bool(grad_loss == 1)
    grad_params = grad if eager_one else grad * grad_loss.to(grad.dtype)
    return grad_params, None, None, None, None, None


logistic_mixture_nll_loss.register_autograd(_loss_grad, setup_context=_loss_setup)


# ---------------------------------------------------------------------------------------------------------
# logistic_mixture_sample: (B, C, H, W) int64 levels, row b the sample first + b of params[b]
# ---------------------------------------------------------------------------------------------------------
def check_sample_range(params: Tensor, colors: int, num_mixtures: int, first: int) -> None:
    """The last draw's stream index ((first + B) H W)(K + C) must fit int64 (else two samples would share noise,
    and the uint64 kernels and the int64 reference would draw differently)."""
    _checks.integer("first", first, low=0, high=INT64_MAX)
    batch, _, height, width = params.shape
    last = (first + batch) * max(height * width, 1) * (num_mixtures + colors)
    _require(
        last <= INT64_MAX,
        f"first is too large: (first + B) * H * W * (K + C) must stay below 2^63 (the stream index of the last "
        f"draw), got ({first} + {batch}) * {height * width} * {num_mixtures + colors}",
    )


def _check_sample(params, levels, num_mixtures, coupled, colors, seed, offset, first) -> None:
    check_params(params, levels, num_mixtures, coupled, colors)
    check_sample_range(params, colors, num_mixtures, first)


def _sample_shape(params: Tensor, colors: int) -> list[int]:
    return [params.shape[0], colors, params.shape[2], params.shape[3]]


@torch.library.custom_op("genkern::logistic_mixture_sample", mutates_args=())
def logistic_mixture_sample(
    params: Tensor, levels: int, num_mixtures: int, coupled: bool, colors: int, seed: int, offset: int, first: int
) -> Tensor:
    """seed and offset are uint64 carried as int64."""
    _check_sample(params, levels, num_mixtures, coupled, colors, seed, offset, first)
    return ref.logistic_mixture_sample(
        params, levels, num_mixtures, coupled, to_unsigned(seed), to_unsigned(offset), first
    ).contiguous()


@MIXTURE_KERNELS.register(logistic_mixture_sample, check=_check_sample)
def _(kernels, params, levels, num_mixtures, coupled, colors, seed, offset, first):
    out = torch.empty(_sample_shape(params, colors), dtype=torch.int64, device=params.device)
    kernels.sample(
        params.contiguous(), out, levels, num_mixtures, coupled, to_unsigned(seed), to_unsigned(offset), first
    )
    return out


@logistic_mixture_sample.register_fake
def _(params, levels, num_mixtures, coupled, colors, seed, offset, first):
    _check_sample(params, levels, num_mixtures, coupled, colors, seed, offset, first)
    return params.new_empty(_sample_shape(params, colors), dtype=torch.int64)
