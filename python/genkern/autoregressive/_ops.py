"""The autoregressive family as torch ops: registration (`genkern::`), fake implementations, autograd.

Each op takes an explicit backend name, resolved by the public functions in genkern.autoregressive: `cpu` or
`cuda` (the compiled kernels), `triton`, or `reference`. Kernel backends get contiguous inputs and
preallocated outputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _native
from .._checks import reduce_shape
from .. import _native
from .._kernels import KernelGroup, to_unsigned
from . import reference as ref


def _triton_causal_conv1d():
    from ..kernels.autoregressive import causal_conv1d

    return causal_conv1d


CONV1D_KERNELS = KernelGroup("causal_conv1d", native=lambda: _native._C.causal_conv1d, triton=_triton_causal_conv1d)

def _triton_masked_conv():
    from ..kernels.autoregressive import masked_conv

    return masked_conv


MASKED_CONV_KERNELS = KernelGroup("masked_conv", native=lambda: _native._C.masked_conv, triton=_triton_masked_conv)

def _triton_nade():
    from ..kernels.autoregressive import nade

    return nade


NADE_KERNELS = KernelGroup("nade", native=lambda: _native._C.nade, triton=_triton_nade)

SAMPLING_KERNELS = KernelGroup("pixelcnn_sampling", native=lambda: _native._C.pixelcnn_sampling)  # no Triton kernels

# =========================================================================================================
# Causal convolution
# The causal_conv1d family as torch ops: registration (`genkern::`), fake implementations, autograd.
#
# Each op takes an explicit backend name, resolved by the public functions in genkern.autoregressive:
# `cpu` or `cuda` (the compiled kernels), `triton`, or `reference`. Kernel backends get contiguous inputs and
# preallocated outputs. The activation travels as its name ("none", "silu", "tanh"); backward recomputes the
# pre-activation instead of forward saving it.
# =========================================================================================================
_ACTIVATION_CODES = {name: code for code, name in enumerate(ref.ACTIVATIONS)}  # the kernels' enum


def _contig(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def _empty(shape, like: Tensor) -> Tensor:
    return torch.empty(list(shape), dtype=like.dtype, device=like.device)


def _require(ok: bool, message: str) -> None:
    """The ops are public too (torch.ops.genkern.*): check what the kernels rely on, for every backend."""
    if not ok:
        raise ValueError(message)


def _check_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, activation: str, step: bool) -> int:
    """Checks shared by the convolution ops; returns C_out."""
    _require(x.dim() == (2 if step else 3), f"x has shape {tuple(x.shape)}, expected {'(B, C)' if step else '(B, C, L)'}")
    _require(weight.dim() in (2, 3) and weight.shape[-1] >= 1,
             f"weight has shape {tuple(weight.shape)}, expected (C, K) or (C_out, C_in, K) with K >= 1")
    _require(weight.shape[0 if weight.dim() == 2 else 1] == x.shape[1],
             f"weight of shape {tuple(weight.shape)} does not match the {x.shape[1]} channels of x")
    c_out = weight.shape[0]
    for name, t in (("weight", weight), ("bias", bias)):
        _require(t is None or (t.dtype == x.dtype and t.device == x.device), f"{name} differs from x in dtype or device")
    _require(bias is None or tuple(bias.shape) == (c_out,), f"bias must have shape ({c_out},)")
    _require(dilation >= 1, "dilation must be >= 1")
    _require(activation in _ACTIVATION_CODES, f"activation must be one of {ref.ACTIVATIONS}, got {activation!r}")
    return c_out


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d: y = act(bias + causal dilated convolution of x)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, activation: str,
                  backend: str) -> Tensor:
    c_out = _check_conv(x, weight, bias, dilation, activation, step=False)
    if backend == "reference":
        return ref.causal_conv1d(x, weight, bias, dilation, activation).contiguous()
    y = _empty((x.shape[0], c_out, x.shape[2]), x)
    CONV1D_KERNELS.on(backend).forward(
        x.contiguous(), weight.contiguous(), _contig(bias), y, dilation, _ACTIVATION_CODES[activation]
    )
    return y


@causal_conv1d.register_fake
def _(x, weight, bias, dilation, activation, backend):
    return _empty((x.shape[0], weight.shape[0], x.shape[2]), x)


@torch.library.custom_op("genkern::causal_conv1d_backward", mutates_args=())
def causal_conv1d_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int,
                           activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); grad_bias is empty (0,) without a bias."""
    c_out = _check_conv(x, weight, bias, dilation, activation, step=False)
    _require(tuple(grad_y.shape) == (x.shape[0], c_out, x.shape[2]), f"grad_y has shape {tuple(grad_y.shape)}")
    _require(grad_y.dtype == x.dtype and grad_y.device == x.device, "grad_y differs from x in dtype or device")
    no_bias = _empty((0,), x)
    if backend == "reference":
        gx, gw, gb = ref.causal_conv1d_backward(grad_y, x, weight, bias, dilation, activation)
        return gx.contiguous(), gw.contiguous(), no_bias if gb is None else gb.contiguous()
    grad_x, grad_w = _empty(x.shape, x), _empty(weight.shape, x)
    grad_b = _empty((c_out,), x) if bias is not None else None
    CONV1D_KERNELS.on(backend).backward(
        grad_y.contiguous(), x.contiguous(), weight.contiguous(), _contig(bias), grad_x, grad_w, grad_b, dilation,
        _ACTIVATION_CODES[activation],
    )
    return grad_x, grad_w, no_bias if grad_b is None else grad_b


