"""The autoregressive family: causal 1-D convolutions, masked (PixelCNN) convolutions, NADE, and sampling
(Gumbel-max draws, cached PixelCNN sampling). The public functions.

    y = genkern.causal_conv1d(x, weight, bias, dilation=2, activation="silu")   # x (B, C, L)
    y = genkern.causal_conv1d_update(x_t, state, weight, bias, dilation=2)      # one step, state updated
    h = genkern.gated_activation(y)                                              # tanh(a) * sigmoid(b)
    y = genkern.masked_conv2d(x, weight, bias, mask_type="A", color_groups=3)
    logp = genkern.nade_log_prob(x, weight, c, v, b)           # x (B, D) of 0/1 -> (B,) nats, differentiable
    x = genkern.nade_sample(weight, c, v, b, 16, seed=0)        # (16, D) of 0.0 / 1.0
    level = genkern.gumbel_argmax(logits, base, seed=0)       # one categorical draw per row

Causal convolution: output l sees inputs l, l - d, ..., l - (K - 1) d only (zeros before the start). A (C, K)
weight is depthwise, a (C_out, C_in, K) weight a full convolution.

Masked convolution: the weight's masked taps are ignored (they need not be zero) and get zero gradient.

NADE (Larochelle & Murray, 2011): parameters W (H, D), c (H), V (D, H), b (D); the model is in
genkern.autoregressive.reference (docs/math.md, section 4). log p(x) costs O(D H) per example through the
shared-weight recurrence, with the pre-activations held per example, never the (B, H, D) tensor an eager
implementation builds. genkern.models.NADE wraps these as a module.

Cached sampling runs a model as a `Program` (built by the model, see genkern.models.PixelCNN): every layer
keeps its activations, and each new pixel and colour computes only its own position in every layer, from
the cached window of earlier positions. The cpu backend runs the whole pixel loop in compiled code, the
cuda backend in one kernel launch (a block per few samples); the reference runs the same program position
by position in torch (any device).

Each function checks its arguments, picks a backend (see genkern.backend) and calls its `genkern::` op,
so it works under autograd and torch.compile.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .._kernels import to_signed
from ..random import check_offset, resolve_seed
from . import _ops
from .reference import CONV, GATE, check_masked_conv2d_args, receptive_field

_CONV1D = "causal_conv1d"
_MAX_DILATION = 2**31


def _activation(activation) -> str:
    if activation is None:
        return "none"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None, 'silu' or 'tanh', got {type(activation).__name__}")
    if activation not in ("silu", "tanh"):
        raise ValueError(f"activation must be None, 'silu' or 'tanh', got {activation!r}")
    return activation


def _weight_and_bias(weight, bias, x: Tensor) -> int:
    """Checks weight (C, K) or (C_out, C_in, K) against x's channels, and bias (C_out,); returns C_out."""
    _checks.float_tensor("weight", weight)
    _checks.same_place("weight", weight, "x", x)
    if weight.dim() not in (2, 3) or weight.shape[-1] < 1:
        raise ValueError(f"weight must have shape (C, K) or (C_out, C_in, K) with K >= 1, got {tuple(weight.shape)}")
    c_in = weight.shape[0] if weight.dim() == 2 else weight.shape[1]
    if c_in != x.shape[1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the {x.shape[1]} channels of x")
    if bias is not None:
        _checks.like("bias", bias, "x", x, shape=(weight.shape[0],))
    return weight.shape[0]


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, dilation: int = 1,
                  activation: str | None = None, backend: str | None = None) -> Tensor:
    """y[b, o, l] = act(bias[o] + sum_{i, k} weight[o, i, k] x[b, i, l - (K - 1 - k) dilation]), x zero
    before position 0. x (B, C_in, L); weight (C_out, C_in, K), or (C, K) depthwise (output o sees input o
    only); bias (C_out,) or None; activation None, "silu" or "tanh". Returns (B, C_out, L), differentiable
    w.r.t. x, weight and bias."""
    _checks.float_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, C, L), got {tuple(x.shape)}")
    _weight_and_bias(weight, bias, x)
    dilation = _checks.integer("dilation", dilation, low=1, high=_MAX_DILATION)
    act = _activation(activation)
    name = _backend.resolve(backend, x.device, x.dtype, _CONV1D)
    return torch.ops.genkern.causal_conv1d(x, weight, bias, dilation, act, name)


