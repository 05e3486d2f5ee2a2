"""Benchmark cases of the autoregressive family: causal convolutions, masked convolutions, NADE and cached
PixelCNN sampling (each group's notes below). `genkern bench --ops <name or group>` selects them.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

import genkern

from .. import backend as _backend
from ..bench import PASS, BenchCase
from ..models import PixelCNN
from . import draw_base, gumbel_argmax
from . import reference as ref

# =========================================================================================================
# Benchmark cases of the causal_conv1d family: the depthwise short convolution of Mamba-style blocks
# (K = 4, SiLU) on (8, 256, L) activations, L from the size, and its generation step on a (B, 256, K - 1)
# rolling state, B from the size.
#
# The eager baselines are what a PyTorch user writes: F.conv1d with left padding and groups = channels for
# the convolution; for the step, the window cat([state, x]) contracted with the taps by einsum, and the state
# rolled in place from that window (genkern's step updates the state in place too).
#
# `causal_conv1d_train` times forward and backward together (gradients for x, weight and bias from a given
# grad_y); plain `genkern bench` leaves it out, `--ops causal_conv1d` and benchmarks/ include it.
# =========================================================================================================
_CONV1D = "causal_conv1d"
BATCH, CHANNELS, TAPS = 8, 256, 4
STATE = TAPS - 1  # the minimal state: the receptive field at dilation 1


def _shape(size: int) -> tuple[int, int, int]:
    return BATCH, CHANNELS, max(1, size // (BATCH * CHANNELS))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _params(device, dtype):
    weight = torch.randn(CHANNELS, TAPS, device=device, dtype=dtype) / TAPS**0.5
    bias = torch.randn(CHANNELS, device=device, dtype=dtype)
    return weight, bias


def _inputs(size, device, dtype):
    return (torch.randn(_shape(size), device=device, dtype=dtype), *_params(device, dtype))


def eager_causal_conv1d(x, weight, bias):
    return F.silu(F.conv1d(F.pad(x, (TAPS - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0]))


def genkern_causal_conv1d(x, weight, bias, backend=None):
    return genkern.causal_conv1d(x, weight, bias, activation="silu", backend=backend)


def _bytes(size, dtype):
    b, c, length = _shape(size)
    # x read once, y written once; the weights and bias are negligible but counted
    return (2 * b * c * length + c * (TAPS + 1)) * _itemsize(dtype)


# ---------------------------------------------------------------------------------------------------------
# The generation step


def _update_shape(size: int) -> tuple[int, int, int]:
    """The state's shape (the main tensor)."""
    return max(1, size // (CHANNELS * STATE)), CHANNELS, STATE


def _update_inputs(size, device, dtype):
    batch = _update_shape(size)[0]
    x = torch.randn(batch, CHANNELS, device=device, dtype=dtype)
    state = torch.randn(_update_shape(size), device=device, dtype=dtype)
    return (x, state, *_params(device, dtype))


def eager_causal_conv1d_update(x, state, weight, bias):
    window = torch.cat([state, x.unsqueeze(-1)], dim=-1)  # (B, C, K): the K inputs output t sees
    y = F.silu(torch.einsum("bck,ck->bc", window, weight) + bias)
    state.copy_(window[..., 1:])
    return y


def genkern_causal_conv1d_update(x, state, weight, bias, backend=None):
    return genkern.causal_conv1d_update(x, state, weight, bias, activation="silu", backend=backend)


def _update_bytes(size, dtype):
    b, c, w = _update_shape(size)
    # x read, y written, the state read and written; the weights and bias counted too
    return (2 * b * c + 2 * b * c * w + c * (TAPS + 1)) * _itemsize(dtype)


# ---------------------------------------------------------------------------------------------------------
# Forward and backward


def _train_inputs(size, device, dtype):
    x, weight, bias = (t.requires_grad_(True) for t in _inputs(size, device, dtype))
    return x, weight, bias, torch.randn(_shape(size), device=device, dtype=dtype)


def eager_causal_conv1d_train(x, weight, bias, grad_y):
    return torch.autograd.grad(eager_causal_conv1d(x, weight, bias), (x, weight, bias), grad_y)


def genkern_causal_conv1d_train(x, weight, bias, grad_y, backend=None):
    return torch.autograd.grad(genkern_causal_conv1d(x, weight, bias, backend), (x, weight, bias), grad_y)


def _train_bytes(size, dtype):
    b, c, length = _shape(size)
    # x and grad_y read, grad_x written (genkern's backward recomputes the pre-activation instead of keeping
    # y); the weights, the bias and their gradients counted too
    return (3 * b * c * length + 2 * c * (TAPS + 1)) * _itemsize(dtype)


CONV1D_CASES = (
    BenchCase(
        name="causal_conv1d",
        family=_CONV1D,
        make_inputs=_inputs,
        genkern=genkern_causal_conv1d,
        eager=eager_causal_conv1d,
        shape=_shape,
        bytes_moved=_bytes,
    ),
    BenchCase(
        name="causal_conv1d_update",
        family=_CONV1D,
        make_inputs=_update_inputs,
        genkern=genkern_causal_conv1d_update,
        eager=eager_causal_conv1d_update,
        shape=_update_shape,
        bytes_moved=_update_bytes,
    ),
    BenchCase(
        name="causal_conv1d_train",
        family=_CONV1D,
        make_inputs=_train_inputs,
        genkern=genkern_causal_conv1d_train,
        eager=eager_causal_conv1d_train,
        shape=_shape,
        bytes_moved=_train_bytes,
        timed="forward+backward",
        default=False,
    ),
)


# ---------------------------------------------------------------------------------------------------------
# causal-conv1d's API at a Mamba block's shape: B = 8, C = 2048, L = 2048, K = 4, SiLU, x channel-last (a
# (B, L, C) projection transposed, as Mamba feeds it), fixed (sized=False: the harness runs it at its first
# size only). The eager baselines are what a user writes: F.conv1d with left padding and slicing on x as
# given; for the update, the state rows gathered by conv_state_indices, the window convolved by einsum, the
# rows scattered back. Decode: 256 sequences of a 512-slot state pool, 1 new position each.
_M_B, _M_C, _M_L, _M_K = 8, 2048, 2048, 4
_M_SLOTS, _M_DECODE = 512, 256


def _mamba_shape(size: int) -> tuple[int, int, int]:
    return _M_B, _M_C, _M_L


def _mamba_inputs(size, device, dtype, grad=False):
    x = torch.randn(_M_B, _M_L, _M_C, device=device, dtype=dtype).transpose(1, 2)
    weight = torch.randn(_M_C, _M_K, device=device, dtype=dtype) / _M_K**0.5
    bias = torch.randn(_M_C, device=device, dtype=dtype)
    init = torch.randn(_M_B, _M_K - 1, _M_C, device=device, dtype=dtype).transpose(1, 2)
    if not grad:
        return x, weight, bias, init
    grad_y = torch.randn(_M_B, _M_L, _M_C, device=device, dtype=dtype).transpose(1, 2)
    return (*(t.requires_grad_(True) for t in (x, weight, bias, init)), grad_y)


def eager_mamba_conv(x, weight, bias, init):
    y = F.conv1d(torch.cat([init, x], dim=-1), weight.unsqueeze(1), bias, groups=weight.shape[0])
    return F.silu(y[..., : x.shape[-1]])


def genkern_mamba_conv(x, weight, bias, init, backend=None):
    return genkern.causal_conv1d(x, weight, bias, activation="silu", initial_states=init, backend=backend)


def eager_mamba_conv_train(x, weight, bias, init, grad_y):
    return torch.autograd.grad(eager_mamba_conv(x, weight, bias, init), (x, weight, bias, init), grad_y)


def genkern_mamba_conv_train(x, weight, bias, init, grad_y, backend=None):
    y = genkern_mamba_conv(x, weight, bias, init, backend)
    return torch.autograd.grad(y, (x, weight, bias, init), grad_y)


def _mamba_bytes(size, dtype):
    return 2 * _M_B * _M_C * _M_L * _itemsize(dtype)  # x read, y written


def _mamba_train_bytes(size, dtype):
    return 3 * _M_B * _M_C * _M_L * _itemsize(dtype)  # x and grad_y read, grad_x written


def _decode_shape(size: int) -> tuple[int, int, int]:
    return _M_SLOTS, _M_C, _M_K - 1  # the state pool


def _decode_inputs(size, device, dtype):
    x = torch.randn(_M_DECODE, _M_C, device=device, dtype=dtype)
    state = torch.randn(_decode_shape(size), device=device, dtype=dtype)
    weight = torch.randn(_M_C, _M_K, device=device, dtype=dtype) / _M_K**0.5
    bias = torch.randn(_M_C, device=device, dtype=dtype)
    rows = torch.randperm(_M_SLOTS, generator=torch.Generator().manual_seed(0))[:_M_DECODE].to(torch.int32)
    return x, state, weight, bias, rows.to(device)


def eager_decode(x, state, weight, bias, rows):
    index = rows.long()
    window = torch.cat([state[index], x.unsqueeze(-1)], dim=-1)
    y = F.silu(torch.einsum("bck,ck->bc", window, weight) + bias)
    state[index] = window[..., 1:]
    return y


def genkern_decode(x, state, weight, bias, rows, backend=None):
    return genkern.causal_conv1d_update(
        x, state, weight, bias, activation="silu", conv_state_indices=rows, backend=backend
    )


def _decode_bytes(size, dtype):
    # x read, y written, the used state rows read and written
    return (2 * _M_DECODE * _M_C + 2 * _M_DECODE * _M_C * (_M_K - 1)) * _itemsize(dtype)


CONV1D_STATES_CASES = (
    BenchCase(
        name="causal_conv1d_mamba",
        family=_CONV1D,
        make_inputs=_mamba_inputs,
        genkern=genkern_mamba_conv,
        eager=eager_mamba_conv,
        shape=_mamba_shape,
        bytes_moved=_mamba_bytes,
        default=False,
        sized=False,
        max_repeats=5,
    ),
    BenchCase(
        name="causal_conv1d_mamba_train",
        family=_CONV1D,
        make_inputs=functools.partial(_mamba_inputs, grad=True),
        genkern=genkern_mamba_conv_train,
        eager=eager_mamba_conv_train,
        shape=_mamba_shape,
        bytes_moved=_mamba_train_bytes,
        timed="forward+backward",
        default=False,
        sized=False,
        max_repeats=3,
    ),
    BenchCase(
        name="causal_conv1d_mamba_decode",
        family=_CONV1D,
        make_inputs=_decode_inputs,
        genkern=genkern_decode,
        eager=eager_decode,
        shape=_decode_shape,
        bytes_moved=_decode_bytes,
        default=False,
        sized=False,
    ),
)


# =========================================================================================================
# Benchmark cases of the masked_conv family, forward + backward: PixelCNN layers on 28 x 28 images (and, below,
# every PixelCNN layer shape at a fixed batch, forward and forward + backward: PIXELCNN_LAYERS).
#
#     masked_conv2d              a hidden layer: 64 -> 64 channels, 3 x 3, mask B (gradients for x, weight, bias)
#     masked_conv2d_first_layer  the first layer on pixels: 1 -> 64 channels, 7 x 7, mask A (x is data: no grad_x)
#
# A size N is the element count of the hidden activations: ceil(N / (64 * 28 * 28)) images (1M: 21; 1.5M: 32,
# PixelCNN's batch). Both cases time one training step's worth of the layer, the forward pass and the backward
# for a given grad_y, which is most of what a PixelCNN spends its time on. The eager baseline is what a PyTorch
# user writes: F.conv2d on the weight times its mask (a buffer made once), then torch.autograd.grad; compile is
# torch.compile of that function. (On a GPU eager F.conv2d computes float32 in TF32 by default; genkern's
# kernels compute in float32.)
# =========================================================================================================
_MASKED_CONV = "masked_conv"
CHANNELS, SIDE = 64, 28


def _batch(size: int) -> int:
    return max(1, math.ceil(size / (CHANNELS * SIDE * SIDE)))


def _layer(c_in: int, c_out: int, k: int, mask_type: str, groups: int, side: int, batch_of, backward: bool):
    """(make_inputs, eager, genkern, shape, bytes_moved) of a c_in -> c_out layer with a k x k mask on side x side
    images, batch_of(size) of them; with `backward`, the forward and the gradients for a given grad_y."""

    def shape(size):
        return batch_of(size), c_in, side, side

    def make_inputs(size, device, dtype):
        b = batch_of(size)
        x = torch.randn(b, c_in, side, side, device=device, dtype=dtype).requires_grad_(backward and c_in > 1)
        weight = torch.randn(c_out, c_in, k, k, device=device, dtype=dtype) / math.sqrt(c_in * k * k)
        bias = torch.randn(c_out, device=device, dtype=dtype)
        grad_y = torch.randn(b, c_out, side, side, device=device, dtype=dtype)
        mask = ref.mask(k, mask_type, c_in, c_out, groups, dtype=dtype, device=device)
        return x, weight.requires_grad_(backward), bias.requires_grad_(backward), grad_y, mask

    def grads(y, x, weight, bias, grad_y):
        if not backward:
            return y
        return torch.autograd.grad(y, [t for t in (x, weight, bias) if t.requires_grad], grad_y)

    def eager(x, weight, bias, grad_y, mask):
        return grads(F.conv2d(x, weight * mask, bias, padding=k // 2), x, weight, bias, grad_y)

    def ours(x, weight, bias, grad_y, mask, backend=None):
        y = genkern.masked_conv2d(x, weight, bias, mask_type=mask_type, color_groups=groups, backend=backend)
        return grads(y, x, weight, bias, grad_y)

    def bytes_moved(size, dtype):
        pixels = batch_of(size) * side * side
        params = c_out * c_in * k * k + c_out
        if backward:
            # read x, weight, bias and grad_y; write grad_x (not for a first layer on data), grad_weight, grad_bias
            elements = pixels * c_in * (2 if c_in > 1 else 1) + pixels * c_out + 2 * params
        else:  # read x, weight and bias; write y
            elements = pixels * (c_in + c_out) + params
        return elements * torch.empty((), dtype=dtype).element_size()

    return make_inputs, eager, ours, shape, bytes_moved


def _case(name: str, c_in: int, k: int, mask_type: str, default: bool) -> BenchCase:
    make_inputs, eager, ours, shape, bytes_moved = _layer(c_in, CHANNELS, k, mask_type, 1, SIDE, _batch, True)
    return BenchCase(
        name=name,
        family=_MASKED_CONV,
        make_inputs=make_inputs,
        genkern=ours,
        eager=eager,
        shape=shape,
        bytes_moved=bytes_moved,
        timed="forward+backward",
        default=default,
    )


# Every layer shape of the PixelCNNs genkern ships and benchmarks, forward and forward + backward, at a fixed
# batch (the sizes are ignored; `genkern bench --ops masked_conv` runs them): the 8 x 8 digit models of
# `genkern train` (hidden 32, a 5 x 5 first layer, 17 levels) at its training batch 64; the sampling bench's
# 28 x 28 PixelCNN (64 channels, 256 levels) at batch 21 (the 1M size of the cases above); its 32 x 32 RGB
# one (96 channels, 3 colour groups) at batch 16. `in` is the mask-A first layer, `hidden` a residual
# layer, `head` the 1 x 1 head, `out` the 1 x 1 logits layer.
PIXELCNN_LAYERS = tuple(
    (f"{model}_{layer}", c_in, c_out, k, mask_type, colours, side, batch)
    for model, colours, side, hidden, k_in, outputs, batch in (
        ("digits", 1, 8, 32, 5, 17, 64),
        ("px28", 1, 28, 64, 7, 256, 21),
        ("rgb32", 3, 32, 96, 7, 3 * 256, 16),
    )
    for layer, c_in, c_out, k, mask_type in (
        ("in", colours, hidden, k_in, "A"),
        ("hidden", hidden, hidden, 3, "B"),
        ("head", hidden, hidden, 1, "B"),
        ("out", hidden, outputs, 1, "B"),
    )
)


def _layer_case(name, c_in, c_out, k, mask_type, groups, side, batch, backward) -> BenchCase:
    make_inputs, eager, ours, shape, bytes_moved = _layer(
        c_in, c_out, k, mask_type, groups, side, lambda size: batch, backward
    )
    return BenchCase(
        name=f"masked_conv2d_{name}_{'train' if backward else 'fwd'}",
        family=_MASKED_CONV,
        make_inputs=make_inputs,
        genkern=ours,
        eager=eager,
        shape=shape,
        bytes_moved=bytes_moved,
        timed="forward+backward" if backward else PASS,
        default=False,
        sized=False,
    )


MASKED_CONV_CASES = (
    _case("masked_conv2d", 64, 3, "B", default=True),
    _case("masked_conv2d_first_layer", 1, 7, "A", default=False),
    *(_layer_case(*layer, backward) for layer in PIXELCNN_LAYERS for backward in (False, True)),
)


# =========================================================================================================
# Benchmark case of the NADE family: a training step's log-likelihood, forward and backward (unlike the other
# families' cases, which time the forward pass), of a binarised MNIST-sized model (D = 784 pixels, H = 500
# hidden units) at batch 512, whatever the size: the eager baseline's memory grows as B * H * D, and at the
# engine's larger sizes it would need tens of GB. Slow (the eager call takes seconds), so plain `genkern bench`
# leaves it out: `genkern bench --ops nade` runs it.
#
# The eager baseline is the reference: the pre-activations of all D steps from one cumulative sum, a (B, H, D)
# tensor (800 MB at batch 512 in float32, and autograd keeps several), then autograd; torch.compile gets that
# same function. genkern runs the fused kernels, which hold H pre-activations per example, never (B, H, D).
# =========================================================================================================
_NADE = "nade"
DIMS, HIDDEN = 784, 500
NADE_BATCH = 512


def _nade_shape(size: int) -> tuple[int, int]:
    return NADE_BATCH, DIMS


def _nade_inputs(size, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(_nade_shape(size), generator=g) < 0.13).to(device=device, dtype=dtype)  # MNIST's ink density
    w = torch.randn(HIDDEN, DIMS, generator=g) / DIMS**0.5
    c = torch.zeros(HIDDEN)
    v = torch.randn(DIMS, HIDDEN, generator=g) / HIDDEN**0.5
    b = torch.zeros(DIMS)
    return (x, *(t.to(device=device, dtype=dtype).requires_grad_(True) for t in (w, c, v, b)))


def _step(log_prob, x, w, c, v, b):
    """(log p(x), and the gradients of its sum w.r.t. W, c, V, b)."""
    lp = log_prob(x, w, c, v, b)
    return (lp.detach(), *torch.autograd.grad(lp.sum(), (w, c, v, b)))


def eager_nade_log_prob(x, w, c, v, b):
    return _step(ref.nade_log_prob, x, w, c, v, b)


def genkern_nade_log_prob(x, w, c, v, b, backend=None):
    return _step(lambda *args: genkern.nade_log_prob(*args, backend=backend), x, w, c, v, b)


def _nade_bytes(size, dtype):
    batch, dims = _nade_shape(size)
    params = 2 * dims * HIDDEN + dims + HIDDEN
    # x read once, the parameters read and their gradients written once, one log-likelihood per example
    return (batch * dims + 2 * params + batch) * torch.empty((), dtype=dtype).element_size()


NADE_CASES = (
    BenchCase(
        name="nade_log_prob",
        family=_NADE,
        make_inputs=_nade_inputs,
        genkern=genkern_nade_log_prob,
        eager=eager_nade_log_prob,
        shape=_nade_shape,
        bytes_moved=_nade_bytes,
        timed="forward+backward",
        default=False,
        max_repeats=3,
        sized=False,
    ),
)


# =========================================================================================================
# Benchmark cases of the pixelcnn_sampling family: images/s sampling a 256-level PixelCNN with 9 masked
# layers (a 7x7 mask A, eight residual 3x3 mask B, a 1x1 head):
#
# - 28x28 grey images, 64 channels, at batch 1 to 256 (the CPU target is batch 64; plain `genkern bench` runs
#   that one);
# - 32x32 RGB images, 96 channels (divisible by the 3 colour groups), at batch 256: the GPU target (plain
#   `genkern bench` runs it on a GPU only); and at batch 16, its CPU size. Each colour sub-step computes
#   only its colour group of each layer (genkern.autoregressive.sampling_plan): a third of the work.
#
# genkern runs the cached sampler (each position once per layer, the pixel loop in compiled code). The eager
# baseline is naive sampling as a PyTorch user writes it: the whole network (F.conv2d on the masked weights)
# once per pixel and colour, then a Gumbel-max draw. Naive sampling is D identical full passes (D = colours x
# height x width), so the baseline times the first NAIVE_STEPS of them and is scaled by D / NAIVE_STEPS
# (marked extrapolated). The sizes are ignored; `--ops pixelcnn_sampling` runs every case.
# =========================================================================================================
_SAMPLING = "pixelcnn_sampling"
LEVELS, LAYERS = 256, 9
NAIVE_STEPS = 4
# (name, colours, image side, hidden channels, batch, default)
SHAPES = (
    *((f"pixelcnn_sample_b{b}", 1, 28, 64, b, b == 64) for b in (1, 4, 16, 64, 256)),
    ("pixelcnn_sample_rgb32_b16", 3, 32, 96, 16, False),
    ("pixelcnn_sample_rgb32_b256", 3, 32, 96, 256, "cuda"),
)


@functools.cache
def _model(colors: int, side: int, hidden: int, device: torch.device) -> PixelCNN:
    torch.manual_seed(0)
    return PixelCNN(colors, LEVELS, side, hidden_channels=hidden, n_layers=LAYERS).to(device).eval()


def _sampling_inputs(colors: int, side: int, hidden: int, batch: int):
    def make(size, device, dtype):
        x = torch.zeros(batch, colors, side, side, dtype=torch.int64, device=device)
        return _model(colors, side, hidden, device), x

    return make


@torch.no_grad()
def eager_naive_steps(model, x):
    """The first NAIVE_STEPS draws of naive sampling, all in eager PyTorch (genkern's reference backend)."""
    colors, height, width = x.shape[1:]
    with _backend.set_backend("reference"):
        for d in range(NAIVE_STEPS):
            pixel, c = divmod(d, colors)
            i, j = divmod(pixel, width)
            logits = model(x)[:, :, c, i, j].contiguous()
            base = draw_base(0, x.shape[0], model.dims, d, model.levels, x.device)
            x[:, c, i, j] = gumbel_argmax(logits, base, seed=0)
    return x


def genkern_cached(model, x, backend=None):
    return model.sample(x.shape[0], seed=0, backend=backend)


SAMPLING_CASES = tuple(
    BenchCase(
        name=name,
        family=_SAMPLING,
        make_inputs=_sampling_inputs(colors, side, hidden, batch),
        genkern=genkern_cached,
        eager=eager_naive_steps,
        shape=lambda size, s=(batch, colors, side, side): s,
        bytes_moved=lambda n, dt: 0,
        default=default,
        compile=False,
        items=lambda size, b=batch: b,
        item_unit="img",
        eager_scale=lambda size, d=colors * side * side: d / NAIVE_STEPS,
        max_repeats=3,
        timed="whole sampling run",
        sized=False,
    )
    for name, colors, side, hidden, batch, default in SHAPES
)


# =========================================================================================================
# Benchmark case of the sampling_head group: one LLM decoding step's token draw, (64, 32000) logits with
# temperature 0.8, top_k 50 and top_p 0.9. The eager baseline is the sort-based filter a PyTorch user (or
# vLLM's fallback) writes: sort, the k-th value, a softmax and cumulative sum for top_p, scatter back, then
# an exponential-race draw. genkern keeps no sort (selection for top_k, a mass quickselect or bisection for
# top_p) and draws by Gumbel-max over the kept tokens only.
# =========================================================================================================
_HEAD = "sampling_head"
HEAD_ROWS, HEAD_VOCAB = 64, 32000
HEAD_FILTERS = dict(temperature=0.8, top_k=50, top_p=0.9)


def _head_inputs(size, device, dtype):
    g = torch.Generator().manual_seed(0)
    return ((torch.randn(HEAD_ROWS, HEAD_VOCAB, generator=g) * 4).to(device=device, dtype=dtype),)


def eager_top_k_top_p(logits):
    logits = logits / HEAD_FILTERS["temperature"]
    ascending, order = logits.sort(dim=-1)
    kth = ascending.gather(1, torch.full_like(order[:, :1], logits.shape[-1] - HEAD_FILTERS["top_k"]))
    ascending = ascending.masked_fill(ascending < kth, -math.inf)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    tail = cumulative <= 1 - HEAD_FILTERS["top_p"]
    tail[:, -1] = False
    ascending = ascending.masked_fill(tail, -math.inf)
    probs = ascending.scatter(-1, order, ascending).softmax(dim=-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


def genkern_sample_logits(logits, backend=None):
    return genkern.sample_logits(logits, seed=0, offset=1, backend=backend, **HEAD_FILTERS)


HEAD_CASES = (
    BenchCase(
        name="sample_logits_topk50_topp0.9",
        family=_HEAD,
        make_inputs=_head_inputs,
        genkern=genkern_sample_logits,
        eager=eager_top_k_top_p,
        shape=lambda size: (HEAD_ROWS, HEAD_VOCAB),
        bytes_moved=lambda size, dtype: HEAD_ROWS * HEAD_VOCAB * _itemsize(dtype) + HEAD_ROWS * 8,
        items=lambda size: HEAD_ROWS,
        item_unit="token",
        sized=False,
    ),
)


# =========================================================================================================
# Benchmark case of the logistic-mixture head: PixelCNN++'s loss on CIFAR-sized outputs (16 x 3 x 32 x 32
# images, K = 10 components: params (16, 100, 32, 32)), forward and backward, whatever the size; peak memory
# measured too (bench.peak_memory_bytes), which is the point of the fused kernels: the eager loss builds
# (B, H, W, 3, K) intermediates by the dozen and autograd keeps many of them, genkern keeps log p per pixel.
# The eager baseline is the loss as a PyTorch user writes it from the paper (one (B, H, W, 3, K) tensor per
# term, as PixelCNN++'s published code also computes it), torch.autograd.grad of its sum; torch.compile gets
# that same function. Plain `genkern bench` leaves it out: `--ops logistic_mixture_nll` runs it.
# =========================================================================================================
_MIXTURE = "logistic_mixture"
MIX_BATCH, MIX_SIDE, MIX_K = 16, 32, 10


def _mixture_shape(size: int) -> tuple[int, int, int, int]:
    return MIX_BATCH, 10 * MIX_K, MIX_SIDE, MIX_SIDE


def _mixture_inputs(size, device, dtype):
    g = torch.Generator().manual_seed(0)
    params = torch.randn(_mixture_shape(size), generator=g) * 0.5
    x = torch.randint(0, 256, (MIX_BATCH, 3, MIX_SIDE, MIX_SIDE), generator=g)
    return params.to(device=device, dtype=dtype).requires_grad_(True), x.to(device)


def eager_mixture_log_prob(params: Tensor, v: Tensor) -> Tensor:
    """log p per pixel (B, H, W) of PixelCNN++'s coupled mixture as a PyTorch user writes it from the paper
    (Salimans et al. 2017, section 2.1-2.2, with its edge bins and low-mass branch): v the images scaled to
    [-1, 1] (B, 3, H, W), params (B, 10K, H, W); every term a channels-last (B, H, W, 3, K) tensor."""
    K = params.shape[1] // 10
    p = params.permute(0, 2, 3, 1)
    mixture_logits = p[..., :K]
    per_colour = p[..., K:].reshape(*p.shape[:3], 3, 3 * K)  # per colour: K means, K log-scales, K couplings
    mean, log_scale = per_colour[..., :K], per_colour[..., K : 2 * K].clamp(min=-7.0)
    coupling = per_colour[..., 2 * K :].tanh()
    v = v.permute(0, 2, 3, 1).unsqueeze(-1)  # (B, H, W, 3, 1)
    red, green = v[..., 0, :], v[..., 1, :]
    mean = torch.stack(
        (
            mean[..., 0, :],
            mean[..., 1, :] + coupling[..., 0, :] * red,
            mean[..., 2, :] + coupling[..., 1, :] * red + coupling[..., 2, :] * green,
        ),
        dim=-2,
    )
    inv_scale = torch.exp(-log_scale)
    upper, lower, centre = (inv_scale * (v - mean + d) for d in (1.0 / 255.0, -1.0 / 255.0, 0.0))
    bin_mass = torch.sigmoid(upper) - torch.sigmoid(lower)
    log_below_upper = upper - F.softplus(upper)  # the bin at level 0 takes the whole left tail
    log_above_lower = -F.softplus(lower)  # the bin at level 255 the whole right tail
    log_density = centre - log_scale - 2.0 * F.softplus(centre) - math.log(127.5)  # density times bin width
    inner = torch.where(bin_mass > 1e-5, bin_mass.clamp(min=1e-12).log(), log_density)
    log_p = torch.where(v < -0.999, log_below_upper, torch.where(v > 0.999, log_above_lower, inner))
    return torch.logsumexp(log_p.sum(dim=-2) + torch.log_softmax(mixture_logits, dim=-1), dim=-1)


def eager_mixture_nll(params: Tensor, x: Tensor) -> Tensor:
    return -eager_mixture_log_prob(params, x.to(params.dtype) * (2.0 / 255.0) - 1.0).sum()


def eager_logistic_mixture_nll(params, x):
    return torch.autograd.grad(eager_mixture_nll(params, x), params)


def genkern_logistic_mixture_nll(params, x, backend=None):
    loss = genkern.discretized_logistic_mixture_nll(params, x, reduction="sum", backend=backend)
    return torch.autograd.grad(loss, params)


def _mixture_bytes(size, dtype):
    b, p, h, w = _mixture_shape(size)
    # params read, their gradient written, the levels read (int64)
    return 2 * b * p * h * w * _itemsize(dtype) + b * 3 * h * w * 8


MIXTURE_CASES = (
    BenchCase(
        name="logistic_mixture_nll",
        family=_MIXTURE,
        make_inputs=_mixture_inputs,
        genkern=genkern_logistic_mixture_nll,
        eager=eager_logistic_mixture_nll,
        shape=_mixture_shape,
        bytes_moved=_mixture_bytes,
        timed="forward+backward",
        default=True,  # the family's headline: PixelCNN++'s loss, time and peak memory against eager
        max_repeats=5,
        sized=False,
        peak_memory=True,
    ),
)


CASES = (
    *CONV1D_CASES,
    *CONV1D_STATES_CASES,
    *MASKED_CONV_CASES,
    *SAMPLING_CASES,
    *NADE_CASES,
    *HEAD_CASES,
    *MIXTURE_CASES,
)
