"""The autoregressive family's eager references: the readable spec of every op (docs/math.md, section 4).

Causal 1-D convolutions (and WaveNet's gate), PixelCNN masked convolutions, NADE, Gumbel-max draws on the
genkern stream and the cached sampler's program run position by position. Half types compute in float32,
as the kernels do; random uniforms are exact (float64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..random.reference import MASK32, philox4x32_10, uniform

# ---------------------------------------------------------------------------------------------------------
# Causal convolution
# ---------------------------------------------------------------------------------------------------------
# Reference implementations of the causal_conv1d family (docs/math.md, section 4): the spec.
#
#     y[b, o, l] = act(bias[o] + sum_{i, k} w[o, i, k] * x[b, i, l - (K - 1 - k) * dilation])
#
# with x zero left of position 0, so output l sees inputs <= l only. A depthwise weight (C, K) pairs output
# channel o with input channel o. `gated_activation` (WaveNet's tanh(a) * sigmoid(b) gate) lives here too:
# it is the nonlinearity these convolutions feed. Half types compute in float32, as the kernels do.


ACTIVATIONS = ("none", "silu", "tanh")


def _compute(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is not None and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    return z


def _activate_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "tanh":
        return 1 - torch.tanh(z) ** 2
    return torch.ones_like(z)


def receptive_field(kernel_size: int, dilation: int) -> int:
    """How many past inputs an output sees besides the current one: the causal left padding."""
    return (kernel_size - 1) * dilation


def _zeros_on(shape, *inputs):
    """Zeros of `shape` that autograd sees as depending on the inputs (each reduced to a sum), with their
    values never read: torch.where picks the zeros, so a NaN in an input does not reach them and the inputs'
    gradient through them is exactly 0. A convolution with no tap inside the data still has the graph its
    callers differentiate."""
    link = sum(t.sum() for t in inputs)
    return torch.where(torch.zeros((), dtype=torch.bool, device=link.device), link, link.new_zeros(shape))


def _taps(kernel_size: int, dilation: int, length: int):
    """(k, shift) for each tap that reads inside the sequence somewhere: tap k of output l reads input
    l - shift, shift = (K - 1 - k) dilation; a tap whose shift is >= L reads only the zero padding."""
    for k in range(kernel_size):
        shift = (kernel_size - 1 - k) * dilation
        if shift < length:
            yield k, shift


def _pre_activation(x, weight, bias, dilation):
    """z = bias + the sum over taps, each tap adding its weight times the inputs it reads inside the
    sequence: positions before 0 (the zero padding) contribute nothing, not weight * 0 (NaN rule below)."""
    x, w = _compute(x), _compute(weight)
    B, _, L = x.shape
    z = _zeros_on((B, weight.shape[0], L), x, w)
    for k, shift in _taps(weight.shape[-1], dilation, L):
        xs = x[..., : L - shift]
        if weight.dim() == 2:
            z[..., shift:] += w[:, k, None] * xs
        else:
            z[..., shift:] += torch.einsum("oi,bil->bol", w[..., k], xs)
    return z if bias is None else z + _compute(bias)[:, None]


def causal_conv1d(x, weight, bias=None, dilation=1, activation="none"):
    """x (B, C_in, L), weight (C_out, C_in, K) or depthwise (C, K), bias (C_out,) or None -> (B, C_out, L).

    NaN rule: the causal zero padding is not data: a tap contributes only where it reads an input at a
    position >= 0, so an inf or NaN weight reaches the outputs (and the gradients) that read real inputs
    through it, and never the outputs whose tap falls before the start (no 0 * inf). Any NaN or inf in an
    input that a tap does read propagates as IEEE arithmetic has it (inf * 0 = NaN there)."""
    return _activate(_pre_activation(x, weight, bias, dilation), activation).to(x.dtype)


def causal_conv1d_backward(grad_y, x, weight, bias=None, dilation=1, activation="none"):
    """(grad_x, grad_weight, grad_bias or None), written out: what the backward kernels compute. Each tap
    pairs only the positions it reads inside the sequence (the NaN rule of causal_conv1d)."""
    gz = _compute(grad_y) * _activate_grad(_pre_activation(x, weight, bias, dilation), activation)
    grad_b = gz.sum((0, 2)).to(bias.dtype) if bias is not None else None
    xc, w = _compute(x), _compute(weight)
    L = x.shape[2]
    grad_x, grad_w = torch.zeros_like(xc), torch.zeros_like(w)
    for k, shift in _taps(weight.shape[-1], dilation, L):
        xs, gs = xc[..., : L - shift], gz[..., shift:]
        if weight.dim() == 2:
            grad_x[..., : L - shift] += w[:, k, None] * gs
            grad_w[:, k] = (gs * xs).sum((0, 2))
        else:
            grad_x[..., : L - shift] += torch.einsum("oi,bol->bil", w[..., k], gs)
            grad_w[..., k] = torch.einsum("bol,bil->oi", gs, xs)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b


def causal_conv1d_update(x, state, weight, bias=None, dilation=1, activation="none"):
    """One generation step. x (B, C_in) is the next input; state (B, C_in, W), W >= (K - 1) * dilation, holds
    the W previous inputs, oldest first (zeros before the sequence starts: the causal padding). Returns
    (y (B, C_out), new_state): y is the convolution's output at x's position, new_state is state shifted left
    by one with x appended."""
    need = receptive_field(weight.shape[-1], dilation)
    window = torch.cat([state[..., state.shape[-1] - need :], x.unsqueeze(-1)], dim=-1)
    y = causal_conv1d(window, weight, bias, dilation, activation)[..., -1]
    new_state = torch.cat([state[..., 1:], x.unsqueeze(-1)], dim=-1) if state.shape[-1] else state
    return y, new_state


def gated_activation(x, dim=1):
    """tanh(a) * sigmoid(b) with (a, b) the two halves of `dim` of x, a first."""
    a, b = _compute(x).chunk(2, dim=dim)
    return (torch.tanh(a) * torch.sigmoid(b)).to(x.dtype)


def gated_activation_backward(grad_y, x, dim=1):
    a, b = _compute(x).chunk(2, dim=dim)
    t, s, g = torch.tanh(a), torch.sigmoid(b), _compute(grad_y)
    return torch.cat([g * (1 - t * t) * s, g * t * s * (1 - s)], dim=dim).to(x.dtype)


# Causal convolution with carried states (docs/math.md, section 6.3): causal-conv1d's API. Depthwise weight
# (C, K); P = (K - 1) * dilation past inputs per row. Outputs come back in x's layout (channel-last stays
# channel-last), as the kernels write them.


def channel_last(x: torch.Tensor) -> bool:
    """Whether (B, C, L) x is channel-last: stride 1 along C and not plain contiguous. A contiguous (B, L, C)
    tensor transposed is read in place; a channel slice of a wider one (Mamba's xBC) is first made dense."""
    return x.dim() == 3 and not x.is_contiguous() and x.stride(1) == 1


def in_layout(t: torch.Tensor, last: bool) -> torch.Tensor:
    """(B, C, n) t with contiguous storage in the given layout."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if last else t.contiguous()


def _sequence_taps(seq_idx, past: int, shift: int, length: int):
    """(B, L) bool: whether output l and its tap source l - shift are in one sequence; the initial states
    (sources before 0) count as the first position's sequence."""
    if length == 0:  # no outputs (and no first position to extend)
        return torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    first = seq_idx[:, :1].expand(-1, past)
    ext = torch.cat([first, seq_idx], dim=1)
    return ext[:, past - shift : past - shift + length] == seq_idx


def _states_taps(x, weight, initial_states, seq_idx, dilation):
    """xe = [initial_states or zeros, x] in the compute type (B, C, P + L), and for each tap k its source
    window slice start P - shift and its (B, L) mask of the outputs where it counts: the source exists (a
    position >= 0, or initial states given) and, with seq_idx, lies in output l's sequence."""
    xc = _compute(x)
    B, C, L = x.shape
    K = weight.shape[1]
    P = receptive_field(K, dilation)
    init = xc.new_zeros((B, C, P)) if initial_states is None else _compute(initial_states)
    xe = torch.cat([init, xc], dim=-1)
    pos = torch.arange(L, device=x.device)
    taps = []
    for k in range(K):
        shift = (K - 1 - k) * dilation
        ok = (pos >= shift) if initial_states is None else torch.ones_like(pos, dtype=torch.bool)
        ok = ok.expand(B, L)
        if seq_idx is not None:
            ok = ok & _sequence_taps(seq_idx, P, shift, L)
        taps.append((k, P - shift, ok[:, None, :]))
    return xe, taps


def _states_pre_activation(xe, taps, weight, bias, length):
    w = _compute(weight)
    B, C, _ = xe.shape
    z = _zeros_on((B, C, length), xe, w)
    if bias is not None:
        z = z + _compute(bias)[:, None]
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    for k, start, ok in taps:
        z = z + torch.where(ok, w[:, k, None] * xe[..., start : start + length], zero)
    return z


def causal_conv1d_states(x, weight, bias=None, initial_states=None, seq_idx=None, dilation=1, activation="none"):
    """(y, final_states). y[b, c, l] = act(bias[c] + sum over the taps that count of w[c, k] xe[b, c, l -
    (K - 1 - k) dilation]) with xe = [initial_states, x] (P + L long); a tap counts when its source exists
    (a position >= 0, or initial states given) and, with seq_idx, lies in output l's sequence; outputs with
    seq_idx < 0 are 0. final_states = the last P entries of xe (zeros where neither exists)."""
    last = channel_last(x)
    L = x.shape[2]
    P = receptive_field(weight.shape[1], dilation)
    xe, taps = _states_taps(x, weight, initial_states, seq_idx, dilation)
    y = _activate(_states_pre_activation(xe, taps, weight, bias, L), activation)
    if seq_idx is not None:
        y = torch.where((seq_idx < 0)[:, None, :], torch.zeros((), dtype=y.dtype, device=y.device), y)
    final = xe[..., xe.shape[-1] - P :]
    return in_layout(y.to(x.dtype), last), in_layout(final.to(x.dtype), last)


def causal_conv1d_states_backward(
    grad_y, grad_final, x, weight, bias=None, initial_states=None, seq_idx=None, dilation=1, activation="none"
):
    """(grad_x, grad_weight, grad_bias or None, grad_initial_states or None) of causal_conv1d_states for the
    output gradients grad_y and grad_final (None: no gradient reaches final_states). With gz = dL/dz (0 where
    seq_idx < 0), each tap that counts sends w[c, k] gz to its source in xe and gz xe to w[c, k];
    grad_final adds to the last P entries of xe, which split into grad_initial_states and grad_x."""
    L = x.shape[2]
    P = receptive_field(weight.shape[1], dilation)
    xe, taps = _states_taps(x, weight, initial_states, seq_idx, dilation)
    w = _compute(weight)
    gz = _compute(grad_y) * _activate_grad(_states_pre_activation(xe, taps, weight, bias, L), activation)
    zero = torch.zeros((), dtype=gz.dtype, device=gz.device)
    if seq_idx is not None:
        gz = torch.where((seq_idx < 0)[:, None, :], zero, gz)
    grad_e = torch.zeros_like(xe)
    grad_w = torch.zeros_like(w)
    for k, start, ok in taps:
        grad_e[..., start : start + L] += torch.where(ok, w[:, k, None] * gz, zero)
        grad_w[:, k] = torch.where(ok, gz * xe[..., start : start + L], zero).sum((0, 2))
    if grad_final is not None:
        grad_e[..., grad_e.shape[-1] - P :] += _compute(grad_final)
    grad_b = gz.sum((0, 2)).to(bias.dtype) if bias is not None else None
    # A copy: grad_x is a view of grad_e too, and an op's outputs must not share storage (with P = 0 they would).
    grad_i = grad_e[..., :P].to(x.dtype).clone() if initial_states is not None else None
    return grad_e[..., P:].to(x.dtype), grad_w.to(weight.dtype), grad_b, grad_i


def causal_conv1d_update_states(
    x, state, weight, bias=None, cache_seqlens=None, conv_state_indices=None, dilation=1, activation="none"
):
    """(y, new_state) of a generation call: x (B, C, L) are L new inputs of each batch row b, which uses state
    row r = conv_state_indices[b] (b without indices) of state (R, C, S); r < 0 is a padding slot (y = 0, no
    state change). The window of past inputs is the last P state entries, or with cache_seqlens n (a circular
    buffer) the entries (n - P + j) mod S, j < P. The new inputs then enter the state: appended (the state
    keeps its last S entries), or written at (n + j) mod S, a later one winning."""
    B, C, L = x.shape
    S = state.shape[-1]
    P = receptive_field(weight.shape[1], dilation)
    new_state = state.clone()
    ys = []
    for b in range(B):
        r = b if conv_state_indices is None else int(conv_state_indices[b])
        if r < 0:
            ys.append(torch.zeros_like(x[b]))
            continue
        row = state[r]
        if cache_seqlens is None:
            past = row[:, S - P :]
            new_state[r] = torch.cat([row, x[b]], dim=-1)[:, L:]
        else:
            n = int(cache_seqlens[b])
            past = row[:, (n - P + torch.arange(P, device=x.device)) % S]
            keep = min(L, S)  # with more new inputs than slots only the last S stay
            slots = (n + torch.arange(L - keep, L, device=x.device)) % S
            new_state[r][:, slots] = x[b][:, L - keep :]
        y, _ = causal_conv1d_states(x[b : b + 1].contiguous(), weight, bias, past[None], None, dilation, activation)
        ys.append(y[0])
    y = torch.stack(ys) if ys else torch.empty_like(x)
    return in_layout(y, channel_last(x)), new_state


def causal_conv1d_varlen_states(x, cu_seqlens, state_len: int):
    """(B, C, S) states of the sequences [cu_seqlens[b], cu_seqlens[b + 1]) packed in x (T, C): the last S
    inputs of each, zeros where the sequence is shorter; channel-last storage."""
    B, C = cu_seqlens.shape[0] - 1, x.shape[1]
    states = x.new_zeros((B, state_len, C))
    for b in range(B):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        take = min(end - start, state_len)
        if take > 0:
            states[b, state_len - take :] = x[end - take : end]
    return states.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Masked convolution
# ---------------------------------------------------------------------------------------------------------
# Reference of the masked_conv family (docs/math.md, section 4): the PixelCNN masked convolution.
#
# `masked_conv2d` is F.conv2d on the weight times its 0/1 mask: stride 1, 'same' output size, written here as
# the sum over the visible taps of each tap's weights times the inputs it reads inside the image. Like the
# kernels, it never reads the masked weights (garbage there changes nothing) nor multiplies the padding.


MASK_TYPES = ("A", "B")


def mask(
    kernel_size: int,
    mask_type: str,
    in_channels: int,
    out_channels: int,
    color_groups: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The (out_channels, in_channels, k, k) 0/1 mask: rows above the centre, the centre row left of the
    centre, and at the centre tap output group g sees input group h iff h < g (A) or h <= g (B)."""
    k, c = kernel_size, kernel_size // 2
    m = torch.zeros(out_channels, in_channels, k, k, dtype=dtype, device=device)
    m[:, :, :c, :] = 1
    m[:, :, c, :c] = 1
    g_out = torch.arange(out_channels, device=device) // (out_channels // color_groups)
    g_in = torch.arange(in_channels, device=device) // (in_channels // color_groups)
    sees = g_in[None, :] < g_out[:, None] if mask_type == "A" else g_in[None, :] <= g_out[:, None]
    m[:, :, c, c] = sees.to(dtype)
    return m


def padding(kernel_size: int, dilation: int) -> int:
    return dilation * (kernel_size // 2)


def _masked_taps(weight_shape, mask_type, color_groups, dilation, height, width, device):
    """The taps a masked convolution reads, each as (ky, kx, rows, cols, visible): for outputs at rows[0] x
    cols[0] it reads inputs at rows[1] x cols[1] (the part of the shifted window inside the image), and
    `visible` lists (output channels, n): those outputs see input channels [0, n) through the tap (the
    mask's centre tap shows a prefix of the channel groups; the other visible taps show every channel)."""
    c_out, c_in, k, _ = weight_shape
    centre = k // 2
    m = mask(k, mask_type, c_in, c_out, color_groups, dtype=torch.bool, device=device)
    for ky in range(k):
        for kx in range(k):
            dy, dx = (ky - centre) * dilation, (kx - centre) * dilation
            if not m[:, :, ky, kx].any() or abs(dy) >= height or abs(dx) >= width:
                continue
            rows = (slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy)))
            cols = (slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx)))
            seen = m[:, :, ky, kx].sum(1)  # a prefix of the input channels for each output channel
            visible = [((seen == n).nonzero().flatten(), int(n)) for n in seen.unique().tolist() if n > 0]
            yield rows, cols, visible, ky, kx