def causal_conv1d_update(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                         dilation: int = 1, activation: str | None = None, backend: str | None = None) -> Tensor:
    """One step of causal_conv1d for generation: x (B, C_in) is the next input, and the result (B, C_out)
    equals causal_conv1d's output at that position.

    state (B, C_in, W) holds the W previous inputs, oldest first, with W >= (K - 1) * dilation (the
    receptive field; extra older entries are ignored); start a sequence with
    zeros, which is the convolution's causal padding. state is updated in place: shifted left by one
    with x appended. Not differentiable."""
    _checks.float_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, C) (one step), got {tuple(x.shape)}")
    _weight_and_bias(weight, bias, x)
    dilation = _checks.integer("dilation", dilation, low=1, high=_MAX_DILATION)
    need = receptive_field(weight.shape[-1], dilation)
    _checks.float_tensor("state", state)
    _checks.same_place("state", state, "x", x)
    if state.dim() != 3 or tuple(state.shape[:2]) != tuple(x.shape) or state.shape[2] < need:
        raise ValueError(f"state has shape {tuple(state.shape)}, expected ({x.shape[0]}, {x.shape[1]}, W) "
                         f"with W >= (K - 1) * dilation = {need}")
    act = _activation(activation)
    name = _backend.resolve(backend, x.device, x.dtype, _CONV1D)
    return torch.ops.genkern.causal_conv1d_update(x, state, weight, bias, dilation, act, name)


def gated_activation(x: Tensor, dim: int = 1, *, backend: str | None = None) -> Tensor:
    """tanh(a) * sigmoid(b), with a and b the first and second halves of x along `dim`, in one pass.
    Differentiable; the result has half of x's size along `dim`."""
    _checks.float_tensor("x", x)
    dim = _checks.integer("dim", dim)
    if not -max(x.dim(), 1) <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of {x.dim()} dims")
    dim %= x.dim()
    if x.shape[dim] % 2:
        raise ValueError(f"x has odd size {x.shape[dim]} along dim {dim}: it must split into two halves")
    name = _backend.resolve(backend, x.device, x.dtype, _CONV1D)
    return torch.ops.genkern.gated_activation(x, dim, name)


def masked_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, mask_type: str = "A",
                  color_groups: int = 1, dilation: int = 1, backend: str | None = None) -> Tensor:
    """A stride-1 convolution with 'same' output size (padding dilation * (k // 2)) whose k x k weight is
    masked for raster-order autoregression (docs/math.md, section 4).

    x: (B, C_in, H, W); weight: (C_out, C_in, k, k), k odd; bias: (C_out,) or None. Mask A hides the centre
    pixel (first layer), mask B shows it (later layers); with `color_groups` G the channels split into G
    contiguous groups and, at the centre, output group g sees input groups h < g (A) or h <= g (B)."""
    color_groups, dilation = check_masked_conv2d_args(x, weight, bias, mask_type, color_groups, dilation)
    name = _backend.resolve(backend, x.device, x.dtype, family="masked_conv")
    return torch.ops.genkern.masked_conv2d(x, weight, bias, mask_type, color_groups, dilation, name)


_NADE = "nade"
_DATA_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, *_checks.FLOAT_DTYPES)


def _params(weight, c, v, b) -> tuple[int, int]:
    """(D, H), after checking W (H, D), c (H), V (D, H), b (D): float tensors of one dtype and device."""
    _checks.float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (H, D), got {tuple(weight.shape)}")
    hidden, dims = weight.shape
    for name, t, shape in (("c", c, (hidden,)), ("v", v, (dims, hidden)), ("b", b, (dims,))):
        _checks.like(name, t, "weight", weight, shape=shape)
    return dims, hidden


