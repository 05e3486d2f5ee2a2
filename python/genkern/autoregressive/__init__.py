"""The autoregressive family: causal 1-D convolutions, masked (PixelCNN) convolutions, NADE, and sampling
(Gumbel-max draws, cached PixelCNN sampling). The public functions.

    y = genkern.causal_conv1d(x, weight, bias, dilation=2, activation="silu")   # x (B, C, L)
    y = genkern.causal_conv1d_update(x_t, state, weight, bias, dilation=2)      # one step, state updated
    h = genkern.gated_activation(y)                                              # tanh(a) * sigmoid(b)
    y = genkern.masked_conv2d(x, weight, bias, mask_type="A", color_groups=3)
    logp = genkern.nade_log_prob(x, weight, c, v, b)           # x (B, D) of 0/1 -> (B,) nats, differentiable
    x = genkern.nade_sample(weight, c, v, b, 16, seed=0)        # (16, D) of 0.0 / 1.0
    level = genkern.gumbel_argmax(logits, base, seed=0)       # one categorical draw per row
    token = genkern.sample_logits(logits, seed=0, offset=step, temperature=0.8, top_k=50, top_p=0.9)

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
by position in torch (any device). There is no triton backend for it. The draws are Gumbel-max over each
colour's logits, or with a logistic-mixture head (`Program.mixture`) a whole pixel at a time by
discretized_logistic_mixture_sample's draw.

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
from . import _ops, sampling_plan
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


def gumbel_argmax(
    logits: Tensor,
    base: Tensor,
    *,
    seed=None,
    offset=0,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    backend: str | None = None,
) -> Tensor:
    """Categorical draws by Gumbel-max: row n of logits (N, levels) gives
    argmax_k logits[n, k] - log(-log u), u the genkern uniform of stream element base[n] + k.

    For a model with D dimensions, base = ((sample * D) + position) * levels keys each draw by (sample,
    position, level), so a sample is the same whatever batch it is drawn in. Returns (N,) int64.

    The sampling filters (docs/math.md, section 6.2; each a scalar or a (N,) tensor on logits' device) apply
    in this order: temperature (logits / temperature; 0 draws the argmax), top_k (keep the k largest, ties at
    the k-th kept; 0 keeps all), top_p (keep the largest tokens whose renormalised probability first sums to
    >= top_p, ties at the threshold kept, always >= 1 token; 1 keeps all), min_p (keep p >= min_p * max p).
    Dropped tokens are never drawn; the kept ones are drawn exactly by their renormalised probabilities,
    with the noise above, so a draw still depends only on (seed, offset, base[n]). With no filter given the
    draws are the unfiltered op's, bit for bit (genkern::gumbel_argmax; otherwise genkern::sample_logits)."""
    _tensors(logits=logits, base=base)
    seed, offset = resolve_seed(seed), check_offset(offset)
    if temperature is None and top_k is None and top_p is None and min_p is None:
        return _backend.call(backend, torch.ops.genkern.gumbel_argmax, logits, base, to_signed(seed), to_signed(offset))
    filters = _row_filters(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return _backend.call(
        backend, torch.ops.genkern.sample_logits, logits, base, to_signed(seed), to_signed(offset), *filters
    )


def sample_logits(
    logits: Tensor,
    *,
    seed=None,
    offset=0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    backend: str | None = None,
) -> Tensor:
    """One token per row of LLM-style logits (rows, vocab), after temperature, top_k, top_p and min_p (see
    gumbel_argmax; each a scalar or a (rows,) tensor), by a sort-free Gumbel-max: token k of row n has the
    noise of stream element n * vocab + k, so a row's draw depends only on (seed, offset, n). Use a new
    offset per generation step. Returns (rows,) int64."""
    _tensors(logits=logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (rows, vocab), got {tuple(logits.shape)}")
    base = torch.arange(logits.shape[0], dtype=torch.int64, device=logits.device) * logits.shape[1]
    return gumbel_argmax(
        logits,
        base,
        seed=seed,
        offset=offset,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        backend=backend,
    )


_FILTER_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


def _row_filter(name: str, value, logits: Tensor) -> Tensor:
    """A filter as the op's per-row tensor: None is the filter's off value, a scalar is every row's."""
    dtype = _ops.ROW_FILTERS[name][0]
    rows = logits.shape[0] if logits.dim() >= 1 else 0
    if value is None:
        value = _FILTER_DEFAULTS[name]
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex() or (dtype == torch.int64) == value.is_floating_point():
            kind = "an integer" if dtype == torch.int64 else "a floating-point"
            raise TypeError(f"{name} must be a scalar or {kind} tensor of shape ({rows},), got dtype {value.dtype}")
        return value.to(dtype)  # shape and device: the op's check, naming the argument
    if dtype == torch.int64:
        value = _checks.integer(name, value)
        if value < 0:  # before the int64 tensor below, which would not hold -2**63 - 1
            raise ValueError(f"{name} must be {_ops.ROW_FILTERS[name][1]}, got {value}")
        value = min(value, 2**63 - 1)  # any k past the vocabulary keeps every token
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
        value = float(value)
    _, allowed, ok = _ops.ROW_FILTERS[name]
    if not bool(ok(torch.tensor(value, dtype=dtype))):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return torch.full((rows,), value, dtype=dtype, device=logits.device)


def _row_filters(logits: Tensor, **filters) -> list[Tensor]:
    return [_row_filter(name, filters[name], logits) for name in _ops.ROW_FILTERS]


def draw_base(first_sample: int, batch: int, dims: int, position: int, levels: int, device) -> Tensor:
    """The stream element where each sample's draw at `position` starts: ((sample * D) + position) * levels."""
    samples = first_sample + torch.arange(batch, dtype=torch.int64, device=device)
    return (samples * dims + position) * levels


class Program:
    """A cached-sampling program: activation caches (cache 0 is the network input, one channel per colour,
    holding scale * level + shift) and the nodes that fill them, in order (csrc/autoregressive/pixelcnn_sampling.h).

    Pixel nodes run at every (row, column, colour) step; row nodes once per row, for the whole row, before
    its first pixel. A convolution reads input position (i + ky - anchor_y, j + kx - anchor_x) for its kernel
    tap (ky, kx); `keep` (the weight's 0/1 mask) drops masked entries and whole masked taps. At each colour
    sub-step a pixel node computes only the output channels its plan gives that step (`segments`, see
    genkern.autoregressive.sampling_plan): with colour groups, each group of each layer once per pixel."""

    def __init__(self, colors: int):
        self.channels = [colors]
        self.nodes: list[tuple] = []
        self.structures: list[sampling_plan.Structure | None] = []  # of each node, for the plan
        self.logits: int | None = None
        # (K, rgb_coupling) when the logits cache holds a logistic mixture's params (docs/math.md, section 6.1):
        # each pixel is then drawn whole, as discretized_logistic_mixture_sample draws it.
        self.mixture: tuple[int, bool] | None = None

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
        self.structures.append(sampling_plan.structure(dy, dx, packed))  # on the host now, not in run()

    def check_caches(self, name: str, batch: int, height: int, width: int, device) -> None:
        """Refuse, naming `name` (what sized the batch), caches (float32, batch x height x width x channels
        each) that could never be allocated."""
        numel = batch * height * width * sum(self.channels)
        _checks.allocation(name, numel, 4, device, "the sampler's activation caches")

    def gate(self, src: int, dst: int, *, row_level: bool = False) -> None:
        self.nodes.append((GATE, row_level, src, dst, -1, False, False, [], [], None, None, None))
        self.structures.append(None)

    def segments(self, levels: int) -> list[list[tuple[int, int, int, int]]]:
        """Each node's colour plan: (step, lo, hi, rows) segments (genkern.autoregressive.sampling_plan)."""
        colors = self.channels[0]
        return sampling_plan.plan(
            self.nodes, self.structures, self.channels, colors, self.logits, levels, self.mixture is not None
        )

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
        device; the cached sampler has cpu, cuda and reference backends: no triton). With `mixture` set, the
        draws are those of discretized_logistic_mixture_sample(params, first=first_sample) on the network's
        params (float32: the caches')."""
        batch, _, height, width = out.shape
        self.check_caches("out", batch, height, width, out.device)
        segments = self.segments(levels)
        caches = [torch.zeros(batch, height, width, c, dtype=torch.float32, device=out.device) for c in self.channels]
        nodes = [tuple(v.to(out.device) if isinstance(v, Tensor) else v for v in n) for n in self.nodes]
        _backend.call(
            backend,
            _ops.run_program,
            caches,
            nodes,
            segments,
            out,
            self.logits,
            levels,
            scale,
            shift,
            seed,
            offset,
            first_sample,
            *(self.mixture or (0, False)),
        )
        return out


# ---------------------------------------------------------------------------------------------------------
# Discretised logistic mixture (PixelCNN++'s head; docs/math.md, section 6.1)
# ---------------------------------------------------------------------------------------------------------
MIXTURE_REDUCTIONS = ("none", "mean", "sum", "pixel")
_LEVEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, *_checks.FLOAT_DTYPES)


def _mixture_layout(params: Tensor, colors: int, num_mixtures, rgb_coupling) -> tuple[int, bool]:
    """(K, coupled) from the arguments: coupling defaults to C == 3; K, when None, from params' channels."""
    _checks.float_tensor("params", params)
    if params.dim() != 4:
        raise ValueError(f"params must have shape (B, P, H, W), got {tuple(params.shape)}")
    if rgb_coupling is None:
        rgb_coupling = colors == 3
    if not isinstance(rgb_coupling, bool):
        raise TypeError(f"rgb_coupling must be None or a bool, got {type(rgb_coupling).__name__}")
    if num_mixtures is None:
        per = 10 if rgb_coupling else 1 + 2 * colors
        if params.shape[1] % per or params.shape[1] == 0:
            raise ValueError(
                f"params has {params.shape[1]} channels, not a positive multiple of {per} "
                f"({'10K, coupled RGB' if rgb_coupling else f'(1 + 2C)K with C = {colors}'}): pass num_mixtures"
            )
        num_mixtures = params.shape[1] // per
    return _int("num_mixtures", num_mixtures), rgb_coupling


def mixture_levels(x, levels: int) -> Tensor:
    """x of integer levels in any integer or float dtype, as int64 (floats must hold whole numbers; the op
    checks the range)."""
    _checks.tensor("x", x)
    if x.dtype not in _LEVEL_DTYPES:
        raise TypeError(f"x must be an integer or float tensor of levels, got dtype {x.dtype}")
    if x.is_floating_point() and x.numel() and _checks.has_values(x) and not bool((x == x.floor()).all()):
        raise ValueError(f"x must hold integer levels in [0, {levels})")
    return x.to(torch.int64)


def discretized_logistic_mixture_nll(
    params: Tensor,
    x: Tensor,
    *,
    levels: int = 256,
    num_mixtures: int | None = None,
    rgb_coupling: bool | None = None,
    reduction: str = "none",
    backend: str | None = None,
) -> Tensor:
    """PixelCNN++'s negative log-likelihood (Salimans et al. 2017) of images x under a discretised mixture of
    K logistics per pixel, in nats, in one fused pass (and one fused backward: nothing of size (B, C, H, W, K)
    is kept or formed). The training losses ("sum", "mean" with gradients needed) compute the gradient in the
    same pass and keep it (params' size) for the backward, which scales it: on the CPU every term is
    evaluated once instead of twice.

    x: (B, C, H, W) integer levels in [0, levels) (any integer dtype, or floats holding whole numbers).
    params: (B, P, H, W), PixelCNN++'s channel order (docs/math.md, section 6.1): the K mixture logits, then
    per colour c the 3K channels at K + 3K c holding the K means, log-scales and pre-tanh coefficients
    (P = 10K, rgb_coupling, C = 3: mu_G = m_G + a0 y_R, mu_B = m_B + a1 y_R + a2 y_G); without coupling (any C,
    e.g. grayscale C = 1) the 2K channels at K + 2K c hold the means and log-scales (P = (1 + 2C)K; 3K for
    C = 1). rgb_coupling None: coupled iff C = 3. num_mixtures None: K from P.

    reduction: "none" -> (B,) the NLL of each image; "mean" -> its mean over the batch; "sum" -> the total
    (PixelCNN++'s loss); "pixel" -> (B, H, W) the NLL of each pixel (all its channels). Bits per dimension are
    nll / (C H W ln 2). The result is float64 for float64 params and float32 otherwise (half types compute in
    float32). Differentiable w.r.t. params; x gets no gradient."""
    _tensors(params=params)
    if reduction not in MIXTURE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {MIXTURE_REDUCTIONS}, got {reduction!r}")
    levels = _int("levels", levels)
    x = mixture_levels(x, levels)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    k, coupled = _mixture_layout(params, x.shape[1], num_mixtures, rgb_coupling)
    if reduction in ("sum", "mean") and torch.is_grad_enabled() and params.requires_grad:
        # Training: the loss and its gradient from one pass (the backward only scales the kept gradient).
        op = torch.ops.genkern.logistic_mixture_nll_loss
        return _backend.call(backend, op, params, x, levels, k, coupled, reduction == "mean")[0]
    log_p = _backend.call(backend, torch.ops.genkern.logistic_mixture_log_prob, params, x, levels, k, coupled)
    if reduction == "pixel":
        return -log_p
    nll = -log_p.sum((1, 2))
    if reduction == "sum":
        return nll.sum()
    return nll.mean() if reduction == "mean" else nll


def discretized_logistic_mixture_sample(
    params: Tensor,
    *,
    seed: int | None = None,
    offset: int = 0,
    levels: int = 256,
    channels: int = 3,
    num_mixtures: int | None = None,
    rgb_coupling: bool | None = None,
    first: int = 0,
    backend: str | None = None,
) -> Tensor:
    """One image (B, C, H, W) of int64 levels per row of params (the layout of discretized_logistic_mixture_nll,
    C = `channels`): per pixel the component by Gumbel-max over the logits, then R, G, B in turn a logistic draw
    clamped to [-1, 1] (G and B coupled to the drawn R and G), rounded to a level. Row b is sample first + b:
    its draws are the genkern stream elements ((first + b) H W + pixel)(K + C) + draw of (seed, offset), so a
    sample never depends on the batch it is drawn in. seed None draws one from torch's generator. Not
    differentiable. (Sampling an autoregressive model runs this per pixel on the network's output.)"""
    _tensors(params=params)
    colors = _int("channels", channels)
    if colors < 1:
        raise ValueError(f"channels must be >= 1, got {colors}")
    k, coupled = _mixture_layout(params, colors, num_mixtures, rgb_coupling)
    seed, offset = resolve_seed(seed), check_offset(offset)
    return _backend.call(
        backend,
        torch.ops.genkern.logistic_mixture_sample,
        params,
        _int("levels", levels),
        k,
        coupled,
        colors,
        to_signed(seed),
        to_signed(offset),
        _int("first", first),
    )