@causal_conv1d_backward.register_fake
def _(grad_y, x, weight, bias, dilation, activation, backend):
    return _empty(x.shape, x), _empty(weight.shape, x), _empty((weight.shape[0],) if bias is not None else (0,), x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, dilation, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (dilation, activation, backend)


def _conv_grad(ctx, grad_y):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_b = causal_conv1d_backward(grad_y, x, weight, bias, *ctx.args)
    return grad_x, grad_w, grad_b if bias is not None else None, None, None, None


causal_conv1d.register_autograd(_conv_grad, setup_context=_conv_setup)


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d_update: one generation step with a rolling state of past inputs (mutated in place)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::causal_conv1d_update", mutates_args=("state",))
def causal_conv1d_update(x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int,
                         activation: str, backend: str) -> Tensor:
    """y (B, C_out) for the new input x (B, C_in); state (B, C_in, W >= (K - 1) * dilation) shifts by one.
    Not differentiable: it serves generation, where the state's history is gone."""
    c_out = _check_conv(x, weight, bias, dilation, activation, step=True)
    need = ref.receptive_field(weight.shape[-1], dilation)
    _require(state.dim() == 3 and tuple(state.shape[:2]) == tuple(x.shape) and state.shape[2] >= need,
             f"state has shape {tuple(state.shape)}, expected ({x.shape[0]}, {x.shape[1]}, W >= {need})")
    _require(state.dtype == x.dtype and state.device == x.device, "state differs from x in dtype or device")
    if backend == "reference":
        y, new_state = ref.causal_conv1d_update(x, state, weight, bias, dilation, activation)
        state.copy_(new_state)
        return y.contiguous()
    y = _empty((x.shape[0], c_out), x)
    work = state if state.is_contiguous() else state.contiguous()
    CONV1D_KERNELS.on(backend).update(
        x.contiguous(), work, weight.contiguous(), _contig(bias), y, dilation, _ACTIVATION_CODES[activation]
    )
    if work is not state:
        state.copy_(work)
    return y


@causal_conv1d_update.register_fake
def _(x, state, weight, bias, dilation, activation, backend):
    return _empty((x.shape[0], weight.shape[0]), x)


# ---------------------------------------------------------------------------------------------------------
# gated_activation: tanh(a) * sigmoid(b) over the two halves of one dim
# ---------------------------------------------------------------------------------------------------------
def _gated_shape(x: Tensor, dim: int) -> tuple[int, int]:
    """(outer, inner) of x seen as (outer, 2, inner): the halves are contiguous runs of inner elements."""
    _require(0 <= dim < x.dim(), f"dim {dim} out of range for {x.dim()} dims")
    _require(x.shape[dim] % 2 == 0, f"dim {dim} of x has odd size {x.shape[dim]}: it must split in two halves")
    outer, size, inner = reduce_shape(x.shape, dim, dim + 1)
    return outer, size // 2 * inner


def _halved(x: Tensor, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] //= 2
    return shape


@torch.library.custom_op("genkern::gated_activation", mutates_args=())
def gated_activation(x: Tensor, dim: int, backend: str) -> Tensor:
    outer, inner = _gated_shape(x, dim)
    if backend == "reference":
        return ref.gated_activation(x, dim).contiguous()
    y = _empty(_halved(x, dim), x)
    CONV1D_KERNELS.on(backend).gated(x.contiguous(), y, outer, inner)
    return y


@gated_activation.register_fake
def _(x, dim, backend):
    return _empty(_halved(x, dim), x)


@torch.library.custom_op("genkern::gated_activation_backward", mutates_args=())
def gated_activation_backward(grad_y: Tensor, x: Tensor, dim: int, backend: str) -> Tensor:
    outer, inner = _gated_shape(x, dim)
    _require(list(grad_y.shape) == _halved(x, dim), f"grad_y has shape {tuple(grad_y.shape)}")
    _require(grad_y.dtype == x.dtype and grad_y.device == x.device, "grad_y differs from x in dtype or device")
    if backend == "reference":
        return ref.gated_activation_backward(grad_y, x, dim).contiguous()
    grad_x = _empty(x.shape, x)
    CONV1D_KERNELS.on(backend).gated_backward(grad_y.contiguous(), x.contiguous(), grad_x, outer, inner)
    return grad_x


@gated_activation_backward.register_fake
def _(grad_y, x, dim, backend):
    return _empty(x.shape, x)


def _gated_setup(ctx, inputs, output):
    x, dim, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (dim, backend)


def _gated_grad(ctx, grad_y):
    (x,) = ctx.saved_tensors
    return gated_activation_backward(grad_y, x, *ctx.args), None, None


gated_activation.register_autograd(_gated_grad, setup_context=_gated_setup)


# =========================================================================================================
# Masked convolution
# The masked_conv family as torch ops: `genkern::masked_conv2d` and its two backward ops, fake
# implementations, autograd.
#
# Each op takes an explicit backend name, resolved by genkern.masked_conv2d. Kernel backends get contiguous
# inputs and preallocated outputs. The backward is split as aten's is (grad_input, grad_weight + grad_bias),
# so a first layer on data skips the transposed convolution it does not need.
# =========================================================================================================
def _check_masked_conv(x_shape, weight: Tensor, mask_type: str, color_groups: int, dilation: int, *tensors: Tensor) -> None:
    _require(len(x_shape) == 4 and weight.dim() == 4, "x and weight must be 4-d: (B, C_in, H, W), (C_out, C_in, k, k)")
    c_out, c_in, kh, kw = weight.shape
    _require(kh == kw and kh % 2 == 1, f"weight must be a square kernel of odd size, got {kh} x {kw}")
    _require(x_shape[1] == c_in and c_in >= 1 and c_out >= 1, f"weight {tuple(weight.shape)} does not fit x {tuple(x_shape)}")
    _require(mask_type in ref.MASK_TYPES, f"mask_type must be 'A' or 'B', got {mask_type!r}")
    _require(color_groups >= 1 and c_in % color_groups == 0 and c_out % color_groups == 0,
             f"color_groups={color_groups} must divide C_in={c_in} and C_out={c_out}")
    _require(dilation >= 1, f"dilation must be >= 1, got {dilation}")
    for t in tensors:
        _require(t.dtype == weight.dtype and t.device == weight.device, "all tensors must share weight's dtype and device")


def _out_shape(x_shape, c_out: int) -> list[int]:
    return [x_shape[0], c_out, x_shape[2], x_shape[3]]


# ---------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::masked_conv2d", mutates_args=())
def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_type: str, color_groups: int,
                  dilation: int, backend: str) -> Tensor:
    _check_masked_conv(x.shape, weight, mask_type, color_groups, dilation, x, *([bias] if bias is not None else []))
    _require(bias is None or tuple(bias.shape) == (weight.shape[0],), "bias must have shape (C_out,)")
    if backend == "reference":
        return ref.masked_conv2d(x, weight, bias, mask_type, color_groups, dilation).contiguous()
    y = _empty(_out_shape(x.shape, weight.shape[0]), x)
    MASKED_CONV_KERNELS.on(backend).forward(x.contiguous(), weight.contiguous(),
                                            None if bias is None else bias.contiguous(), y,
                                            mask_type == "B", color_groups, dilation)
    return y