def masked_conv2d(x, weight, bias=None, mask_type="A", color_groups=1, dilation=1):
    """F.conv2d(x, weight * mask, bias) with 'same' padding; half types compute in float32.

    NaN rule: a masked tap and a tap position outside the image (the zero padding) are not read at all:
    neither the weight there nor the input it would meet is multiplied in, so an inf or NaN in a masked
    weight, or in an input that an output sees only through masked taps, never reaches that output (no
    0 * inf). What a visible tap reads inside the image propagates as IEEE arithmetic has it."""
    dtype = x.dtype
    xc, w = _compute(x), _compute(weight)
    B, _, H, W = x.shape
    y = _zeros_on((B, weight.shape[0], H, W), xc, w)
    for rows, cols, visible, ky, kx in _masked_taps(weight.shape, mask_type, color_groups, dilation, H, W, x.device):
        for outs, n in visible:
            contrib = torch.einsum("oi,bihw->bohw", w[outs, :n, ky, kx], xc[:, :n, rows[1], cols[1]])
            y[:, outs, rows[0], cols[0]] += contrib
    if bias is not None:
        y = y + _compute(bias)[:, None, None]
    return y.to(dtype)


def masked_conv2d_grad_input(grad_y, weight, input_shape, mask_type="A", color_groups=1, dilation=1):
    """d/dx: the transposed convolution of grad_y with the visible taps only (masked_conv2d's NaN rule)."""
    g, w = _compute(grad_y), _compute(weight)
    B, c_in, H, W = input_shape
    grad_x = g.new_zeros(B, c_in, H, W)
    for rows, cols, visible, ky, kx in _masked_taps(weight.shape, mask_type, color_groups, dilation, H, W, g.device):
        for outs, n in visible:
            contrib = torch.einsum("oi,bohw->bihw", w[outs, :n, ky, kx], g[:, outs, rows[0], cols[0]])
            grad_x[:, :n, rows[1], cols[1]] += contrib
    return grad_x.to(grad_y.dtype)


