"""Sampling autoregressive image models: Gumbel-max draws on the genkern stream, and cached sampling.

    level = genkern.gumbel_argmax(logits, base, seed=0)       # one categorical draw per row

Cached sampling runs a model as a `Program` (built by the model, see genkern.models.PixelCNN): every layer
keeps its activations, and each new pixel and colour computes only its own position in every layer, from
the cached window of earlier positions. The cpu backend runs the whole pixel loop in compiled code, the
cuda backend in one kernel launch (a block per few samples); the reference runs the same program position
by position in torch (any device)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from . import backend as _backend
from .ops import pixelcnn_sampling as _ops
from .ops._backends import to_signed
from .random import check_offset, resolve_seed
from .reference.pixelcnn_sampling import CONV, GATE

FAMILY = "pixelcnn_sampling"


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
    name = _backend.resolve(backend, logits.device, logits.dtype, family=FAMILY)
    return torch.ops.genkern.gumbel_argmax(logits, base, to_signed(seed), to_signed(offset), name)


def draw_base(first_sample: int, batch: int, dims: int, position: int, levels: int, device) -> Tensor:
    """The stream element where each sample's draw at `position` starts: ((sample * D) + position) * levels."""
    samples = first_sample + torch.arange(batch, dtype=torch.int64, device=device)
    return (samples * dims + position) * levels


class Program:
    """A cached-sampling program: activation caches (cache 0 is the network input, one channel per colour,
    holding scale * level + shift) and the nodes that fill them, in order (csrc/pixelcnn_sampling.h).

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
        _ops.sample(caches, nodes, out, self.logits, levels, scale, shift, seed, offset, first_sample, backend)
        return out