@masked_conv2d.register_fake
def _(x, weight, bias, mask_type, color_groups, dilation, backend):
    return _empty(_out_shape(x.shape, weight.shape[0]), x)


# ---------------------------------------------------------------------------------------------------------
# backward: d/dx
# ---------------------------------------------------------------------------------------------------------
def _grad_input_shape(grad_y: Tensor, weight: Tensor) -> list[int]:
    return [grad_y.shape[0], weight.shape[1], grad_y.shape[2], grad_y.shape[3]]


@torch.library.custom_op("genkern::masked_conv2d_grad_input", mutates_args=())
def masked_conv2d_grad_input(grad_y: Tensor, weight: Tensor, mask_type: str, color_groups: int, dilation: int,
                             backend: str) -> Tensor:
    _require(grad_y.dim() == 4 and grad_y.shape[1] == weight.shape[0], "grad_y must have shape (B, C_out, H, W)")
    shape = _grad_input_shape(grad_y, weight)
    _check_masked_conv(shape, weight, mask_type, color_groups, dilation, grad_y)
    if backend == "reference":
        return ref.masked_conv2d_grad_input(grad_y, weight, shape, mask_type, color_groups, dilation).contiguous()
    grad_x = _empty(shape, grad_y)
    MASKED_CONV_KERNELS.on(backend).grad_input(grad_y.contiguous(), weight.contiguous(), grad_x,
                                               mask_type == "B", color_groups, dilation)
    return grad_x


