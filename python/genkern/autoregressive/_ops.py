"""The autoregressive family as torch ops: registration (`genkern::`), fake implementations, autograd.

Each op's decorated body is its reference; `@<GROUP>_KERNELS.register(op, check=...)` adds the kernel for
cpu and cuda tensors, which runs on the backend genkern.backend selects, on contiguous inputs and
preallocated outputs. Every op validates its arguments in one `_check_<op>` function (ValueError /
TypeError naming the argument), run before a backend is picked or a kernel asked for, by the reference body
(for the devices without kernels) and by the fake implementation (so meta tensors and traced calls fail the
same way). A backward op runs on the forward's backend (`ctx.backend`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks, _native
from .. import backend as _backend
from .._checks import reduce_shape
from .._kernels import KernelGroup, to_unsigned
from . import _masked_conv_dense
from . import reference as ref


def _triton_causal_conv1d():
    from ..kernels.autoregressive import causal_conv1d

    return causal_conv1d


def _triton_masked_conv():
    from ..kernels.autoregressive import masked_conv

    return masked_conv


def _triton_nade():
    from ..kernels.autoregressive import nade

    return nade


CONV1D_KERNELS = KernelGroup("causal_conv1d", native=lambda: _native._C.causal_conv1d, triton=_triton_causal_conv1d)
MASKED_CONV_KERNELS = KernelGroup("masked_conv", native=lambda: _native._C.masked_conv, triton=_triton_masked_conv)
NADE_KERNELS = KernelGroup("nade", native=lambda: _native._C.nade, triton=_triton_nade)
SAMPLING_KERNELS = KernelGroup("pixelcnn_sampling", native=lambda: _native._C.pixelcnn_sampling)  # no Triton kernels

INT64_MAX = (1 << 63) - 1
MAX_DILATION = 2**31


def _contig(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.contiguous()


def _empty(shape, like: Tensor) -> Tensor:
    return torch.empty(list(shape), dtype=like.dtype, device=like.device)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# =========================================================================================================
# Causal convolution
# The activation travels as its name ("none", "silu", "tanh"); backward recomputes the pre-activation
# instead of forward saving it.
# =========================================================================================================
_ACTIVATION_CODES = {name: code for code, name in enumerate(ref.ACTIVATIONS)}  # the kernels' enum


def _check_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, activation: str, step: bool) -> int:
    """Checks shared by the convolution ops; returns C_out."""
    _checks.float_tensor("x", x)
    _require(
        x.dim() == (2 if step else 3),
        f"x must have shape {'(B, C) (one step)' if step else '(B, C, L)'}, got {tuple(x.shape)}",
    )
    _checks.float_tensor("weight", weight)
    _checks.same_place("weight", weight, "x", x)
    _require(
        weight.dim() in (2, 3) and weight.shape[-1] >= 1,
        f"weight must have shape (C, K) or (C_out, C_in, K) with K >= 1, got {tuple(weight.shape)}",
    )
    _require(
        weight.shape[0 if weight.dim() == 2 else 1] == x.shape[1],
        f"weight of shape {tuple(weight.shape)} does not match the {x.shape[1]} channels of x",
    )
    c_out = weight.shape[0]
    if bias is not None:
        _checks.like("bias", bias, "x", x, shape=(c_out,))
    _checks.integer("dilation", dilation, low=1, high=MAX_DILATION)
    # The receptive field (K - 1) * dilation, with room for the kernels' index arithmetic (as the C++ entry).
    _require(
        (weight.shape[-1] - 1) * dilation <= INT64_MAX // 4,
        f"dilation={dilation} is too large for K={weight.shape[-1]} taps: (K - 1) * dilation must stay below 2^61",
    )
    _require(activation in _ACTIVATION_CODES, f"activation must be one of {ref.ACTIVATIONS}, got {activation!r}")
    return c_out


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d: y = act(bias + causal dilated convolution of x)
# ---------------------------------------------------------------------------------------------------------
def _check_causal_conv1d(x, weight, bias, dilation, activation) -> None:
    _check_conv(x, weight, bias, dilation, activation, step=False)


@torch.library.custom_op("genkern::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, activation: str) -> Tensor:
    _check_causal_conv1d(x, weight, bias, dilation, activation)
    return ref.causal_conv1d(x, weight, bias, dilation, activation).contiguous()


@CONV1D_KERNELS.register(causal_conv1d, check=_check_causal_conv1d)
def _(kernels, x, weight, bias, dilation, activation):
    y = _empty((x.shape[0], weight.shape[0], x.shape[2]), x)
    kernels.forward(x.contiguous(), weight.contiguous(), _contig(bias), y, dilation, _ACTIVATION_CODES[activation])
    return y


@causal_conv1d.register_fake
def _(x, weight, bias, dilation, activation):
    _check_causal_conv1d(x, weight, bias, dilation, activation)
    return _empty((x.shape[0], weight.shape[0], x.shape[2]), x)


def _check_causal_conv1d_backward(grad_y, x, weight, bias, dilation, activation) -> None:
    c_out = _check_conv(x, weight, bias, dilation, activation, step=False)
    _checks.float_tensor("grad_y", grad_y)
    _require(
        tuple(grad_y.shape) == (x.shape[0], c_out, x.shape[2]),
        f"grad_y has shape {tuple(grad_y.shape)}, expected {(x.shape[0], c_out, x.shape[2])}",
    )
    _require(grad_y.dtype == x.dtype and grad_y.device == x.device, "grad_y differs from x in dtype or device")


@torch.library.custom_op("genkern::causal_conv1d_backward", mutates_args=())
def causal_conv1d_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, activation: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias); grad_bias is empty (0,) without a bias."""
    _check_causal_conv1d_backward(grad_y, x, weight, bias, dilation, activation)
    gx, gw, gb = ref.causal_conv1d_backward(grad_y, x, weight, bias, dilation, activation)
    return gx.contiguous(), gw.contiguous(), _empty((0,), x) if gb is None else gb.contiguous()


@CONV1D_KERNELS.register(causal_conv1d_backward, check=_check_causal_conv1d_backward)
def _(kernels, grad_y, x, weight, bias, dilation, activation):
    grad_x, grad_w = _empty(x.shape, x), _empty(weight.shape, x)
    grad_b = _empty(bias.shape, x) if bias is not None else None
    kernels.backward(
        grad_y.contiguous(),
        x.contiguous(),
        weight.contiguous(),
        _contig(bias),
        grad_x,
        grad_w,
        grad_b,
        dilation,
        _ACTIVATION_CODES[activation],
    )
    return grad_x, grad_w, _empty((0,), x) if grad_b is None else grad_b


