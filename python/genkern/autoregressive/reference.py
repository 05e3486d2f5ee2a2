"""The autoregressive family's eager references: the readable spec of every op (docs/math.md, section 4).

Causal 1-D convolutions (and WaveNet's gate), PixelCNN masked convolutions, NADE, Gumbel-max draws on the
genkern stream and the cached sampler's program run position by position. Half types compute in float32,
as the kernels do; random uniforms are exact (float64).
"""

from __future__ import annotations

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


def _conv_weight(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The weight as F.conv1d takes it, and its groups: depthwise (C, K) is (C, 1, K) with C groups."""
    return (weight.unsqueeze(1), weight.shape[0]) if weight.dim() == 2 else (weight, 1)


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


def _degenerate(x, weight) -> bool:
    """No length or no channels: F.conv1d rejects these, but the convolution is still well defined."""
    return x.shape[2] == 0 or x.shape[1] == 0 or weight.shape[0] == 0


def _pre_activation(x, weight, bias, dilation):
    if _degenerate(x, weight):
        z = _compute(x).new_zeros(x.shape[0], weight.shape[0], x.shape[2])
        return z if bias is None else z + _compute(bias)[:, None]
    w, groups = _conv_weight(_compute(weight))
    pad = receptive_field(weight.shape[-1], dilation)
    return F.conv1d(F.pad(_compute(x), (pad, 0)), w, _compute(bias), dilation=dilation, groups=groups)


def causal_conv1d(x, weight, bias=None, dilation=1, activation="none"):
    """x (B, C_in, L), weight (C_out, C_in, K) or depthwise (C, K), bias (C_out,) or None -> (B, C_out, L)."""
    return _activate(_pre_activation(x, weight, bias, dilation), activation).to(x.dtype)


def causal_conv1d_backward(grad_y, x, weight, bias=None, dilation=1, activation="none"):
    """(grad_x, grad_weight, grad_bias or None), written out: what the backward kernels compute."""
    gz = _compute(grad_y) * _activate_grad(_pre_activation(x, weight, bias, dilation), activation)
    grad_b = gz.sum((0, 2)).to(bias.dtype) if bias is not None else None
    if _degenerate(x, weight):
        return torch.zeros_like(x), torch.zeros_like(weight), grad_b
    w, groups = _conv_weight(_compute(weight))
    pad = receptive_field(weight.shape[-1], dilation)
    x_pad = F.pad(_compute(x), (pad, 0))
    grad_x = torch.nn.grad.conv1d_input(x_pad.shape, w, gz, dilation=dilation, groups=groups)[..., pad:]
    grad_w = torch.nn.grad.conv1d_weight(x_pad, w.shape, gz, dilation=dilation, groups=groups).reshape(weight.shape)
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


# ---------------------------------------------------------------------------------------------------------
# Masked convolution
# ---------------------------------------------------------------------------------------------------------
# Reference of the masked_conv family (docs/math.md, section 4): the PixelCNN masked convolution.
#
# `masked_conv2d` is F.conv2d on the weight times its 0/1 mask: stride 1, 'same' output size. The kernels
# follow it without ever reading the masked weights, so garbage there changes nothing.


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


def _masked_weight(weight, mask_type, color_groups):
    c_out, c_in, k, _ = weight.shape
    m = mask(k, mask_type, c_in, c_out, color_groups, dtype=weight.dtype, device=weight.device)
    # where, not a product: garbage (inf, nan) in masked taps must not leak as 0 * inf = nan.
    return torch.where(m.bool(), weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_conv2d(x, weight, bias=None, mask_type="A", color_groups=1, dilation=1):
    """F.conv2d(x, weight * mask, bias) with 'same' padding; half types compute in float32."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        x, weight = x.float(), weight.float()
        bias = None if bias is None else bias.float()
    k = weight.shape[-1]
    y = F.conv2d(
        x, _masked_weight(weight, mask_type, color_groups), bias, padding=padding(k, dilation), dilation=dilation
    )
    return y.to(dtype)


def masked_conv2d_grad_input(grad_y, weight, input_shape, mask_type="A", color_groups=1, dilation=1):
    """d/dx: the transposed convolution of grad_y with the masked weight."""
    k = weight.shape[-1]
    return torch.nn.grad.conv2d_input(
        list(input_shape),
        _masked_weight(weight, mask_type, color_groups),
        grad_y,
        padding=padding(k, dilation),
        dilation=dilation,
    )


def masked_conv2d_grad_weight(grad_y, x, weight_shape, mask_type="A", color_groups=1, dilation=1):
    """(d/dweight, d/dbias): the weight gradient is zero at masked taps, the bias gradient sums grad_y."""
    c_out, c_in, k, _ = weight_shape
    gw = torch.nn.grad.conv2d_weight(x, list(weight_shape), grad_y, padding=padding(k, dilation), dilation=dilation)
    m = mask(k, mask_type, c_in, c_out, color_groups, dtype=gw.dtype, device=gw.device)
    return gw * m, grad_y.sum((0, 2, 3))


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


def _nade_compute(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def nade_logits(x, weight, c, v, b):
    """l (B, D): the logit of p(x_i = 1 | x_<i) for each example and dimension. x (B, D), W (H, D), c (H),
    V (D, H), b (D). The pre-activations a_i = c + sum_{k < i} W[:, k] x_k come from one exclusive cumulative
    sum over k, (B, H, D) in memory."""
    x, weight, c, v, b = (_nade_compute(t) for t in (x, weight, c, v, b))
    steps = x[:, None, :] * weight[None]  # W[:, k] x_k, (B, H, D)
    h = torch.sigmoid(c[None, :, None] + _sum_before(steps))
    return b + torch.einsum("bhd,dh->bd", h, v)


def _sum_before(t: torch.Tensor) -> torch.Tensor:
    """[..., i] = sum over k < i of t[..., k] (exclusive cumulative sum over the last dim)."""
    return F.pad(t.cumsum(-1), (1, 0))[..., :-1]


def nade_log_prob(x, weight, c, v, b):
    """log p(x) in nats, (B,), in the parameters' dtype (half types: computed in float32, rounded once)."""
    l = nade_logits(x, weight, c, v, b)
    return (_nade_compute(x) * l - F.softplus(l)).sum(-1).to(weight.dtype)


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
        a = a + x[:, i, None] * weight[:, i]
    return x.to(dtype)


def nade_log_prob_backward(grad_out, x, weight, c, v, b):
    """(grad_weight, grad_c, grad_v, grad_b) of sum_n grad_out[n] log p(x[n]), written out: what the backward
    kernels compute (they run the recurrence backwards instead of holding (B, H, D) in memory)."""
    dtype = weight.dtype
    g, x, weight, c, v, b = (_nade_compute(t) for t in (grad_out, x, weight, c, v, b))
    h = torch.sigmoid(c[None, :, None] + _sum_before(x[:, None, :] * weight[None]))  # h[n, :, i] = h_i
    l = b + torch.einsum("bhd,dh->bd", h, v)
    delta = g[:, None] * (x - torch.sigmoid(l))  # dL/dl_i
    da = delta[:, None, :] * v.t()[None] * h * (1 - h)  # dL/da_i, (B, H, D)
    after = _sum_before(da.flip(-1)).flip(-1)  # sum over steps i > k
    grads = (torch.einsum("bhd,bd->hd", after, x), da.sum((0, 2)), torch.einsum("bd,bhd->dh", delta, h), delta.sum(0))
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
    """Row n of logits (N, K) draws argmax_k logits[n, k] + gumbel(base[n] + k): (N,) int64."""
    k = torch.arange(logits.shape[-1], dtype=torch.int64, device=logits.device)
    noise = gumbel(base.to(torch.int64).unsqueeze(-1) + k, seed, offset)
    return (logits.to(torch.float64) + noise).argmax(dim=-1)


def _evaluate(node, caches, i: int, j: int) -> None:
    kind, _, src, dst, residual, relu_input, accumulate, dy, dx, weight, bias, cond = node
    out = caches[dst]
    if kind == GATE:
        half = out.shape[-1]
        a = caches[src][:, i, j]
        out[:, i, j] = torch.tanh(a[:, :half]) * torch.sigmoid(a[:, half:])
        return
    cache = caches[src]
    height, width = cache.shape[1], cache.shape[2]
    taps = []
    for y, x in zip(dy, dx):
        y, x = i + y, j + x
        inside = 0 <= y < height and 0 <= x < width
        taps.append(cache[:, y, x] if inside else torch.zeros_like(cache[:, 0, 0]))
    rows = torch.stack(taps, dim=1)  # (B, taps, C_in)
    if relu_input:
        rows = rows.clamp_min(0)
    value = torch.einsum("btc,tco->bo", rows, weight)
    if bias is not None:
        value = value + bias
    if cond is not None:
        value = value + cond
    if residual >= 0:
        value = value + caches[residual][:, i, j]
    out[:, i, j] = out[:, i, j] + value if accumulate else value


def run_program(
    caches,
    nodes,
    out: torch.Tensor,
    logits: int,
    levels: int,
    scale: float,
    shift: float,
    seed: int,
    offset: int,
    first_sample: int,
) -> None:
    """Run the cached sampler's program (see csrc/autoregressive/pixelcnn_sampling.h): row nodes once per row before its
    first pixel, pixel nodes at every (row, column, colour) step, then a Gumbel-max draw for the colour."""
    batch, colors, height, width = out.shape
    dims = colors * height * width
    samples = first_sample + torch.arange(batch, dtype=torch.int64, device=out.device)
    row_nodes = [n for n in nodes if n[1]]
    pixel_nodes = [n for n in nodes if not n[1]]
    for i in range(height):
        for node in row_nodes:
            for j in range(width):
                _evaluate(node, caches, i, j)
        for j in range(width):
            for c in range(colors):
                for node in pixel_nodes:
                    _evaluate(node, caches, i, j)
                base = (samples * dims + (i * width + j) * colors + c) * levels
                level = gumbel_argmax(caches[logits][:, i, j, c * levels : (c + 1) * levels], base, seed, offset)
                out[:, c, i, j] = level
                caches[0][:, i, j, c] = scale * level.to(caches[0].dtype) + shift
