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

Each function normalises its arguments (defaults, dims, seeds, data dtypes) and calls its `genkern::` op,
which checks them and runs the selected backend (see genkern.backend), so it works under autograd and
torch.compile. `backend=` picks the backend for this call (None: the process-wide or automatic choice).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .._kernels import to_signed
from ..random import check_offset, resolve_seed
from . import _ops
from . import reference as _reference
from .reference import CONV, GATE

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _tensors(**args) -> None:
    """The tensor arguments are tensors (an op's schema refuses anything else with a RuntimeError, not a
    TypeError naming the argument); bias may be None."""
    for name, t in args.items():
        if not (name == "bias" and t is None):
            _checks.tensor(name, t)


def _int(name: str, value) -> int:
    """An int argument as the op's int64 (its range is the op's check)."""
    return _checks.integer(name, value, low=_INT64_MIN, high=_INT64_MAX)


def _activation(activation) -> str:
    if activation is None:
        return "none"
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None, 'silu' (or 'swish') or 'tanh', got {type(activation).__name__}")
    return "silu" if activation == "swish" else activation


def _optional_tensors(**args) -> None:
    for name, t in args.items():
        if t is not None:
            _checks.tensor(name, t)


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, length: int) -> Tensor:
    """(1, length) int32 sequence ids of the packed sequences [cu_seqlens[i], cu_seqlens[i + 1]): position t
    gets i, positions outside every sequence -1 (their outputs are 0)."""
    _checks.tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a (N + 1,) int32 or int64 tensor")
    pos = torch.arange(_int("length", length), device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    idx = torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)
    outside = (pos < cu_seqlens[0]) | (idx >= cu_seqlens.shape[0] - 1)
    return torch.where(outside, -1, idx).to(torch.int32)[None]


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    dilation: int = 1,
    activation: str | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str | None = None,
):
    """y[b, o, l] = act(bias[o] + sum_{i, k} weight[o, i, k] x[b, i, l - (K - 1 - k) dilation]), x zero
    before position 0. x (B, C_in, L); weight (C_out, C_in, K), or (C, K) depthwise (output o sees input o
    only); bias (C_out,) or None; activation None, "silu" (or "swish") or "tanh". Returns (B, C_out, L),
    differentiable w.r.t. x, weight and bias.

    Depthwise only, causal-conv1d's state API (docs/math.md, section 6.3), P = (K - 1) * dilation:
    initial_states (B, C, P) are the P inputs before position 0 (differentiable); return_final_states=True
    returns (y, final_states), the last P inputs of [initial_states, x] (differentiable); seq_idx (B, L) int
    packs sequences in a row (a tap never crosses a change of id; ids < 0 output 0), cu_seqlens (N + 1,) is
    the same for a batch of one. A channel-last x (a (B, L, C) tensor transposed) is read in place, and y
    comes back channel-last."""
    _tensors(x=x, weight=weight, bias=bias)
    _optional_tensors(initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        if seq_idx is not None:
            raise ValueError("give seq_idx or cu_seqlens, not both")
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(
                f"cu_seqlens packs sequences in one row: x must have shape (1, C, L), got {tuple(x.shape)}"
            )
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[2])
    with_states = initial_states is not None or return_final_states or seq_idx is not None
    if not with_states and not (_reference.channel_last(x) and weight.dim() == 2):
        return _backend.call(
            backend,
            torch.ops.genkern.causal_conv1d,
            x,
            weight,
            bias,
            _int("dilation", dilation),
            _activation(activation),
        )
    y, final = _backend.call(
        backend,
        torch.ops.genkern.causal_conv1d_states,
        x,
        weight,
        bias,
        initial_states,
        seq_idx,
        _int("dilation", dilation),
        _activation(activation),
    )
    return (y, final) if return_final_states else y