@causal_conv1d_backward.register_fake
def _(grad_y, x, weight, bias, dilation, activation):
    _check_causal_conv1d_backward(grad_y, x, weight, bias, dilation, activation)
    return _empty(x.shape, x), _empty(weight.shape, x), _empty(bias.shape if bias is not None else (0,), x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, dilation, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (dilation, activation)
    ctx.backend = _backend.scoped_choice()


def _conv_grad(ctx, grad_y):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_b = _backend.call(ctx.backend, causal_conv1d_backward, grad_y, x, weight, bias, *ctx.args)
    return grad_x, grad_w, grad_b if bias is not None else None, None, None


causal_conv1d.register_autograd(_conv_grad, setup_context=_conv_setup)


# ---------------------------------------------------------------------------------------------------------
# causal_conv1d_update: one generation step with a rolling state of past inputs (mutated in place)
# ---------------------------------------------------------------------------------------------------------
def _check_causal_conv1d_update(x, state, weight, bias, dilation, activation) -> None:
    _check_conv(x, weight, bias, dilation, activation, step=True)
    need = ref.receptive_field(weight.shape[-1], dilation)
    _checks.float_tensor("state", state)
    _checks.same_place("state", state, "x", x)
    _require(
        state.dim() == 3 and tuple(state.shape[:2]) == tuple(x.shape) and state.shape[2] >= need,
        f"state has shape {tuple(state.shape)}, expected ({x.shape[0]}, {x.shape[1]}, W) "
        f"with W >= (K - 1) * dilation = {need} (K = {weight.shape[-1]}: weight's last dim)",
    )


@torch.library.custom_op("genkern::causal_conv1d_update", mutates_args=("state",))
def causal_conv1d_update(
    x: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: int, activation: str
) -> Tensor:
    """y (B, C_out) for the new input x (B, C_in); state (B, C_in, W >= (K - 1) * dilation) shifts by one.
    Not differentiable: it serves generation, where the state's history is gone."""
    _check_causal_conv1d_update(x, state, weight, bias, dilation, activation)
    y, new_state = ref.causal_conv1d_update(x, state, weight, bias, dilation, activation)
    state.copy_(new_state)
    return y.contiguous()


@CONV1D_KERNELS.register(causal_conv1d_update, check=_check_causal_conv1d_update)
def _(kernels, x, state, weight, bias, dilation, activation):
    y = _empty((x.shape[0], weight.shape[0]), x)
    work = state if state.is_contiguous() else state.contiguous()
    kernels.update(x.contiguous(), work, weight.contiguous(), _contig(bias), y, dilation, _ACTIVATION_CODES[activation])
    if work is not state:
        state.copy_(work)
    return y


@causal_conv1d_update.register_fake
def _(x, state, weight, bias, dilation, activation):
    _check_causal_conv1d_update(x, state, weight, bias, dilation, activation)
    return _empty((x.shape[0], weight.shape[0]), x)


# =========================================================================================================
# Causal convolution with carried states (docs/math.md, section 6.3): causal-conv1d's API on a depthwise
# (C, K) weight. x may be channel-last (a (B, L, C) tensor transposed): the kernels read it in place and
# write y, final_states and the gradients in the same layout. Index tensors (seq_idx, cache_seqlens,
# conv_state_indices, cu_seqlens) may be int32 or int64; the kernels get int64. Their data-dependent checks
# (order, range) run where values exist (not on meta or fake tensors, nor while torch.compile traces).
# =========================================================================================================
def _triton_causal_conv1d_states():
    from ..kernels.autoregressive import causal_conv1d_states

    return causal_conv1d_states


CONV1D_STATES_KERNELS = KernelGroup(
    "causal_conv1d", native=lambda: _native._C.causal_conv1d, triton=_triton_causal_conv1d_states
)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _index_tensor(name: str, t: Tensor, shape: tuple, x: Tensor) -> None:
    _checks.tensor(name, t)
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got dtype {t.dtype}")
    _require(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")
    _require(tuple(t.shape) == tuple(shape), f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _as_index(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.int64).contiguous()


def _states_layout_empty(shape, like: Tensor, last: bool) -> Tensor:
    """An uninitialised (B, C, n) tensor, channel-last storage when `last`."""
    b, c, n = shape
    if last:
        return _empty((b, n, c), like).transpose(1, 2)
    return _empty(shape, like)


def _check_states_conv(x, weight, bias, dilation, activation) -> int:
    """The depthwise convolution's arguments; returns P = (K - 1) * dilation."""
    _check_conv(x, weight, bias, dilation, activation, step=False)
    _require(
        weight.dim() == 2,
        f"weight must be depthwise (C, K) for states, seq_idx or conv_state_indices, got {tuple(weight.shape)}",
    )
    return ref.receptive_field(weight.shape[1], dilation)


def _check_seq_idx(seq_idx: Tensor, x: Tensor) -> None:
    _index_tensor("seq_idx", seq_idx, (x.shape[0], x.shape[2]), x)
    if _checks.has_values(seq_idx) and seq_idx.numel() > 0:
        # The non-negative ids of a row must not decrease (packed sequences, then padding anywhere).
        ids = seq_idx.to(torch.int64)
        running = torch.cummax(torch.where(ids >= 0, ids, -1), dim=1).values
        _require(
            not bool(((ids >= 0) & (ids < running)).any()),
            "seq_idx decreases within a row: the packed sequences' ids must be non-decreasing",
        )


def _check_causal_conv1d_states(x, weight, bias, initial_states, seq_idx, dilation, activation) -> None:
    P = _check_states_conv(x, weight, bias, dilation, activation)
    B, C, _ = x.shape
    if initial_states is not None:
        _checks.float_tensor("initial_states", initial_states)
        _checks.same_place("initial_states", initial_states, "x", x)
        _require(
            tuple(initial_states.shape) == (B, C, P),
            f"initial_states has shape {tuple(initial_states.shape)}, expected {(B, C, P)}: "
            f"(B, C, (K - 1) * dilation) with K = {weight.shape[1]}, dilation = {dilation}",
        )
    if seq_idx is not None:
        _check_seq_idx(seq_idx, x)


@torch.library.custom_op("genkern::causal_conv1d_states", mutates_args=())
def causal_conv1d_states(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    initial_states: Optional[Tensor],
    seq_idx: Optional[Tensor],
    dilation: int,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """(y, final_states (B, C, (K - 1) * dilation)), both in x's layout."""
    _check_causal_conv1d_states(x, weight, bias, initial_states, seq_idx, dilation, activation)
    return ref.causal_conv1d_states(x, weight, bias, initial_states, seq_idx, dilation, activation)


@CONV1D_STATES_KERNELS.register(causal_conv1d_states, check=_check_causal_conv1d_states)
def _(kernels, x, weight, bias, initial_states, seq_idx, dilation, activation):
    last = ref.channel_last(x)
    B, C, L = x.shape
    P = ref.receptive_field(weight.shape[1], dilation)
    y, final = _states_layout_empty((B, C, L), x, last), _states_layout_empty((B, C, P), x, last)
    init = None if initial_states is None else ref.in_layout(initial_states, last)
    kernels.forward_states(
        ref.in_layout(x, last),
        weight.contiguous(),
        _contig(bias),
        init,
        _as_index(seq_idx),
        y,
        final,
        dilation,
        _ACTIVATION_CODES[activation],
        last,
    )
    return y, final


@causal_conv1d_states.register_fake
def _(x, weight, bias, initial_states, seq_idx, dilation, activation):
    _check_causal_conv1d_states(x, weight, bias, initial_states, seq_idx, dilation, activation)
    last = ref.channel_last(x)
    P = ref.receptive_field(weight.shape[1], dilation)
    return _states_layout_empty(x.shape, x, last), _states_layout_empty((x.shape[0], x.shape[1], P), x, last)


def _check_causal_conv1d_states_backward(
    grad_y, grad_final, x, weight, bias, initial_states, seq_idx, dilation, activation
) -> None:
    _check_causal_conv1d_states(x, weight, bias, initial_states, seq_idx, dilation, activation)
    _checks.like("grad_y", grad_y, "x", x)
    if grad_final is not None:
        P = ref.receptive_field(weight.shape[1], dilation)
        _checks.like("grad_final_states", grad_final, "x", x, shape=(x.shape[0], x.shape[1], P))


@torch.library.custom_op("genkern::causal_conv1d_states_backward", mutates_args=())
def causal_conv1d_states_backward(
    grad_y: Tensor,
    grad_final: Optional[Tensor],
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    initial_states: Optional[Tensor],
    seq_idx: Optional[Tensor],
    dilation: int,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_initial_states); the last two are empty (0,) when absent."""
    _check_causal_conv1d_states_backward(
        grad_y, grad_final, x, weight, bias, initial_states, seq_idx, dilation, activation
    )
    gx, gw, gb, gi = ref.causal_conv1d_states_backward(
        grad_y, grad_final, x, weight, bias, initial_states, seq_idx, dilation, activation
    )
    last = ref.channel_last(x)
    return (
        ref.in_layout(gx, last),
        gw.contiguous(),
        _empty((0,), x) if gb is None else gb.contiguous(),
        _empty((0,), x) if gi is None else ref.in_layout(gi, last),
    )


@CONV1D_STATES_KERNELS.register(causal_conv1d_states_backward, check=_check_causal_conv1d_states_backward)
def _(kernels, grad_y, grad_final, x, weight, bias, initial_states, seq_idx, dilation, activation):
    last = ref.channel_last(x)
    P = ref.receptive_field(weight.shape[1], dilation)
    B, C, L = x.shape
    grad_x, grad_w = _states_layout_empty((B, C, L), x, last), _empty(weight.shape, x)
    grad_b = _empty(bias.shape, x) if bias is not None else None
    grad_i = _states_layout_empty((B, C, P), x, last) if initial_states is not None else None
    kernels.backward_states(
        ref.in_layout(grad_y, last),
        None if grad_final is None else ref.in_layout(grad_final, last),
        ref.in_layout(x, last),
        weight.contiguous(),
        _contig(bias),
        None if initial_states is None else ref.in_layout(initial_states, last),
        _as_index(seq_idx),
        grad_x,
        grad_w,
        grad_b,
        grad_i,
        dilation,
        _ACTIVATION_CODES[activation],
        last,
    )
    return grad_x, grad_w, _empty((0,), x) if grad_b is None else grad_b, _empty((0,), x) if grad_i is None else grad_i


@causal_conv1d_states_backward.register_fake
def _(grad_y, grad_final, x, weight, bias, initial_states, seq_idx, dilation, activation):
    _check_causal_conv1d_states_backward(
        grad_y, grad_final, x, weight, bias, initial_states, seq_idx, dilation, activation
    )
    last = ref.channel_last(x)
    P = ref.receptive_field(weight.shape[1], dilation)
    gi = _states_layout_empty((x.shape[0], x.shape[1], P), x, last) if initial_states is not None else _empty((0,), x)
    gb = _empty(bias.shape if bias is not None else (0,), x)
    return _states_layout_empty(x.shape, x, last), _empty(weight.shape, x), gb, gi


def _states_setup(ctx, inputs, output):
    x, weight, bias, initial_states, seq_idx, dilation, activation = inputs
    ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
    ctx.args = (dilation, activation)
    ctx.backend = _backend.scoped_choice()


def _states_grad(ctx, grad_y, grad_final):
    x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
    gx, gw, gb, gi = _backend.call(
        ctx.backend,
        causal_conv1d_states_backward,
        grad_y,
        grad_final,
        x,
        weight,
        bias,
        initial_states,
        seq_idx,
        *ctx.args,
    )
    return gx, gw, gb if bias is not None else None, gi if initial_states is not None else None, None, None, None


causal_conv1d_states.register_autograd(_states_grad, setup_context=_states_setup)


def _check_causal_conv1d_update_states(
    x, conv_state, weight, bias, cache_seqlens, conv_state_indices, dilation, activation
) -> None:
    P = _check_states_conv(x, weight, bias, dilation, activation)
    B, C, _ = x.shape
    _checks.float_tensor("conv_state", conv_state)
    _checks.same_place("conv_state", conv_state, "x", x)
    _require(
        conv_state.dim() == 3 and conv_state.shape[1] == C and conv_state.shape[2] >= P,
        f"state (conv_state) has shape {tuple(conv_state.shape)}, expected (R, {C}, S) with S >= (K - 1) * dilation"
        f" = {P}",
    )
    rows = conv_state.shape[0]
    if conv_state_indices is None:
        _require(rows == B, f"conv_state has {rows} rows but x has batch {B} (and no conv_state_indices)")
    else:
        _index_tensor("conv_state_indices", conv_state_indices, (B,), x)
        if _checks.has_values(conv_state_indices) and B > 0:
            idx = conv_state_indices.to(torch.int64)
            _require(
                bool((idx < rows).all()),
                f"conv_state_indices has an entry >= the {rows} rows of conv_state (negative entries mark padding)",
            )
            used = idx[idx >= 0]
            _require(
                used.unique().numel() == used.numel(),
                "conv_state_indices repeats a state row: two batch rows would update one state",
            )
    if cache_seqlens is not None:
        _index_tensor("cache_seqlens", cache_seqlens, (B,), x)
        _require(conv_state.shape[2] > 0, "cache_seqlens needs a conv_state of length S >= 1")
        if _checks.has_values(cache_seqlens) and B > 0:
            _require(bool((cache_seqlens >= 0).all()), "cache_seqlens must be >= 0")


@torch.library.custom_op("genkern::causal_conv1d_update_states", mutates_args=("conv_state",))
def causal_conv1d_update_states(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    cache_seqlens: Optional[Tensor],
    conv_state_indices: Optional[Tensor],
    dilation: int,
    activation: str,
) -> Tensor:
    """y (B, C, L) in x's layout for L new inputs per row; conv_state (R, C, S) updated in place. Not
    differentiable (generation)."""
    _check_causal_conv1d_update_states(
        x, conv_state, weight, bias, cache_seqlens, conv_state_indices, dilation, activation
    )
    y, new_state = ref.causal_conv1d_update_states(
        x, conv_state, weight, bias, cache_seqlens, conv_state_indices, dilation, activation
    )
    conv_state.copy_(new_state)
    return y


@CONV1D_STATES_KERNELS.register(causal_conv1d_update_states, check=_check_causal_conv1d_update_states)
def _(kernels, x, conv_state, weight, bias, cache_seqlens, conv_state_indices, dilation, activation):
    last = ref.channel_last(x)
    y = _states_layout_empty(x.shape, x, last)
    work = conv_state if conv_state.is_contiguous() else conv_state.contiguous()
    kernels.update_states(
        ref.in_layout(x, last),
        work,
        weight.contiguous(),
        _contig(bias),
        _as_index(cache_seqlens),
        _as_index(conv_state_indices),
        y,
        dilation,
        _ACTIVATION_CODES[activation],
        last,
    )
    if work is not conv_state:
        conv_state.copy_(work)
    return y


@causal_conv1d_update_states.register_fake
def _(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, dilation, activation):
    _check_causal_conv1d_update_states(
        x, conv_state, weight, bias, cache_seqlens, conv_state_indices, dilation, activation
    )
    return _states_layout_empty(x.shape, x, ref.channel_last(x))


def _check_causal_conv1d_varlen_states(x, cu_seqlens, state_len) -> None:
    _checks.float_tensor("x", x)
    _require(x.dim() == 2, f"x must have shape (total_tokens, C), got {tuple(x.shape)}")
    _checks.tensor("cu_seqlens", cu_seqlens)
    _require(cu_seqlens.dim() == 1 and cu_seqlens.shape[0] >= 1, "cu_seqlens must have shape (B + 1,)")
    _index_tensor("cu_seqlens", cu_seqlens, tuple(cu_seqlens.shape), x)
    _checks.integer("state_len", state_len, low=0, high=INT64_MAX)
    states = (cu_seqlens.shape[0] - 1, state_len, x.shape[1])
    _checks.allocation("state_len", states, x.element_size(), x.device, "the states")
    if _checks.has_values(cu_seqlens):
        cu = cu_seqlens.to(torch.int64)
        _require(
            int(cu[0]) >= 0 and int(cu[-1]) <= x.shape[0] and bool((cu[1:] >= cu[:-1]).all()),
            f"cu_seqlens must be non-decreasing from >= 0 to <= the {x.shape[0]} tokens of x",
        )


@torch.library.custom_op("genkern::causal_conv1d_varlen_states", mutates_args=())
def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """(B, C, state_len) states, channel-last storage: each packed sequence's last state_len inputs."""
    _check_causal_conv1d_varlen_states(x, cu_seqlens, state_len)
    return ref.causal_conv1d_varlen_states(x, cu_seqlens, state_len)


@CONV1D_STATES_KERNELS.register(causal_conv1d_varlen_states, check=_check_causal_conv1d_varlen_states)
def _(kernels, x, cu_seqlens, state_len):
    states = _empty((cu_seqlens.shape[0] - 1, state_len, x.shape[1]), x)
    kernels.varlen_states(x.contiguous(), _as_index(cu_seqlens), states)
    return states.transpose(1, 2)


@causal_conv1d_varlen_states.register_fake
def _(x, cu_seqlens, state_len):
    _check_causal_conv1d_varlen_states(x, cu_seqlens, state_len)
    return _empty((cu_seqlens.shape[0] - 1, state_len, x.shape[1]), x).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# gated_activation: tanh(a) * sigmoid(b) over the two halves of one dim
# ---------------------------------------------------------------------------------------------------------
def _check_gated_activation(x: Tensor, dim: int) -> None:
    _checks.float_tensor("x", x)
    _checks.integer("dim", dim)
    _require(-x.dim() <= dim < x.dim(), f"dim={dim} is out of range for x of {x.dim()} dims")
    _require(
        x.shape[dim] % 2 == 0, f"x has odd size {x.shape[dim]} along dim {dim % x.dim()}: it must split into two halves"
    )


def _gated_layout(x: Tensor, dim: int) -> tuple[int, int, int]:
    """(dim in [0, x.dim()), outer, inner) of x seen as (outer, 2, inner): the halves are contiguous runs of
    inner elements. dim may be negative."""
    dim %= x.dim()
    outer, size, inner = reduce_shape(x.shape, dim, dim + 1)
    return dim, outer, size // 2 * inner


def _halved(x: Tensor, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] //= 2
    return shape


@torch.library.custom_op("genkern::gated_activation", mutates_args=())
def gated_activation(x: Tensor, dim: int) -> Tensor:
    _check_gated_activation(x, dim)
    return ref.gated_activation(x, dim).contiguous()


@CONV1D_KERNELS.register(gated_activation, check=_check_gated_activation)
def _(kernels, x, dim):
    dim, outer, inner = _gated_layout(x, dim)
    y = _empty(_halved(x, dim), x)
    kernels.gated(x.contiguous(), y, outer, inner)
    return y


@gated_activation.register_fake
def _(x, dim):
    _check_gated_activation(x, dim)
    return _empty(_halved(x, dim), x)


def _check_gated_activation_backward(grad_y: Tensor, x: Tensor, dim: int) -> None:
    _check_gated_activation(x, dim)
    _checks.float_tensor("grad_y", grad_y)
    _require(
        list(grad_y.shape) == _halved(x, dim), f"grad_y has shape {tuple(grad_y.shape)}, expected {_halved(x, dim)}"
    )
    _require(grad_y.dtype == x.dtype and grad_y.device == x.device, "grad_y differs from x in dtype or device")


@torch.library.custom_op("genkern::gated_activation_backward", mutates_args=())
def gated_activation_backward(grad_y: Tensor, x: Tensor, dim: int) -> Tensor:
    _check_gated_activation_backward(grad_y, x, dim)
    return ref.gated_activation_backward(grad_y, x, dim).contiguous()


@CONV1D_KERNELS.register(gated_activation_backward, check=_check_gated_activation_backward)
def _(kernels, grad_y, x, dim):
    _, outer, inner = _gated_layout(x, dim)
    grad_x = _empty(x.shape, x)
    kernels.gated_backward(grad_y.contiguous(), x.contiguous(), grad_x, outer, inner)
    return grad_x


@gated_activation_backward.register_fake
def _(grad_y, x, dim):
    _check_gated_activation_backward(grad_y, x, dim)
    return _empty(x.shape, x)


def _gated_setup(ctx, inputs, output):
    x, dim = inputs
    ctx.save_for_backward(x)
    ctx.dim = dim
    ctx.backend = _backend.scoped_choice()


def _gated_grad(ctx, grad_y):
    (x,) = ctx.saved_tensors
    return _backend.call(ctx.backend, gated_activation_backward, grad_y, x, ctx.dim), None


gated_activation.register_autograd(_gated_grad, setup_context=_gated_setup)


# =========================================================================================================
# Masked convolution
# The backward is split as aten's is (grad_input, grad_weight + grad_bias), so a first layer on data skips
# the transposed convolution it does not need.
# =========================================================================================================
def _check_square_odd(name: str, kh: int, kw: int) -> None:
    _require(kh == kw and kh % 2 == 1, f"{name} must be a square kernel of odd size k x k, got {kh} x {kw}")


def _check_mask(c_in: int, c_out: int, mask_type: str, color_groups: int, dilation: int) -> None:
    _require(
        c_in >= 1 and c_out >= 1,
        f"the convolution needs at least one input and one output channel, got C_in={c_in} and C_out={c_out}",
    )
    _require(mask_type in ref.MASK_TYPES, f"mask_type must be 'A' or 'B', got {mask_type!r}")
    _checks.integer("color_groups", color_groups, low=1)
    _require(
        c_in % color_groups == 0 and c_out % color_groups == 0,
        f"color_groups={color_groups} must divide both C_in={c_in} and C_out={c_out}",
    )
    _checks.integer("dilation", dilation, low=1, high=MAX_DILATION)


_PADDED_WIDTH_ROUND = 64  # the CPU kernels pad rows to whole register tiles (at most 64 elements)


def _check_padding(x: Tensor, channels: int, kernel_size: int, dilation: int) -> None:
    """The padded copy of an input (B, channels, H, W) the kernels work on: rows padded by dilation * (k // 2)
    above, columns on both sides. Refused, naming dilation, when it could never be allocated (a buffer past
    the device's memory, or an index past int64), before anything is."""
    batch, _, height, width = x.shape
    pad = dilation * (kernel_size // 2)
    padded_width = -(-max(width, 1) // _PADDED_WIDTH_ROUND) * _PADDED_WIDTH_ROUND + 2 * pad
    numel = batch * channels * (height + pad) * padded_width
    what = f"the padded copy of the input (padding dilation * (k // 2) = {pad})"
    _checks.allocation("dilation", numel, x.element_size(), x.device, what)


def _check_masked_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_type: str, color_groups: int, dilation: int
) -> None:
    _checks.float_tensor("x", x)
    _checks.float_tensor("weight", weight)
    _checks.same_place("weight", weight, "x", x)
    _require(x.dim() == 4, f"x must have shape (B, C_in, H, W), got {tuple(x.shape)}")
    _require(weight.dim() == 4, f"weight must have shape (C_out, C_in, k, k), got {tuple(weight.shape)}")
    c_out, c_in = weight.shape[:2]
    _check_square_odd("weight", *weight.shape[2:])
    _require(c_in == x.shape[1], f"weight has {c_in} input channels but x has {x.shape[1]}")
    if bias is not None:
        _checks.like("bias", bias, "x", x, shape=(c_out,))
    _check_mask(c_in, c_out, mask_type, color_groups, dilation)
    _check_padding(x, c_in, weight.shape[-1], dilation)


def _out_shape(x: Tensor, weight: Tensor) -> list[int]:
    return [x.shape[0], weight.shape[0], x.shape[2], x.shape[3]]


def _layer(weight: Tensor) -> tuple[int, int, int]:
    return weight.shape[1], weight.shape[0], weight.shape[-1]


def _dense(kernels, op: str, images: Tensor, c_in: int, c_out: int, k: int) -> bool:
    """Whether the cpu backend runs `op` of a convolution on `images` (x or grad_y: B, H, W) on torch's
    convolution (_masked_conv_dense.use_dense) rather than on the compiled kernels."""
    if not isinstance(kernels, _native.Kernels) or images.device.type != "cpu":
        return False  # the cuda backend, or Triton (interpreted) on CPU tensors
    b, _, h, w = images.shape
    return _masked_conv_dense.use_dense(op, (b, c_in, c_out, k, h, w), images.dtype)


# ---------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("genkern::masked_conv2d", mutates_args=())
def masked_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_type: str, color_groups: int, dilation: int
) -> Tensor:
    _check_masked_conv2d(x, weight, bias, mask_type, color_groups, dilation)
    return ref.masked_conv2d(x, weight, bias, mask_type, color_groups, dilation).contiguous()


@MASKED_CONV_KERNELS.register(masked_conv2d, check=_check_masked_conv2d)
def _(kernels, x, weight, bias, mask_type, color_groups, dilation):
    if _dense(kernels, "forward", x, *_layer(weight)):
        y = _masked_conv_dense.forward(x, weight, bias, mask_type, color_groups, dilation)
        if y is not None:
            return y
    y = _empty(_out_shape(x, weight), x)
    kernels.forward(x.contiguous(), weight.contiguous(), _contig(bias), y, mask_type == "B", color_groups, dilation)
    return y


@masked_conv2d.register_fake
def _(x, weight, bias, mask_type, color_groups, dilation):
    _check_masked_conv2d(x, weight, bias, mask_type, color_groups, dilation)
    return _empty(_out_shape(x, weight), x)


# ---------------------------------------------------------------------------------------------------------
# backward: d/dx
# ---------------------------------------------------------------------------------------------------------
def _check_masked_conv2d_grad_input(
    grad_y: Tensor, weight: Tensor, mask_type: str, color_groups: int, dilation: int
) -> None:
    _checks.float_tensor("grad_y", grad_y)
    _checks.float_tensor("weight", weight)
    _checks.same_place("weight", weight, "grad_y", grad_y)
    _require(weight.dim() == 4, f"weight must have shape (C_out, C_in, k, k), got {tuple(weight.shape)}")
    _require(
        grad_y.dim() == 4 and grad_y.shape[1] == weight.shape[0],
        f"grad_y must have shape (B, C_out={weight.shape[0]}, H, W), got {tuple(grad_y.shape)}",
    )
    _check_square_odd("weight", *weight.shape[2:])
    _check_mask(weight.shape[1], weight.shape[0], mask_type, color_groups, dilation)
    _check_padding(grad_y, weight.shape[0], weight.shape[-1], dilation)


def _grad_input_shape(grad_y: Tensor, weight: Tensor) -> list[int]:
    return [grad_y.shape[0], weight.shape[1], grad_y.shape[2], grad_y.shape[3]]


@torch.library.custom_op("genkern::masked_conv2d_grad_input", mutates_args=())
def masked_conv2d_grad_input(
    grad_y: Tensor, weight: Tensor, mask_type: str, color_groups: int, dilation: int
) -> Tensor:
    _check_masked_conv2d_grad_input(grad_y, weight, mask_type, color_groups, dilation)
    shape = _grad_input_shape(grad_y, weight)
    return ref.masked_conv2d_grad_input(grad_y, weight, shape, mask_type, color_groups, dilation).contiguous()


@MASKED_CONV_KERNELS.register(masked_conv2d_grad_input, check=_check_masked_conv2d_grad_input)
def _(kernels, grad_y, weight, mask_type, color_groups, dilation):
    if _dense(kernels, "grad_input", grad_y, *_layer(weight)):
        grad_x = _masked_conv_dense.grad_input(grad_y, weight, mask_type, color_groups, dilation)
        if grad_x is not None:
            return grad_x
    grad_x = _empty(_grad_input_shape(grad_y, weight), grad_y)
    kernels.grad_input(grad_y.contiguous(), weight.contiguous(), grad_x, mask_type == "B", color_groups, dilation)
    return grad_x


@masked_conv2d_grad_input.register_fake
def _(grad_y, weight, mask_type, color_groups, dilation):
    _check_masked_conv2d_grad_input(grad_y, weight, mask_type, color_groups, dilation)
    return _empty(_grad_input_shape(grad_y, weight), grad_y)


# ---------------------------------------------------------------------------------------------------------
# backward: d/dweight (zero at masked taps) and d/dbias
# ---------------------------------------------------------------------------------------------------------
def _check_masked_conv2d_grad_weight(
    grad_y: Tensor, x: Tensor, kernel_size: int, mask_type: str, color_groups: int, dilation: int
) -> None:
    _checks.float_tensor("grad_y", grad_y)
    _checks.float_tensor("x", x)
    _checks.same_place("grad_y", grad_y, "x", x)
    _require(x.dim() == 4, f"x must have shape (B, C_in, H, W), got {tuple(x.shape)}")
    _require(
        grad_y.dim() == 4 and grad_y.shape[0] == x.shape[0] and grad_y.shape[2:] == x.shape[2:],
        f"grad_y must have shape (B, C_out, H, W) with x's B, H and W, got {tuple(grad_y.shape)}",
    )
    _checks.integer("kernel_size", kernel_size, low=1)
    _require(kernel_size % 2 == 1, f"kernel_size must be odd, got {kernel_size}")
    _checks.allocation("kernel_size", _weight_shape(grad_y, x, kernel_size), x.element_size(), x.device)
    _check_mask(x.shape[1], grad_y.shape[1], mask_type, color_groups, dilation)
    _check_padding(x, x.shape[1], kernel_size, dilation)


def _weight_shape(grad_y: Tensor, x: Tensor, kernel_size: int) -> list[int]:
    return [grad_y.shape[1], x.shape[1], kernel_size, kernel_size]


@torch.library.custom_op("genkern::masked_conv2d_grad_weight", mutates_args=())
def masked_conv2d_grad_weight(
    grad_y: Tensor, x: Tensor, kernel_size: int, mask_type: str, color_groups: int, dilation: int
) -> tuple[Tensor, Tensor]:
    _check_masked_conv2d_grad_weight(grad_y, x, kernel_size, mask_type, color_groups, dilation)
    shape = _weight_shape(grad_y, x, kernel_size)
    gw, gb = ref.masked_conv2d_grad_weight(grad_y, x, shape, mask_type, color_groups, dilation)
    return gw.contiguous(), gb.contiguous()


@MASKED_CONV_KERNELS.register(masked_conv2d_grad_weight, check=_check_masked_conv2d_grad_weight)
def _(kernels, grad_y, x, kernel_size, mask_type, color_groups, dilation):
    if _dense(kernels, "grad_weight", x, x.shape[1], grad_y.shape[1], kernel_size):
        grads = _masked_conv_dense.grad_weight(grad_y, x, kernel_size, mask_type, color_groups, dilation)
        if grads is not None:
            return grads
    shape = _weight_shape(grad_y, x, kernel_size)
    grad_weight, grad_bias = _empty(shape, x), _empty([shape[0]], x)
    kernels.grad_weight(
        grad_y.contiguous(), x.contiguous(), grad_weight, grad_bias, mask_type == "B", color_groups, dilation
    )
    return grad_weight, grad_bias


@masked_conv2d_grad_weight.register_fake
def _(grad_y, x, kernel_size, mask_type, color_groups, dilation):
    _check_masked_conv2d_grad_weight(grad_y, x, kernel_size, mask_type, color_groups, dilation)
    shape = _weight_shape(grad_y, x, kernel_size)
    return _empty(shape, x), _empty([shape[0]], x)


def _masked_conv_setup(ctx, inputs, output):
    x, weight, bias, mask_type, color_groups, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (mask_type, color_groups, dilation)
    ctx.backend = _backend.scoped_choice()


def _masked_conv_grad(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    with _backend.scoped(ctx.backend):
        if ctx.needs_input_grad[0]:
            grad_x = masked_conv2d_grad_input(grad_y, weight, *ctx.args)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = masked_conv2d_grad_weight(grad_y, x, weight.shape[-1], *ctx.args)
    return grad_x, grad_weight, grad_bias if ctx.needs_input_grad[2] else None, None, None, None


masked_conv2d.register_autograd(_masked_conv_grad, setup_context=_masked_conv_setup)


# =========================================================================================================
# NADE
# x is a float tensor of the parameters' dtype here (the public functions convert it). Forward saves nothing
# beyond its inputs: backward reruns the recurrence (backwards) in the fused backward op.
# =========================================================================================================
def check_params(weight: Tensor, c: Tensor, v: Tensor, b: Tensor) -> tuple[int, int]:
    """(D, H) of parameters W (H, D), c (H), V (D, H), b (D): float tensors of one dtype and device."""
    _checks.float_tensor("weight", weight)
    _require(weight.dim() == 2, f"weight must have shape (H, D), got {tuple(weight.shape)}")
    hidden, dims = weight.shape
    for name, t, shape in (("c", c, (hidden,)), ("v", v, (dims, hidden)), ("b", b, (dims,))):
        _checks.like(name, t, "weight", weight, shape=shape)
    return dims, hidden


def _check_x(x: Tensor, weight: Tensor, dims: int) -> None:
    _require(x.dim() == 2 and x.shape[1] == dims, f"x must have shape (B, {dims}), got {tuple(x.shape)}")
    _require(
        x.dtype == weight.dtype and x.device == weight.device,
        f"x differs from weight in dtype or device ({x.dtype} on {x.device}, weight {weight.dtype} on {weight.device})",
    )


def check_sample_range(num_samples: int, first: int, dims: int, *, first_name: str = "first") -> None:
    """Stream indices (first + s) * D + i must fit int64, or two samples would share their noise (and the
    uint64 kernels and the int64 reference would draw different ones)."""
    _require(num_samples >= 0, f"num_samples must be >= 0, got {num_samples}")
    _require(first >= 0, f"{first_name} must be >= 0, got {first}")
    _require(
        (first + num_samples) * max(dims, 1) <= INT64_MAX,
        f"{first_name} + num_samples is too large: ({first_name} + num_samples) * D must stay below 2^63 "
        f"(the stream index of the last draw), got ({first} + {num_samples}) * {dims}",
    )


def _check_sample_streams(n: int, first_sample: int, per_sample: int, what: str, got: str, n_name: str) -> None:
    """Samples first_sample .. first_sample + n - 1 draw `per_sample` stream elements each (`what`, the formula;
    `got`, its factors): the last index must fit int64, as in the reference."""
    _require(n >= 0, f"{n_name} must be >= 0, got {n}")
    _require(first_sample >= 0, f"first_sample must be >= 0, got {first_sample}")
    _require(
        (first_sample + n) * per_sample <= INT64_MAX,
        f"first_sample + {n_name} is too large: (first_sample + {n_name}) * {what} must stay below 2^63 "
        f"(the stream index of the last draw), got ({first_sample} + {n}) * {got}",
    )


def check_draw_range(n: int, first_sample: int, dims: int, levels: int, *, n_name: str = "n") -> None:
    """The cached sampler's (and PixelCNN.sample's) draws: sample s, dimension i, level k uses stream element
    ((first_sample + s) * D + i) * levels + k."""
    per_sample = max(dims, 1) * max(levels, 1)
    _check_sample_streams(n, first_sample, per_sample, "dims * levels", f"{dims} * {levels}", n_name)


def check_mixture_draw_range(n: int, first_sample: int, pixels: int, draws: int, *, n_name: str = "n") -> None:
    """A logistic mixture's draws (docs/math.md, section 6.1): draw t of pixel p of sample s is stream element
    ((first_sample + s) H W + p)(K + C) + t."""
    per_sample = max(pixels, 1) * max(draws, 1)
    what = "H * W * (num_mixtures + channels)"
    _check_sample_streams(n, first_sample, per_sample, what, f"{pixels} * {draws}", n_name)


def _kernel_args(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


# ---------------------------------------------------------------------------------------------------------
# nade_log_prob: log p(x) per example, in nats
# ---------------------------------------------------------------------------------------------------------
def _check_nade_log_prob(x, weight, c, v, b) -> None:
    dims, _ = check_params(weight, c, v, b)
    _check_x(x, weight, dims)


@torch.library.custom_op("genkern::nade_log_prob", mutates_args=())
def nade_log_prob(x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor) -> Tensor:
    _check_nade_log_prob(x, weight, c, v, b)
    return ref.nade_log_prob(x, weight, c, v, b).contiguous()


@NADE_KERNELS.register(nade_log_prob, check=_check_nade_log_prob)
def _(kernels, x, weight, c, v, b):
    out = _empty((x.shape[0],), weight)
    kernels.log_prob(*_kernel_args(x, weight, c, v, b), out)
    return out


@nade_log_prob.register_fake
def _(x, weight, c, v, b):
    _check_nade_log_prob(x, weight, c, v, b)
    return _empty((x.shape[0],), weight)


def _check_nade_log_prob_backward(grad_out, x, weight, c, v, b) -> None:
    _check_nade_log_prob(x, weight, c, v, b)
    _checks.float_tensor("grad_out", grad_out)
    _require(
        tuple(grad_out.shape) == (x.shape[0],), f"grad_out has shape {tuple(grad_out.shape)}, expected ({x.shape[0]},)"
    )
    _require(
        grad_out.dtype == weight.dtype and grad_out.device == weight.device,
        "grad_out differs from weight in dtype or device",
    )


@torch.library.custom_op("genkern::nade_log_prob_backward", mutates_args=())
def nade_log_prob_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_weight, grad_c, grad_v, grad_b) of sum_n grad_out[n] log p(x[n])."""
    _check_nade_log_prob_backward(grad_out, x, weight, c, v, b)
    return tuple(t.contiguous() for t in ref.nade_log_prob_backward(grad_out, x, weight, c, v, b))


@NADE_KERNELS.register(nade_log_prob_backward, check=_check_nade_log_prob_backward)
def _(kernels, grad_out, x, weight, c, v, b):
    grads = [_empty(t.shape, weight) for t in (weight, c, v, b)]
    kernels.log_prob_backward(*_kernel_args(grad_out, x, weight, c, v, b), *grads)
    return tuple(grads)


@nade_log_prob_backward.register_fake
def _(grad_out, x, weight, c, v, b):
    _check_nade_log_prob_backward(grad_out, x, weight, c, v, b)
    return tuple(_empty(t.shape, weight) for t in (weight, c, v, b))


def _nade_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.backend = _backend.scoped_choice()


def _nade_grad(ctx, grad_out):
    x, weight, c, v, b = ctx.saved_tensors
    grads = _backend.call(ctx.backend, nade_log_prob_backward, grad_out.contiguous(), x, weight, c, v, b)
    return None, *grads  # x is data: no gradient


nade_log_prob.register_autograd(_nade_grad, setup_context=_nade_setup)


# ---------------------------------------------------------------------------------------------------------
# nade_sample: samples first .. first + num_samples - 1 from the genkern stream (seed, offset)
# ---------------------------------------------------------------------------------------------------------
def _check_nade_sample(weight, c, v, b, num_samples, seed, offset, first) -> None:
    dims, _ = check_params(weight, c, v, b)
    check_sample_range(num_samples, first, dims)
    _checks.allocation("num_samples", (num_samples, dims), weight.element_size(), weight.device)


@torch.library.custom_op("genkern::nade_sample", mutates_args=())
def nade_sample(
    weight: Tensor, c: Tensor, v: Tensor, b: Tensor, num_samples: int, seed: int, offset: int, first: int
) -> Tensor:
    """(num_samples, D) of 0.0 / 1.0 in the parameters' dtype. seed and offset are uint64 carried as int64."""
    _check_nade_sample(weight, c, v, b, num_samples, seed, offset, first)
    return ref.nade_sample(num_samples, weight, c, v, b, to_unsigned(seed), to_unsigned(offset), first).contiguous()


@NADE_KERNELS.register(nade_sample, check=_check_nade_sample)
def _(kernels, weight, c, v, b, num_samples, seed, offset, first):
    out = _empty((num_samples, weight.shape[1]), weight)
    kernels.sample(*_kernel_args(weight, c, v, b), out, to_unsigned(seed), to_unsigned(offset), first)
    return out


@nade_sample.register_fake
def _(weight, c, v, b, num_samples, seed, offset, first):
    _check_nade_sample(weight, c, v, b, num_samples, seed, offset, first)
    return _empty((num_samples, weight.shape[1]), weight)


# =========================================================================================================
# Gumbel-max draws and cached sampling
# `genkern::gumbel_argmax`, and the cached sampler's program runner (a model-level routine, not a graph op:
# it takes a whole program of caches and nodes).
# =========================================================================================================
def _check_gumbel_shapes(logits: Tensor, base: Tensor) -> None:
    """What the fake implementation can check: everything but base's values."""
    _checks.float_tensor("logits", logits)
    _require(
        logits.dim() == 2 and logits.shape[1] >= 1,
        f"logits must have shape (N, levels >= 1), got {tuple(logits.shape)}",
    )
    _checks.tensor("base", base)
    if base.dtype != torch.int64:
        raise TypeError(f"base must be an int64 tensor, got {base.dtype}")
    _require(
        tuple(base.shape) == (logits.shape[0],) and base.device == logits.device,
        f"base must have shape ({logits.shape[0]},) on logits' device, got {tuple(base.shape)} on {base.device}",
    )


def _check_gumbel_argmax(logits: Tensor, base: Tensor, seed: int, offset: int) -> None:
    _check_gumbel_shapes(logits, base)
    # Data-dependent: on a GPU this waits for base; skipped for meta and fake tensors (no values).
    if base.numel() and _checks.has_values(base):
        lo, hi = torch.stack((base.min(), base.max())).tolist()
        _require(lo >= 0, f"base must be non-negative, got a row at {lo}")
        levels = logits.shape[1]
        _require(
            hi <= INT64_MAX - (levels - 1),
            f"base + levels - 1 (the stream index of a row's last draw) must stay below 2^63, got base {hi} "
            f"with {levels} levels",
        )


@torch.library.custom_op("genkern::gumbel_argmax", mutates_args=())
def gumbel_argmax(logits: Tensor, base: Tensor, seed: int, offset: int) -> Tensor:
    _check_gumbel_argmax(logits, base, seed, offset)
    return ref.gumbel_argmax(logits, base, to_unsigned(seed), to_unsigned(offset))


@SAMPLING_KERNELS.register(gumbel_argmax, check=_check_gumbel_argmax)
def _(kernels, logits, base, seed, offset):
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    kernels.gumbel_argmax(logits.contiguous(), base.contiguous(), out, to_unsigned(seed), to_unsigned(offset))
    return out


@gumbel_argmax.register_fake
def _(logits, base, seed, offset):
    _check_gumbel_shapes(logits, base)
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def run_program(
    caches: list[Tensor],
    nodes: list[tuple],
    segments: list[list[tuple[int, int, int, int]]],
    out: Tensor,
    logits: int,
    levels: int,
    scale: float,
    shift: float,
    seed: int,
    offset: int,
    first_sample: int,
    mixtures: int = 0,
    coupled: bool = False,
) -> None:
    """Run a cached-sampling program (csrc/autoregressive/pixelcnn_sampling.h) into `out`, on the selected
    backend for out's device (genkern.backend.selected: the scoped choice, else the process-wide one, else
    automatic). `segments` is the program's colour plan (genkern.autoregressive.sampling_plan). The compiled
    runner checks the program and the plan's bounds itself. mixtures = K > 0: the logits cache holds a
    logistic mixture's params ((1 + 2C)K, or 10K with `coupled` RGB), each pixel drawn whole."""
    batch, colors, height, width = out.shape
    mixtures = _checks.integer("mixtures", mixtures, low=0)
    if not isinstance(coupled, bool):
        raise TypeError(f"coupled must be a bool, got {type(coupled).__name__}")
    if mixtures:
        check_mixture_draw_range(batch, first_sample, height * width, mixtures + colors, n_name="batch")
    else:
        check_draw_range(batch, first_sample, colors * height * width, levels, n_name="batch")
    backend = _backend.selected(out.device, torch.float32, SAMPLING_KERNELS.family)
    head = (mixtures, coupled)
    if backend == "reference":
        ref.run_program(caches, nodes, segments, out, logits, levels, scale, shift, seed, offset, first_sample, *head)
        return
    described = [tuple(_native.array(v) if isinstance(v, Tensor) else v for v in node) for node in nodes]
    SAMPLING_KERNELS.on(backend).sample(
        [_native.array(c) for c in caches],
        described,
        segments,
        out,
        logits,
        levels,
        scale,
        shift,
        seed,
        offset,
        first_sample,
        *head,
    )


# =========================================================================================================
# The sampling head: `genkern::sample_logits`, Gumbel-max draws after temperature, top_k, top_p and min_p
# (docs/math.md, section 6.2). The filters are per-row tensors (the public functions expand scalars).
# =========================================================================================================
def _triton_sampling_head():
    from ..kernels.autoregressive import sampling_head

    return sampling_head


SAMPLING_HEAD_KERNELS = KernelGroup(
    "sampling_head", native=lambda: _native._C.sampling_head, triton=_triton_sampling_head
)

# Each filter's dtype and the values it takes; the kernels read them as given.
ROW_FILTERS = {
    "temperature": (torch.float64, "finite and >= 0", lambda t: torch.isfinite(t) & (t >= 0)),
    "top_k": (torch.int64, ">= 0", lambda t: t >= 0),
    "top_p": (torch.float64, "in (0, 1]", lambda t: (t > 0) & (t <= 1)),
    "min_p": (torch.float64, "in [0, 1]", lambda t: (t >= 0) & (t <= 1)),
}


def _check_sample_logits_shapes(logits: Tensor, base: Tensor, filters: dict[str, Tensor]) -> None:
    _check_gumbel_shapes(logits, base)
    rows = logits.shape[0]
    for name, (dtype, _, _) in ROW_FILTERS.items():
        t = filters[name]
        _checks.tensor(name, t)
        _require(
            t.dtype == dtype and tuple(t.shape) == (rows,) and t.device == logits.device,
            f"{name} must be a {dtype} tensor of shape ({rows},) on logits' device, got {t.dtype} of shape "
            f"{tuple(t.shape)} on {t.device}",
        )


def _check_sample_logits(logits, base, seed, offset, temperature, top_k, top_p, min_p) -> None:
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    _check_sample_logits_shapes(logits, base, filters)
    _check_gumbel_argmax(logits, base, seed, offset)
    if logits.shape[0] and _checks.has_values(temperature):
        good = torch.stack([ok(filters[name]).all() for name, (_, _, ok) in ROW_FILTERS.items()]).tolist()
        for (name, (_, allowed, ok)), fine in zip(ROW_FILTERS.items(), good):
            if not fine:
                row = int((~ok(filters[name])).nonzero()[0, 0])
                raise ValueError(f"{name} must be {allowed}, got {filters[name][row].item()} in row {row}")


@torch.library.custom_op("genkern::sample_logits", mutates_args=())
def sample_logits(
    logits: Tensor,
    base: Tensor,
    seed: int,
    offset: int,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
) -> Tensor:
    _check_sample_logits(logits, base, seed, offset, temperature, top_k, top_p, min_p)
    return ref.sample_logits(logits, base, to_unsigned(seed), to_unsigned(offset), temperature, top_k, top_p, min_p)


@SAMPLING_HEAD_KERNELS.register(sample_logits, check=_check_sample_logits)
def _(kernels, logits, base, seed, offset, temperature, top_k, top_p, min_p):
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    filters = [t.contiguous() for t in (temperature, top_k, top_p, min_p)]
    kernels.sample_logits(logits.contiguous(), base.contiguous(), out, *filters, to_unsigned(seed), to_unsigned(offset))
    return out


@sample_logits.register_fake
def _(logits, base, seed, offset, temperature, top_k, top_p, min_p):
    _check_sample_logits_shapes(logits, base, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


# =========================================================================================================
# Discretised logistic mixture (PixelCNN++'s head): its ops are in _logistic_mixture_ops, imported here so
# that importing the family's ops registers all of them.
# =========================================================================================================
from ._logistic_mixture_ops import (  # noqa: E402, F401
    MIXTURE_KERNELS,
    logistic_mixture_log_prob,
    logistic_mixture_log_prob_backward,
    logistic_mixture_sample,
)