def masked_conv2d_grad_weight(grad_y, x, weight_shape, mask_type="A", color_groups=1, dilation=1):
    """(d/dweight, d/dbias): the weight gradient sums grad_y times the inputs each visible tap reads inside
    the image, and is exactly zero at masked taps (never computed: a NaN in x or grad_y does not reach
    them); the bias gradient sums grad_y."""
    g, xc = _compute(grad_y), _compute(x)
    _, _, H, W = x.shape
    gw = g.new_zeros(weight_shape)
    for rows, cols, visible, ky, kx in _masked_taps(weight_shape, mask_type, color_groups, dilation, H, W, g.device):
        for outs, n in visible:
            gw[outs, :n, ky, kx] = torch.einsum(
                "bohw,bihw->oi", g[:, outs, rows[0], cols[0]], xc[:, :n, rows[1], cols[1]]
            )
    return gw.to(grad_y.dtype), g.sum((0, 2, 3)).to(grad_y.dtype)


# ---------------------------------------------------------------------------------------------------------
# NADE
# ---------------------------------------------------------------------------------------------------------
# Reference implementation of the NADE family (docs/math.md, section 4): the spec.
#
# NADE (Larochelle & Murray, 2011) models a binary vector x in {0, 1}^D autoregressively, with parameters
# W (H, D), c (H), V (D, H), b (D) shared across the D conditionals:
#
#     a_1 = c,   a_{i+1} = a_i + W[:, i] x_i,   h_i = sigmoid(a_i),   l_i = b_i + V_i . h_i,
#     p(x_i = 1 | x_<i) = sigmoid(l_i),   log p(x) = sum_i x_i l_i - softplus(l_i)   (nats).
#
# Sampling draws dimension i of sample s (s counted from `first`) from the genkern stream (seed, offset) at
# element s * D + i: with u = ((bits >> 8) + 0.5) 2^-24 the stream's uniform, x_i = 1 iff u < p(x_i = 1 | x_<i),
# compared exactly. A sample therefore depends on (seed, offset, s) only, never on how many are drawn at once.
#
# Half types compute in float32, as the kernels do; random uniforms are exact (float64).
#
# NaN rule: x is binary, and a term with x_k = 0 is absent, not multiplied by 0: W[:, k] enters a_{k+1} (and
# gets a gradient) only from the examples with x_k = 1, and log p adds l_i only where x_i = 1. So an inf or
# NaN in W[:, k] reaches exactly the examples with x_k = 1; everything else propagates as IEEE has it.