def causal_conv1d_update(
    x: Tensor,
    state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    dilation: int = 1,
    activation: str | None = None,
    cache_seqlens: Tensor | None = None,
    conv_state_indices: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """One step of causal_conv1d for generation: x (B, C_in) is the next input, and the result (B, C_out)
    equals causal_conv1d's output at that position.

    state (B, C_in, W) holds the W previous inputs, oldest first, with W >= (K - 1) * dilation (the
    receptive field; extra older entries are ignored); start a sequence with
    zeros, which is the convolution's causal padding. state is updated in place: shifted left by one
    with x appended. Not differentiable.

    Depthwise weights also take causal-conv1d's forms (docs/math.md, section 6.3): x (B, C, L) with L new
    inputs (the result is (B, C, L)); cache_seqlens (B,) int makes state a circular buffer (the inputs are
    written at cache_seqlens % W on); conv_state_indices (B,) int picks the state row of each batch row in a
    larger state (R, C, W) (continuous batching; a negative index is a padding slot: output 0, no state
    touched)."""
    _tensors(x=x, state=state, weight=weight, bias=bias)
    _optional_tensors(cache_seqlens=cache_seqlens, conv_state_indices=conv_state_indices)
    if x.dim() == 2 and cache_seqlens is None and conv_state_indices is None:
        return _backend.call(
            backend,
            torch.ops.genkern.causal_conv1d_update,
            x,
            state,
            weight,
            bias,
            _int("dilation", dilation),
            _activation(activation),
        )
    step = x.dim() == 2
    y = _backend.call(
        backend,
        torch.ops.genkern.causal_conv1d_update_states,
        x.unsqueeze(-1) if step else x,
        state,
        weight,
        bias,
        cache_seqlens,
        conv_state_indices,
        _int("dilation", dilation),
        _activation(activation),
    )
    return y.squeeze(-1) if step else y


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int, *, backend: str | None = None) -> Tensor:
    """The state of each packed sequence [cu_seqlens[b], cu_seqlens[b + 1]) of x (total_tokens, C): its last
    state_len inputs, zeros where it is shorter. Returns (B, C, state_len), channel-last storage (as
    causal-conv1d); a decoding loop's conv_state after a varlen prefill. Not differentiable."""
    _tensors(x=x, cu_seqlens=cu_seqlens)
    return _backend.call(
        backend, torch.ops.genkern.causal_conv1d_varlen_states, x, cu_seqlens, _int("state_len", state_len)
    )


def gated_activation(x: Tensor, dim: int = 1, *, backend: str | None = None) -> Tensor:
    """tanh(a) * sigmoid(b), with a and b the first and second halves of x along `dim`, in one pass.
    Differentiable; the result has half of x's size along `dim`."""
    _tensors(x=x)
    return _backend.call(backend, torch.ops.genkern.gated_activation, x, _int("dim", dim))


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    mask_type: str = "A",
    color_groups: int = 1,
    dilation: int = 1,
    backend: str | None = None,
) -> Tensor:
    """A stride-1 convolution with 'same' output size (padding dilation * (k // 2)) whose k x k weight is
    masked for raster-order autoregression (docs/math.md, section 4).

    x: (B, C_in, H, W); weight: (C_out, C_in, k, k), k odd; bias: (C_out,) or None. Mask A hides the centre
    pixel (first layer), mask B shows it (later layers); with `color_groups` G the channels split into G
    contiguous groups and, at the centre, output group g sees input groups h < g (A) or h <= g (B)."""
    _tensors(x=x, weight=weight, bias=bias)
    if not isinstance(mask_type, str):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    return _backend.call(
        backend,
        torch.ops.genkern.masked_conv2d,
        x,
        weight,
        bias,
        mask_type,
        _int("color_groups", color_groups),
        _int("dilation", dilation),
    )


_DATA_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, *_checks.FLOAT_DTYPES)


def binary_data(name: str, x, weight: Tensor) -> Tensor:
    """x of 0/1 values in any real dtype (bool and integers too), as the parameters' dtype (the op checks its
    shape and device). Other values are a ValueError (on a GPU this check waits for the data), checked here,
    before the conversion could round them to 0 or 1. Under torch.compile the values are not checked: a
    data-dependent branch would break the graph; nor for meta tensors, which have none."""
    _checks.tensor(name, x)
    if x.dtype not in _DATA_DTYPES:
        raise TypeError(f"{name} must be a bool, integer or float tensor of 0/1 values, got dtype {x.dtype}")
    checkable = x.dtype != torch.bool and x.numel() and _checks.has_values(x)
    if checkable and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (binary data)")
    return x.to(weight.dtype)