@masked_conv2d_grad_input.register_fake
def _(grad_y, weight, mask_type, color_groups, dilation, backend):
    return _empty(_grad_input_shape(grad_y, weight), grad_y)


# ---------------------------------------------------------------------------------------------------------
# backward: d/dweight (zero at masked taps) and d/dbias
# ---------------------------------------------------------------------------------------------------------
def _weight_shape(grad_y: Tensor, x: Tensor, kernel_size: int) -> list[int]:
    return [grad_y.shape[1], x.shape[1], kernel_size, kernel_size]


@torch.library.custom_op("genkern::masked_conv2d_grad_weight", mutates_args=())
def masked_conv2d_grad_weight(grad_y: Tensor, x: Tensor, kernel_size: int, mask_type: str, color_groups: int,
                              dilation: int, backend: str) -> tuple[Tensor, Tensor]:
    _require(x.dim() == 4 and grad_y.dim() == 4 and grad_y.shape[0] == x.shape[0] and grad_y.shape[2:] == x.shape[2:],
             "grad_y must have shape (B, C_out, H, W) with x's B, H and W")
    shape = _weight_shape(grad_y, x, kernel_size)
    _check_masked_conv(x.shape, torch.empty(shape, dtype=x.dtype, device="meta"), mask_type, color_groups, dilation)
    _require(grad_y.dtype == x.dtype and grad_y.device == x.device, "grad_y differs from x in dtype or device")
    if backend == "reference":
        gw, gb = ref.masked_conv2d_grad_weight(grad_y, x, shape, mask_type, color_groups, dilation)
        return gw.contiguous(), gb.contiguous()
    grad_weight, grad_bias = _empty(shape, x), _empty([shape[0]], x)
    MASKED_CONV_KERNELS.on(backend).grad_weight(grad_y.contiguous(), x.contiguous(), grad_weight, grad_bias,
                                                mask_type == "B", color_groups, dilation)
    return grad_weight, grad_bias


@masked_conv2d_grad_weight.register_fake
def _(grad_y, x, kernel_size, mask_type, color_groups, dilation, backend):
    shape = _weight_shape(grad_y, x, kernel_size)
    return _empty(shape, x), _empty([shape[0]], x)