def binary_data(name: str, x, dims: int, weight: Tensor) -> Tensor:
    """x (B, D) of 0/1 values in any real dtype (bool and integers too), as the parameters' dtype. Out of range
    values are a ValueError (on a GPU this check waits for the data). Under torch.compile the values are not
    checked: a data-dependent branch would break the graph."""
    _checks.tensor(name, x)
    if x.dtype not in _DATA_DTYPES:
        raise TypeError(f"{name} must be a bool, integer or float tensor of 0/1 values, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != dims:
        raise ValueError(f"{name} must have shape (B, {dims}), got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {weight.device}")
    checkable = x.dtype != torch.bool and x.numel() and not torch.compiler.is_compiling()
    if checkable and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (binary data)")
    return x.to(weight.dtype)


def nade_log_prob(x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor, *, backend: str | None = None) -> Tensor:
    """log p(x) in nats for each row of x (B, D), whose entries must be 0 or 1 (any real dtype). Returns (B,)
    in the parameters' dtype, differentiable w.r.t. weight, c, v and b (x gets no gradient)."""
    dims, _ = _params(weight, c, v, b)
    x = binary_data("x", x, dims, weight)
    name = _backend.resolve(backend, weight.device, weight.dtype, _NADE)
    return torch.ops.genkern.nade_log_prob(x, weight, c, v, b, name)


def nade_sample(weight: Tensor, c: Tensor, v: Tensor, b: Tensor, num_samples: int, *, seed: int | None = None,
                offset: int = 0, first: int = 0, backend: str | None = None) -> Tensor:
    """Samples first .. first + num_samples - 1 of the model as a (num_samples, D) tensor of 0.0 / 1.0 in the
    parameters' dtype. Dimension i of sample s is 1 iff u < p(x_i = 1 | x_<i), u the genkern uniform at stream
    element s * D + i of (seed, offset): a sample is the same whatever else is drawn with it. seed None draws
    one from torch's generator (pass one under torch.compile). Not differentiable."""
    dims, _ = _params(weight, c, v, b)
    num_samples = _checks.integer("num_samples", num_samples, low=0, high=_ops.INT64_MAX)
    first = _checks.integer("first", first, low=0, high=_ops.INT64_MAX)
    if (first + num_samples) * max(dims, 1) > _ops.INT64_MAX:
        raise ValueError("first + num_samples is too large: (first + num_samples) * D must stay below 2^63")
    seed, offset = resolve_seed(seed), check_offset(offset)
    name = _backend.resolve(backend, weight.device, weight.dtype, _NADE)
    return torch.ops.genkern.nade_sample(weight, c, v, b, num_samples, to_signed(seed), to_signed(offset), first, name)


SAMPLING_FAMILY = "pixelcnn_sampling"


def gumbel_argmax(logits: Tensor, base: Tensor, *, seed=None, offset=0, backend: str | None = None) -> Tensor:
    """Categorical draws by Gumbel-max: row n of logits (N, levels) gives
    argmax_k logits[n, k] - log(-log u), u the genkern uniform of stream element base[n] + k.

    For a model with D dimensions, base = ((sample * D) + position) * levels keys each draw by (sample,
    position, level), so a sample is the same whatever batch it is drawn in. Returns (N,) int64."""
    logits = _checks.float_tensor("logits", logits)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, levels >= 1), got {tuple(logits.shape)}")
    base = _checks.tensor("base", base)
    if base.dtype != torch.int64:
        raise TypeError(f"base must be an int64 tensor, got {base.dtype}")
    if tuple(base.shape) != (logits.shape[0],) or base.device != logits.device:
        raise ValueError(f"base must have shape ({logits.shape[0]},) on logits' device, got {tuple(base.shape)}")
    if base.numel() and bool((base < 0).any()):
        raise ValueError("base must be non-negative")
    seed, offset = resolve_seed(seed), check_offset(offset)
    name = _backend.resolve(backend, logits.device, logits.dtype, family=SAMPLING_FAMILY)
    return torch.ops.genkern.gumbel_argmax(logits, base, to_signed(seed), to_signed(offset), name)


def draw_base(first_sample: int, batch: int, dims: int, position: int, levels: int, device) -> Tensor:
    """The stream element where each sample's draw at `position` starts: ((sample * D) + position) * levels."""
    samples = first_sample + torch.arange(batch, dtype=torch.int64, device=device)
    return (samples * dims + position) * levels


class Program:
    """A cached-sampling program: activation caches (cache 0 is the network input, one channel per colour,
    holding scale * level + shift) and the nodes that fill them, in order (csrc/autoregressive/pixelcnn_sampling.h).

    Pixel nodes run at every (row, column, colour) step; row nodes once per row, for the whole row, before
    its first pixel. A convolution reads input position (i + ky - anchor_y, j + kx - anchor_x) for its kernel
    tap (ky, kx); `keep` (the weight's 0/1 mask) drops masked entries and whole masked taps."""

    def __init__(self, colors: int):
        self.channels = [colors]
        self.nodes: list[tuple] = []
        self.logits: int | None = None

    def cache(self, channels: int) -> int:
        self.channels.append(int(channels))
        return len(self.channels) - 1

    def conv(self, src: int, dst: int, weight: Tensor, keep: Tensor | None = None, *, anchor=(0, 0), bias=None,
             cond=None, residual: int = -1, relu_input: bool = False, accumulate: bool = False,
             row_level: bool = False) -> None:
        weight = weight.detach().to(torch.float32)
        if keep is not None:
            weight = torch.where(keep.to(weight.device) != 0, weight, 0.0)  # masked entries may hold anything
            used = keep.flatten(0, 1).ne(0).any(0)
        else:
            used = torch.ones(weight.shape[2:], dtype=torch.bool)
        taps = used.nonzero().tolist()
        dy = [ky - anchor[0] for ky, _ in taps]
        dx = [kx - anchor[1] for _, kx in taps]
        packed = weight.permute(2, 3, 1, 0)[used.to(weight.device)].contiguous()  # (taps, C_in, C_out)
        flat = [None if t is None else t.detach().to(torch.float32).contiguous() for t in (bias, cond)]
        self.nodes.append((CONV, row_level, src, dst, residual, relu_input, accumulate, dy, dx, packed, *flat))

    def gate(self, src: int, dst: int, *, row_level: bool = False) -> None:
        self.nodes.append((GATE, row_level, src, dst, -1, False, False, [], [], None, None, None))

    def run(self, out: Tensor, *, levels: int, scale: float, shift: float, seed: int, offset: int,
            first_sample: int, backend: str) -> Tensor:
        batch, _, height, width = out.shape
        caches = [torch.zeros(batch, height, width, c, dtype=torch.float32, device=out.device) for c in self.channels]
        nodes = [tuple(v.to(out.device) if isinstance(v, Tensor) else v for v in n) for n in self.nodes]
        _ops.run_program(caches, nodes, out, self.logits, levels, scale, shift, seed, offset, first_sample, backend)
        return out
