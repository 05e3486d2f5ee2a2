"""causal-conv1d's API (Dao-AILab/causal-conv1d: causal_conv1d_fn, causal_conv1d_update,
causal_conv1d_varlen_states) on genkern's kernels, with its signatures, argument order, defaults and return
conventions, so Mamba-style code runs by changing its import:

    from genkern.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states

The math is genkern's causal conv1d with states (docs/math.md, section 6.3) with dilation 1; every call runs
on genkern's selected backend (cpu, cuda or triton) and is differentiable where causal-conv1d's is.
Differences, all supersets: any width K >= 1 (causal-conv1d's kernels take 2-4); seq_idx combines with
initial_states and return_final_states (initial states count as the first sequence's); final states in
either layout (causal-conv1d returns them only for channel-last x). A weight or bias of another floating dtype
than x is cast to x's dtype (causal-conv1d computes with it in float32; outputs are x's dtype in both).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import autoregressive as _ar


class ActivationError(ValueError, NotImplementedError):
    """An activation other than None, "silu" or "swish": a ValueError (genkern's convention) that is also
    the NotImplementedError causal-conv1d raises."""


def _activation(activation: Optional[str]) -> Optional[str]:
    if activation not in (None, "silu", "swish"):
        raise ActivationError(f"activation must be None, silu, or swish, got {activation!r}")
    return activation


def _like_x(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return t if t is None or t.dtype == x.dtype else t.to(x.dtype)


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[Tensor] = None,
    activation: Optional[str] = None,
):
    """x (batch, dim, seqlen), channel-first or channel-last; weight (dim, width); bias (dim,); seq_idx
    (batch, seqlen) int32; initial_states (batch, dim, width - 1); final_states_out (batch, dim, width - 1),
    written to when given; activation None, "silu" or "swish". Returns out (batch, dim, seqlen) in x's
    layout, or (out, final_states) with return_final_states."""
    activation = _activation(activation)
    y = _ar.causal_conv1d(
        x,
        _like_x(weight, x),
        _like_x(bias, x),
        activation=activation,
        initial_states=initial_states,
        return_final_states=return_final_states,
        seq_idx=seq_idx,
    )
    if not return_final_states:
        return y
    out, final = y
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    cache_seqlens: Optional[Tensor] = None,
    conv_state_indices: Optional[Tensor] = None,
) -> Tensor:
    """x (batch, dim) or (batch, dim, seqlen); conv_state (batch, dim, state_len), state_len >= width - 1,
    updated in place (a circular buffer written at cache_seqlens % state_len with cache_seqlens (batch,)
    int32; conv_state_indices (batch,) int32 picks rows of a larger conv_state, negative = padding). Returns
    out of x's shape."""
    activation = _activation(activation)
    return _ar.causal_conv1d_update(
        x,
        conv_state,
        _like_x(weight, x),
        _like_x(bias, x),
        activation=activation,
        cache_seqlens=cache_seqlens,
        conv_state_indices=conv_state_indices,
    )


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """x (total_tokens, dim); cu_seqlens (batch + 1,) sorted, from 0. Returns states (batch, dim, state_len)
    (channel-last storage): each sequence's last state_len inputs, zeros where it is shorter."""
    return _ar.causal_conv1d_varlen_states(x, cu_seqlens, state_len)


__all__ = ["causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_varlen_states"]