def _masked_conv_setup(ctx, inputs, output):
    x, weight, bias, mask_type, color_groups, dilation, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (mask_type, color_groups, dilation, backend)


def _masked_conv_grad(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = masked_conv2d_grad_input(grad_y, weight, *ctx.args)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_weight, grad_bias = masked_conv2d_grad_weight(grad_y, x, weight.shape[-1], *ctx.args)
    return grad_x, grad_weight, grad_bias if ctx.needs_input_grad[2] else None, None, None, None, None


masked_conv2d.register_autograd(_masked_conv_grad, setup_context=_masked_conv_setup)


# =========================================================================================================
# NADE
# The NADE family as torch ops: registration (`genkern::`), fake implementations, autograd.
#
# Each op takes an explicit backend name, resolved by the public functions in genkern.autoregressive: `cpu` or `cuda`
# (the compiled kernels), `triton`, or `reference`. Kernel backends get contiguous inputs and preallocated
# outputs. x is a float tensor of the parameters' dtype here (the public functions convert it). Forward saves
# nothing beyond its inputs: backward reruns the recurrence (backwards) in the fused backward op.
# =========================================================================================================
INT64_MAX = (1 << 63) - 1


def check_params(weight: Tensor, c: Tensor, v: Tensor, b: Tensor) -> tuple[int, int]:
    """(D, H) of parameters W (H, D), c (H), V (D, H), b (D) of one dtype and device."""
    _require(weight.dim() == 2, f"weight has shape {tuple(weight.shape)}, expected (H, D)")
    hidden, dims = weight.shape
    for name, t, shape in (("c", c, (hidden,)), ("v", v, (dims, hidden)), ("b", b, (dims,))):
        _require(tuple(t.shape) == shape, f"{name} has shape {tuple(t.shape)}, expected {shape}")
        _require(t.dtype == weight.dtype and t.device == weight.device, f"{name} differs from weight in dtype or device")
    return dims, hidden


def _check_x(x: Tensor, weight: Tensor, dims: int) -> None:
    _require(x.dim() == 2 and x.shape[1] == dims, f"x has shape {tuple(x.shape)}, expected (B, {dims})")
    _require(x.dtype == weight.dtype and x.device == weight.device, "x differs from weight in dtype or device")


def check_sample_range(num_samples: int, first: int, dims: int) -> None:
    """Stream indices (first + s) * D + i must fit int64, or two samples would share their noise."""
    _require(num_samples >= 0, f"num_samples must be >= 0, got {num_samples}")
    _require(first >= 0, f"first must be >= 0, got {first}")
    _require((first + num_samples) * max(dims, 1) <= INT64_MAX,
             "(first + num_samples) * D must stay below 2^63 (the stream index of the last draw)")


def _kernel_args(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


# ---------------------------------------------------------------------------------------------------------
# nade_log_prob: log p(x) per example, in nats
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::nade_log_prob", mutates_args=())
def nade_log_prob(x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor, backend: str) -> Tensor:
    dims, _ = check_params(weight, c, v, b)
    _check_x(x, weight, dims)
    if backend == "reference":
        return ref.nade_log_prob(x, weight, c, v, b).contiguous()
    out = _empty((x.shape[0],), weight)
    NADE_KERNELS.on(backend).log_prob(*_kernel_args(x, weight, c, v, b), out)
    return out


@nade_log_prob.register_fake
def _(x, weight, c, v, b, backend):
    return _empty((x.shape[0],), weight)


@torch.library.custom_op("genkern::nade_log_prob_backward", mutates_args=())
def nade_log_prob_backward(grad_out: Tensor, x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_weight, grad_c, grad_v, grad_b) of sum_n grad_out[n] log p(x[n])."""
    dims, _ = check_params(weight, c, v, b)
    _check_x(x, weight, dims)
    _require(tuple(grad_out.shape) == (x.shape[0],), f"grad_out has shape {tuple(grad_out.shape)}, expected ({x.shape[0]},)")
    _require(grad_out.dtype == weight.dtype and grad_out.device == weight.device,
             "grad_out differs from weight in dtype or device")
    if backend == "reference":
        return tuple(t.contiguous() for t in ref.nade_log_prob_backward(grad_out, x, weight, c, v, b))
    grads = [_empty(t.shape, weight) for t in (weight, c, v, b)]
    NADE_KERNELS.on(backend).log_prob_backward(*_kernel_args(grad_out, x, weight, c, v, b), *grads)
    return tuple(grads)


@nade_log_prob_backward.register_fake
def _(grad_out, x, weight, c, v, b, backend):
    return tuple(_empty(t.shape, weight) for t in (weight, c, v, b))


def _nade_setup(ctx, inputs, output):
    x, weight, c, v, b, backend = inputs
    ctx.save_for_backward(x, weight, c, v, b)
    ctx.backend = backend


def _nade_grad(ctx, grad_out):
    x, weight, c, v, b = ctx.saved_tensors
    grads = nade_log_prob_backward(grad_out.contiguous(), x, weight, c, v, b, ctx.backend)
    return None, *grads, None  # x is data: no gradient


nade_log_prob.register_autograd(_nade_grad, setup_context=_nade_setup)


# ---------------------------------------------------------------------------------------------------------
# nade_sample: samples first .. first + num_samples - 1 from the genkern stream (seed, offset)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::nade_sample", mutates_args=())
def nade_sample(weight: Tensor, c: Tensor, v: Tensor, b: Tensor, num_samples: int, seed: int, offset: int,
                first: int, backend: str) -> Tensor:
    """(num_samples, D) of 0.0 / 1.0 in the parameters' dtype. seed and offset are uint64 carried as int64."""
    dims, _ = check_params(weight, c, v, b)
    check_sample_range(num_samples, first, dims)
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        return ref.nade_sample(num_samples, weight, c, v, b, seed, offset, first).contiguous()
    out = _empty((num_samples, dims), weight)
    NADE_KERNELS.on(backend).sample(*_kernel_args(weight, c, v, b), out, seed, offset, first)
    return out


@nade_sample.register_fake
def _(weight, c, v, b, num_samples, seed, offset, first, backend):
    return _empty((num_samples, weight.shape[1]), weight)


# =========================================================================================================
# Gumbel-max draws and cached sampling
# The pixelcnn_sampling family as torch ops: `genkern::gumbel_argmax`, and the dispatch of the cached
# sampler's program (a model-level routine, not a graph op: it takes a whole program of caches and nodes).
# =========================================================================================================
@torch.library.custom_op("genkern::gumbel_argmax", mutates_args=())
def gumbel_argmax(logits: Tensor, base: Tensor, seed: int, offset: int, backend: str) -> Tensor:
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, levels >= 1), got {tuple(logits.shape)}")
    if base.dtype != torch.int64 or tuple(base.shape) != (logits.shape[0],) or base.device != logits.device:
        raise ValueError("base must be an int64 tensor of shape (N,) on logits' device")
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        return ref.gumbel_argmax(logits, base, seed, offset)
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    SAMPLING_KERNELS.on(backend).gumbel_argmax(logits.contiguous(), base.contiguous(), out, seed, offset)
    return out


@gumbel_argmax.register_fake
def _(logits, base, seed, offset, backend):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def run_program(caches: list[Tensor], nodes: list[tuple], out: Tensor, logits: int, levels: int, scale: float,
           shift: float, seed: int, offset: int, first_sample: int, backend: str) -> None:
    """Run a cached-sampling program (csrc/autoregressive/pixelcnn_sampling.h) into `out`, on `backend`."""
    if backend == "reference":
        ref.run_program(caches, nodes, out, logits, levels, scale, shift, seed, offset, first_sample)
        return
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"the cached sampler has no {backend} kernel")
    described = [tuple(_native.array(v) if isinstance(v, Tensor) else v for v in node) for node in nodes]
    args = ([_native.array(c) for c in caches], described, _native.array(out), logits, levels, scale, shift, seed,
            offset, first_sample)
    if out.is_cuda:
        with torch.cuda.device(out.device):
            _native._C.pixelcnn_sampling.sample(*args, stream=torch.cuda.current_stream(out.device).cuda_stream)
    else:
        _native._C.pixelcnn_sampling.sample(*args)