def _nade_compute(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def nade_logits(x, weight, c, v, b):
    """l (B, D): the logit of p(x_i = 1 | x_<i) for each example and dimension. x (B, D), W (H, D), c (H),
    V (D, H), b (D). The pre-activations a_i = c + sum_{k < i} W[:, k] x_k come from one exclusive cumulative
    sum over k, (B, H, D) in memory."""
    x, weight, c, v, b = (_nade_compute(t) for t in (x, weight, c, v, b))
    h = torch.sigmoid(c[None, :, None] + _sum_before(_steps(x, weight)))
    return b + torch.einsum("bhd,dh->bd", h, v)


def _steps(x, weight):
    """W[:, k] x_k as (B, H, D): W[:, k] where x_k = 1 and exactly 0 where x_k = 0 (NaN rule: a weight column
    is added only for the dimensions that are on, so an inf or NaN in W[:, k] never meets x_k = 0)."""
    on = (x != 0)[:, None, :]
    return torch.where(on, weight[None] * x[:, None, :], torch.zeros((), dtype=weight.dtype, device=weight.device))


def _sum_before(t: torch.Tensor) -> torch.Tensor:
    """[..., i] = sum over k < i of t[..., k] (exclusive cumulative sum over the last dim)."""
    return F.pad(t.cumsum(-1), (1, 0))[..., :-1]


def nade_log_prob(x, weight, c, v, b):
    """log p(x) in nats, (B,), in the parameters' dtype (half types: computed in float32, rounded once)."""
    l = nade_logits(x, weight, c, v, b)
    return (_on(x, l) - F.softplus(l)).sum(-1).to(weight.dtype)


def _on(x, t):
    """x t for x of 0/1 values, exactly 0 where x = 0 (whatever t is there: inf or NaN included)."""
    x = _nade_compute(x)
    return torch.where(x != 0, x * t, torch.zeros((), dtype=t.dtype, device=t.device))


def nade_sample(num_samples: int, weight, c, v, b, seed: int, offset: int = 0, first: int = 0):
    """(num_samples, D) samples first .. first + num_samples - 1, 0.0 / 1.0 in the parameters' dtype: one step
    per dimension, as written in the module docstring."""
    dtype = weight.dtype
    weight, c, v, b = (_nade_compute(t) for t in (weight, c, v, b))
    hidden, dims = weight.shape
    device = weight.device
    index = (torch.arange(num_samples, dtype=torch.int64)[:, None] + first) * dims + torch.arange(dims)
    bits = stream_bits_at(index.reshape(-1), seed, offset).reshape(num_samples, dims).to(device)
    # u < p  <=>  2k + 1 < p 2^25 with k = bits >> 8, both sides exact in float64.
    twice_u = (2 * (bits >> 8) + 1).to(torch.float64)
    x = torch.zeros(num_samples, dims, dtype=weight.dtype, device=device)
    a = c.expand(num_samples, hidden).clone()
    for i in range(dims):
        p = torch.sigmoid(b[i] + torch.sigmoid(a) @ v[i])
        x[:, i] = (twice_u[:, i] < p.to(torch.float64) * 2.0**25).to(weight.dtype)
        a = torch.where(x[:, i, None] != 0, a + weight[:, i], a)
    return x.to(dtype)


def nade_log_prob_backward(grad_out, x, weight, c, v, b):
    """(grad_weight, grad_c, grad_v, grad_b) of sum_n grad_out[n] log p(x[n]), written out: what the backward
    kernels compute (they walk the steps backwards, recomputing a_i from sqrt(D)-spaced checkpoints, instead
    of holding (B, H, D) in memory)."""
    dtype = weight.dtype
    g, x, weight, c, v, b = (_nade_compute(t) for t in (grad_out, x, weight, c, v, b))
    h = torch.sigmoid(c[None, :, None] + _sum_before(_steps(x, weight)))  # h[n, :, i] = h_i
    l = b + torch.einsum("bhd,dh->bd", h, v)
    delta = g[:, None] * (x - torch.sigmoid(l))  # dL/dl_i
    da = delta[:, None, :] * v.t()[None] * h * (1 - h)  # dL/da_i, (B, H, D)
    after = _sum_before(da.flip(-1)).flip(-1)  # sum over steps i > k
    grad_w = _on(x[:, None, :], after).sum(0)  # column k from the examples with x_k = 1 only
    grads = (grad_w, da.sum((0, 2)), torch.einsum("bd,bhd->dh", delta, h), delta.sum(0))
    return tuple(t.to(dtype) for t in grads)


# ---------------------------------------------------------------------------------------------------------
# Gumbel-max draws and cached sampling
# ---------------------------------------------------------------------------------------------------------
# Reference of the pixelcnn_sampling family: Gumbel-max draws on the genkern stream, and the cached
# sampler's program run position by position in plain torch (docs/math.md, section 4).
#
# A categorical draw over `levels` values at a row whose stream elements start at `base` is
#     argmax_k  logit_k - log(-log u_{base + k}),
# u the genkern uniform of stream element base + k. Models use base = ((sample * D) + position) * levels
# with positions in raster order, colours inside a pixel, so a draw never depends on the batch.


CONV, GATE = 0, 1


def stream_bits_at(index: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """Stream elements at the given (int64, non-negative) indices, as int64 values in [0, 2^32)."""
    block, lane = index >> 2, index & 3
    c2 = torch.full_like(block, offset & MASK32)
    c3 = torch.full_like(block, (offset >> 32) & MASK32)
    words = philox4x32_10(block & MASK32, (block >> 32) & MASK32, c2, c3, seed & MASK32, (seed >> 32) & MASK32)
    return torch.stack(words, dim=-1).gather(-1, lane.unsqueeze(-1)).squeeze(-1)


def gumbel(index: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """-log(-log u) of the stream elements at `index`, in float64."""
    return -torch.log(-torch.log(uniform(stream_bits_at(index, seed, offset))))


def gumbel_argmax(logits: torch.Tensor, base: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """Row n of logits (N, K) draws argmax_k logits[n, k] + gumbel(base[n] + k): (N,) int64.

    Scored in float64 whatever the logits' dtype (float64 logits at their own precision: [1e8, 1e8 + 4] draws
    1 about 98 % of the time). NaN rule: NaN is the maximum (torch.argmax's rule), so a row with a NaN logit
    draws its first NaN level (the NaN is reported, never skipped); ties go to the lowest level; +inf beats
    every finite score and a row of -inf only draws level 0."""
    k = torch.arange(logits.shape[-1], dtype=torch.int64, device=logits.device)
    noise = gumbel(base.to(torch.int64).unsqueeze(-1) + k, seed, offset)
    return (logits.to(torch.float64) + noise).argmax(dim=-1)


def _evaluate(node, caches, i: int, j: int, segment=None) -> None:
    """Node `node` at (i, j): every output channel, or a plan segment's (step, lo, hi, rows): channels
    [lo, hi) from the first `rows` rows of the packed weight (taps x C_in)."""
    kind, _, src, dst, residual, relu_input, accumulate, dy, dx, weight, bias, cond = node
    out = caches[dst]
    lo, hi = (0, out.shape[-1]) if segment is None else segment[1:3]
    if kind == GATE:
        half = out.shape[-1]
        a = caches[src][:, i, j]
        out[:, i, j, lo:hi] = torch.tanh(a[:, lo:hi]) * torch.sigmoid(a[:, half + lo : half + hi])
        return
    cache = caches[src]
    height, width = cache.shape[1], cache.shape[2]
    taps = []
    for y, x in zip(dy, dx):
        y, x = i + y, j + x
        inside = 0 <= y < height and 0 <= x < width
        taps.append(cache[:, y, x] if inside else torch.zeros_like(cache[:, 0, 0]))
    rows = torch.stack(taps, dim=1).flatten(1)  # (B, taps x C_in)
    if relu_input:
        rows = rows.clamp_min(0)
    used = rows.shape[1] if segment is None else segment[3]
    value = rows[:, :used] @ weight.flatten(0, 1)[:used, lo:hi]
    if bias is not None:
        value = value + bias[lo:hi]
    if cond is not None:
        value = value + cond[:, lo:hi]
    if residual >= 0:
        value = value + caches[residual][:, i, j, lo:hi]
    out[:, i, j, lo:hi] = out[:, i, j, lo:hi] + value if accumulate else value


def run_program(
    caches,
    nodes,
    segments,
    out: torch.Tensor,
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
    """Run the cached sampler's program (see csrc/autoregressive/pixelcnn_sampling.h): row nodes once per
    row before its first pixel; at each pixel, colour sub-steps c = 0 .. colours, where sub-step c runs the
    pixel nodes' plan segments of step c (genkern.autoregressive.sampling_plan) and then, but after the
    last colour, the Gumbel-max draw of colour c. With a logistic-mixture head (mixtures = K > 0) the logits
    cache holds the mixture's params and a pixel is one sub-step: every colour drawn at once after step 0, by
    logistic_mixture_sample's draw keyed ((first_sample + b) H W + pixel)(K + C)."""
    batch, colors, height, width = out.shape
    dims = colors * height * width
    samples = first_sample + torch.arange(batch, dtype=torch.int64, device=out.device)
    row_nodes = [n for n in nodes if n[1]]
    steps = 1 if mixtures else colors
    by_step = [[(n, s) for n, segs in zip(nodes, segments) for s in segs if s[0] == c] for c in range(steps + 1)]
    for i in range(height):
        for node in row_nodes:
            for j in range(width):
                _evaluate(node, caches, i, j)
        for j in range(width):
            for c in range(steps + 1):
                for node, segment in by_step[c]:
                    _evaluate(node, caches, i, j, segment)
                if c == steps:
                    break
                if mixtures:
                    base = (samples * (height * width) + i * width + j) * (mixtures + colors)
                    params = caches[logits][:, i, j, :, None, None]
                    drawn = mixture_sample_at(params, base.view(-1, 1, 1), levels, mixtures, coupled, seed, offset)
                    out[:, :, i, j] = drawn[:, :, 0, 0]
                    caches[0][:, i, j, :] = scale * drawn[:, :, 0, 0].to(caches[0].dtype) + shift
                    continue
                base = (samples * dims + (i * width + j) * colors + c) * levels
                level = gumbel_argmax(caches[logits][:, i, j, c * levels : (c + 1) * levels], base, seed, offset)
                out[:, c, i, j] = level
                caches[0][:, i, j, c] = scale * level.to(caches[0].dtype) + shift


# ---------------------------------------------------------------------------------------------------------
# The sampling head: filtered Gumbel-max draws
# ---------------------------------------------------------------------------------------------------------
# Reference of the sampling_head group (docs/math.md, section 6.2), written the sort-based way (softmax,
# sort, cumulative sum) that the kernels' sort-free thresholds are tested against. Per-row filters are
# (rows,) tensors: temperature float64 (0: argmax), top_k int64 (0 or >= vocab: off), top_p float64 (1: off),
# min_p float64 (0: off). Scores in float64 whatever the logits' dtype, as gumbel_argmax's.


def sampling_filter_keep(logits, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """The (rows, vocab) mask of the tokens the filters keep, in order: z = logits / temperature; top_k keeps
    z >= the k-th largest z (ties kept); top_p, on the top_k-renormalised softmax p sorted by z, keeps
    z >= the z where the cumulative sum first reaches top_p (ties kept); min_p keeps p >= min_p * max p.
    Rows with temperature 0 keep everything (their draw is the argmax)."""
    rows, vocab = logits.shape
    tau = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    z = logits.to(torch.float64) / tau[:, None]
    sorted_z, order = z.sort(dim=-1, descending=True, stable=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    keep = z >= sorted_z.gather(1, (k - 1)[:, None])
    p = torch.softmax(torch.where(keep, z, -torch.inf), dim=-1)
    cumulative = p.gather(1, order).cumsum(dim=-1)
    first = (cumulative < top_p[:, None]).sum(dim=-1).clamp(max=vocab - 1)  # the first index reaching top_p
    keep_p = z >= sorted_z.gather(1, first[:, None])
    keep &= keep_p | (top_p >= 1)[:, None]
    keep &= p >= min_p[:, None] * p.max(dim=-1, keepdim=True).values
    return keep


def sample_logits(logits, base, seed: int, offset: int, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """Row n draws argmax over the kept tokens k of z[n, k] + gumbel(base[n] + k): an exact draw from the
    filtered, renormalised distribution. (N,) int64.

    Degenerate rows follow gumbel_argmax's rule: a row with a NaN logit draws its first NaN; temperature 0, or
    a largest logit of +-inf, draws the first largest logit (torch.argmax); scaled logits that overflow to
    +-inf draw the first at the largest."""
    vocab = logits.shape[-1]
    wide = logits.to(torch.float64)
    tau = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    z = wide / tau[:, None]
    noise = gumbel(base.to(torch.int64).unsqueeze(-1) + torch.arange(vocab, device=logits.device), seed, offset)
    keep = sampling_filter_keep(logits, temperature, top_k, top_p, min_p)
    drawn = torch.where(keep, z + noise, -torch.inf).argmax(dim=-1)
    l_max = wide.max(dim=-1).values
    argmax_rows = wide.isnan().any(dim=-1) | (temperature == 0) | l_max.isinf()
    drawn = torch.where(z.max(dim=-1).values.isinf(), z.argmax(dim=-1), drawn)
    return torch.where(argmax_rows, wide.argmax(dim=-1), drawn)


# ---------------------------------------------------------------------------------------------------------
# Discretised logistic mixture (PixelCNN++'s likelihood head)
# ---------------------------------------------------------------------------------------------------------
# docs/math.md, section 6.1. params (B, P, H, W) hold, per pixel, K mixture logits and per channel and
# component a mean, a log-scale and (coupled RGB) a pre-tanh coefficient; x (B, C, H, W) integer levels in
# [0, L). log p(pixel) = logsumexp_k(log_softmax(logits)_k + sum_c log P_k(x_c)), the discretised logistic
# terms with the edge cases at 0 and L - 1 and the low-probability branch of the paper's reference code.
#
# One evaluation differs from the paper's text, not its value: sigma(p+) - sigma(p-) is taken as
# sigma(-p-) - sigma(-p+) where the bin lies right of the mean (mid > 0), so that two numbers near 1 never
# cancel (the same real number; the tests check it against the paper's form in float64). Half types compute
# in float32 and log p comes back in float32 (a loss summed over thousands of pixels has no place in fp16).

MIXTURE_LOG_SCALE_MIN = -7.0
MIXTURE_CDF_FLOOR = 1e-12  # log(max(delta, 1e-12))
MIXTURE_CDF_THRESHOLD = 1e-5  # below: the density at the bin's centre times the bin width


def mixture_colors(param_channels: int, num_mixtures: int, coupled: bool) -> int:
    """C of a params tensor with `param_channels` channels: 3 coupled (10K channels), else (P / K - 1) / 2."""
    return 3 if coupled else (param_channels // num_mixtures - 1) // 2


def mixture_param_channels(colors: int, num_mixtures: int, coupled: bool) -> int:
    return 10 * num_mixtures if coupled else (1 + 2 * colors) * num_mixtures


def _mixture_compute(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def mixture_parts(params: torch.Tensor, num_mixtures: int, coupled: bool):
    """(logits (B, K, H, W), means (B, C, K, H, W), log-scales before the clamp (B, C, K, H, W), pre-tanh
    coefficients (B, 3, K, H, W) or None): views of params in PixelCNN++'s channel order."""
    b, p, h, w = params.shape
    k = num_mixtures
    logits = params[:, :k]
    per_channel = 3 if coupled else 2
    rest = params[:, k:].reshape(b, mixture_colors(p, k, coupled), per_channel, k, h, w)
    return logits, rest[:, :, 0], rest[:, :, 1], rest[:, :, 2] if coupled else None


def _mixture_means(means, coeffs, y):
    """mu (B, C, K, H, W): the means, with coupling mu_G = m_G + a0 y_R and mu_B = m_B + a1 y_R + a2 y_G on the
    true y (B, C, H, W) (or, when sampling, the drawn y)."""
    if coeffs is None:
        return means
    a = torch.tanh(coeffs)
    y_r, y_g = y[:, 0, None], y[:, 1, None]
    mu_g = means[:, 1] + a[:, 0] * y_r
    mu_b = means[:, 2] + a[:, 1] * y_r + a[:, 2] * y_g
    return torch.stack((means[:, 0], mu_g, mu_b), dim=1)


def _softplus(z):
    """log(1 + e^z) without torch's threshold (F.softplus returns z itself past 20)."""
    return torch.logaddexp(z, torch.zeros_like(z))


def _mixture_terms(params, x, levels: int, num_mixtures: int, coupled: bool):
    """What the likelihood and its gradient share, in the compute dtype: the parts, y, mu, s and the branch
    arguments."""
    params = _mixture_compute(params)
    logits, means, log_scales, coeffs = mixture_parts(params, num_mixtures, coupled)
    y = x.to(params.dtype) * (2.0 / (levels - 1)) - 1.0
    mu = _mixture_means(means, coeffs, y)
    s = log_scales.clamp(min=MIXTURE_LOG_SCALE_MIN)
    e = torch.exp(-s)
    u = y[:, :, None] - mu
    half_bin = 1.0 / (levels - 1)
    plus, minus, mid = e * (u + half_bin), e * (u - half_bin), e * u
    delta = torch.where(
        mid > 0, torch.sigmoid(-minus) - torch.sigmoid(-plus), torch.sigmoid(plus) - torch.sigmoid(minus)
    )
    xk = x[:, :, None]
    branch = torch.where(xk == 0, 0, torch.where(xk == levels - 1, 1, torch.where(delta > MIXTURE_CDF_THRESHOLD, 2, 3)))
    return params, logits, coeffs, y, s, e, plus, minus, mid, delta, branch


def _channel_log_probs(levels, s, plus, minus, mid, delta, branch):
    """log P_k(x_c) (B, C, K, H, W) by branch: 0 the edge x = 0, 1 the edge x = L - 1, 2 the bin's mass, 3 the
    density at the bin's centre times the bin width."""
    edge0 = plus - _softplus(plus)
    edge1 = -_softplus(minus)
    mass = torch.log(delta.clamp(min=MIXTURE_CDF_FLOOR))
    density = mid - s - 2.0 * _softplus(mid) - math.log((levels - 1) / 2)
    return torch.where(branch == 0, edge0, torch.where(branch == 1, edge1, torch.where(branch == 2, mass, density)))


def _component_log_probs(params, x, levels, num_mixtures, coupled):
    """a_k = log_softmax(logits)_k + sum_c log P_k(x_c): (B, K, H, W), in the compute dtype."""
    params, logits, coeffs, y, s, e, plus, minus, mid, delta, branch = _mixture_terms(
        params, x, levels, num_mixtures, coupled
    )
    per_channel = _channel_log_probs(levels, s, plus, minus, mid, delta, branch)
    return torch.log_softmax(logits, dim=1) + per_channel.sum(1)


def logistic_mixture_log_prob(params, x, levels: int, num_mixtures: int, coupled: bool):
    """log p of every pixel, (B, H, W): float64 for float64 params, float32 otherwise."""
    return torch.logsumexp(_component_log_probs(params, x, levels, num_mixtures, coupled), dim=1)


def logistic_mixture_log_prob_backward(grad, params, x, log_prob, levels: int, num_mixtures: int, coupled: bool):
    """d(sum grad * log p) / d params, written out (what the kernels compute): with r_k = exp(a_k - log p) the
    component's responsibility, d/dlogit_k = r_k - softmax_k, and each channel's d log P / du (u = y - mu)
    and d log P / ds by branch, through the coupling (d mu_G / d a0 = y_R (1 - tanh^2)) and the clamp."""
    dtype = params.dtype
    grad = _mixture_compute(grad)
    params, logits, coeffs, y, s, e, plus, minus, mid, delta, branch = _mixture_terms(
        params, x, levels, num_mixtures, coupled
    )
    per_channel = _channel_log_probs(levels, s, plus, minus, mid, delta, branch)
    a = torch.log_softmax(logits, dim=1) + per_channel.sum(1)
    weight = grad[:, None] * torch.exp(a - log_prob.to(a.dtype)[:, None])  # g r_k, (B, K, H, W)
    d_logits = weight - grad[:, None] * torch.softmax(logits, dim=1)

    def slope(z):  # sigma'(z) = sigma(z) sigma(-z)
        return torch.sigmoid(z) * torch.sigmoid(-z)

    # d log P / d p for the argument(s) of each branch, then by the chain rule through p = e (u +- h), e = e^-s.
    d_edge0 = torch.sigmoid(-plus)
    d_edge1 = -torch.sigmoid(minus)
    d_mass_plus, d_mass_minus = slope(plus) / delta, -slope(minus) / delta
    d_density = 1.0 - 2.0 * torch.sigmoid(mid)
    du = e * torch.where(
        branch == 0,
        d_edge0,
        torch.where(branch == 1, d_edge1, torch.where(branch == 2, d_mass_plus + d_mass_minus, d_density)),
    )
    ds = torch.where(
        branch == 0,
        -plus * d_edge0,
        torch.where(
            branch == 1,
            -minus * d_edge1,
            torch.where(branch == 2, -plus * d_mass_plus - minus * d_mass_minus, -mid * d_density - 1.0),
        ),
    )
    _, _, log_scales, _ = mixture_parts(params, num_mixtures, coupled)
    d_mean = -weight[:, None] * du  # d/d mu_c, (B, C, K, H, W)
    d_log_scale = weight[:, None] * ds * (log_scales >= MIXTURE_LOG_SCALE_MIN)
    parts = [d_mean, d_log_scale]
    if coupled:
        t = torch.tanh(coeffs)
        y_r, y_g = y[:, 0, None], y[:, 1, None]
        d_a = torch.stack((d_mean[:, 1] * y_r, d_mean[:, 2] * y_r, d_mean[:, 2] * y_g), dim=1) * (1.0 - t * t)
        parts.append(d_a)
    b, p, h, w = params.shape
    rest = torch.stack(parts, dim=2).reshape(b, p - num_mixtures, h, w)
    return torch.cat((d_logits, rest), dim=1).to(dtype)


def mixture_draw_index(first: int, batch: int, height: int, width: int, draws: int) -> torch.Tensor:
    """The stream element of draw 0 of each (sample, pixel), (B, H, W): ((first + b) H W + i W + j)(K + C)."""
    samples = first + torch.arange(batch, dtype=torch.int64)
    pixels = torch.arange(height * width, dtype=torch.int64)
    return ((samples[:, None] * (height * width) + pixels) * draws).reshape(batch, height, width)


def logistic_mixture_sample(params, levels: int, num_mixtures: int, coupled: bool, seed: int, offset: int, first: int):
    """(B, C, H, W) int64 levels, sample first + b from params[b] (docs/math.md, section 6.1): the component by
    Gumbel-max over the logits (gumbel_argmax's float64 scores), then R, G, B in turn a logistic draw in the
    compute dtype from the exact log u - log(1 - u), clamped to [-1, 1] and rounded half to even."""
    batch, p, height, width = params.shape
    base = mixture_draw_index(first, batch, height, width, num_mixtures + mixture_colors(p, num_mixtures, coupled))
    return mixture_sample_at(params, base.to(params.device), levels, num_mixtures, coupled, seed, offset)


def mixture_sample_at(params, base, levels: int, num_mixtures: int, coupled: bool, seed: int, offset: int):
    """logistic_mixture_sample's draw with each pixel's stream element of draw 0 given: base (B, H, W) int64
    (the cached sampler draws one pixel of the image at a time: params (B, P, 1, 1))."""
    params = _mixture_compute(params)
    batch, p, height, width = params.shape
    k = num_mixtures
    colors = mixture_colors(p, k, coupled)
    logits, means, log_scales, coeffs = mixture_parts(params, k, coupled)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, k)
    chosen = gumbel_argmax(flat_logits, base.reshape(-1), seed, offset).reshape(batch, 1, 1, height, width)

    def pick(t):  # (B, C', K, H, W) at the chosen component -> (B, C', H, W)
        return t.gather(2, chosen.expand(-1, t.shape[1], -1, -1, -1)).squeeze(2)

    m, s = pick(means), pick(log_scales).clamp(min=MIXTURE_LOG_SCALE_MIN)
    a = torch.tanh(pick(coeffs)) if coupled else None
    out = torch.empty(batch, colors, height, width, dtype=torch.int64, device=params.device)
    drawn = []
    for c in range(colors):
        u = uniform(stream_bits_at(base + k + c, seed, offset))  # exact, float64
        logistic = (torch.log(u) - torch.log1p(-u)).to(params.dtype)
        mu = m[:, c]
        if coupled and c == 1:
            mu = mu + a[:, 0] * drawn[0]
        elif coupled and c == 2:
            mu = mu + a[:, 1] * drawn[0] + a[:, 2] * drawn[1]
        y = (mu + torch.exp(s[:, c]) * logistic).clamp(-1.0, 1.0)
        drawn.append(y)
        out[:, c] = torch.round((y + 1.0) * (levels - 1) * 0.5).to(torch.int64)
    return out
