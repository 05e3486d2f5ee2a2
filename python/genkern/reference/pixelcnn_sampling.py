"""Reference of the pixelcnn_sampling family: Gumbel-max draws on the genkern stream, and the cached
sampler's program run position by position in plain torch (shared/math.md, section 4).

A categorical draw over `levels` values at a row whose stream elements start at `base` is
    argmax_k  logit_k - log(-log u_{base + k}),
u the genkern uniform of stream element base + k. Models use base = ((sample * D) + position) * levels
with positions in raster order, colours inside a pixel, so a draw never depends on the batch.
"""
from __future__ import annotations

import torch

from .random import MASK32, philox4x32_10, uniform

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


def sample(caches, nodes, out: torch.Tensor, logits: int, levels: int, scale: float, shift: float, seed: int,
           offset: int, first_sample: int) -> None:
    """Run the cached sampler's program (see csrc/pixelcnn_sampling.h): row nodes once per row before its
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
                level = gumbel_argmax(caches[logits][:, i, j, c * levels:(c + 1) * levels], base, seed, offset)
                out[:, c, i, j] = level
                caches[0][:, i, j, c] = scale * level.to(caches[0].dtype) + shift