def nade_log_prob(x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor, *, backend: str | None = None) -> Tensor:
    """log p(x) in nats for each row of x (B, D), whose entries must be 0 or 1 (any real dtype). Returns (B,)
    in the parameters' dtype, differentiable w.r.t. weight, c, v and b (x gets no gradient)."""
    _tensors(weight=weight, c=c, v=v, b=b)
    x = binary_data("x", x, weight)
    return _backend.call(backend, torch.ops.genkern.nade_log_prob, x, weight, c, v, b)


def nade_sample(
    weight: Tensor,
    c: Tensor,
    v: Tensor,
    b: Tensor,
    num_samples: int,
    *,
    seed: int | None = None,
    offset: int = 0,
    first: int = 0,
    backend: str | None = None,
) -> Tensor:
    """Samples first .. first + num_samples - 1 of the model as a (num_samples, D) tensor of 0.0 / 1.0 in the
    parameters' dtype. Dimension i of sample s is 1 iff u < p(x_i = 1 | x_<i), u the genkern uniform at stream
    element s * D + i of (seed, offset): a sample is the same whatever else is drawn with it. seed None draws
    one from torch's generator (pass one under torch.compile). Not differentiable."""
    _tensors(weight=weight, c=c, v=v, b=b)
    num_samples, first = _int("num_samples", num_samples), _int("first", first)
    seed, offset = resolve_seed(seed), check_offset(offset)
    return _backend.call(
        backend, torch.ops.genkern.nade_sample, weight, c, v, b, num_samples, to_signed(seed), to_signed(offset), first
    )


SAMPLING_FAMILY = _ops.SAMPLING_KERNELS.family


def gumbel_argmax(logits: Tensor, base: Tensor, *, seed=None, offset=0, backend: str | None = None) -> Tensor:
    """Categorical draws by Gumbel-max: row n of logits (N, levels) gives
    argmax_k logits[n, k] - log(-log u), u the genkern uniform of stream element base[n] + k.

    For a model with D dimensions, base = ((sample * D) + position) * levels keys each draw by (sample,
    position, level), so a sample is the same whatever batch it is drawn in. Returns (N,) int64."""
    _tensors(logits=logits, base=base)
    seed, offset = resolve_seed(seed), check_offset(offset)
    return _backend.call(backend, torch.ops.genkern.gumbel_argmax, logits, base, to_signed(seed), to_signed(offset))


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

    def conv(
        self,
        src: int,
        dst: int,
        weight: Tensor,
        keep: Tensor | None = None,
        *,
        anchor=(0, 0),
        bias=None,
        cond=None,
        residual: int = -1,
        relu_input: bool = False,
        accumulate: bool = False,
        row_level: bool = False,
    ) -> None:
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

    def check_caches(self, name: str, batch: int, height: int, width: int, device) -> None:
        """Refuse, naming `name` (what sized the batch), caches (float32, batch x height x width x channels
        each) that could never be allocated."""
        numel = batch * height * width * sum(self.channels)
        _checks.allocation(name, numel, 4, device, "the sampler's activation caches")

    def gate(self, src: int, dst: int, *, row_level: bool = False) -> None:
        self.nodes.append((GATE, row_level, src, dst, -1, False, False, [], [], None, None, None))

    def run(
        self,
        out: Tensor,
        *,
        levels: int,
        scale: float,
        shift: float,
        seed: int,
        offset: int,
        first_sample: int,
        backend: str | None = None,
    ) -> Tensor:
        """Sample into `out` (B, colours, H, W) of int64, on `backend` (None: the selected one for out's
        device; the cached sampler has cpu, cuda and reference backends)."""
        batch, _, height, width = out.shape
        self.check_caches("out", batch, height, width, out.device)
        caches = [torch.zeros(batch, height, width, c, dtype=torch.float32, device=out.device) for c in self.channels]
        nodes = [tuple(v.to(out.device) if isinstance(v, Tensor) else v for v in n) for n in self.nodes]
        _backend.call(
            backend, _ops.run_program, caches, nodes, out, self.logits, levels, scale, shift, seed, offset, first_sample
        )
        return out
