"""The genkern stream in plain torch integer arithmetic (docs/math.md, section 1)."""

from __future__ import annotations

import math

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a < 2^32 held in int64, without overflowing int64."""
    low = a * (b & 0xFFFF)  # < 2^48
    high = a * (b >> 16)  # < 2^48;  a * b = high * 2^16 + low
    lo = (low + ((high & 0xFFFF) << 16)) & MASK32
    hi = (high + (low >> 16)) >> 16
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 counters; returns the four output words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c0, c1, c2, c3


def bits(n: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """Stream elements 0..n-1 for (seed, offset) as int64 values in [0, 2^32)."""
    blocks = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    c0, c1 = blocks & MASK32, blocks >> 32
    c2 = torch.full_like(blocks, offset & MASK32)
    c3 = torch.full_like(blocks, (offset >> 32) & MASK32)
    out = philox4x32_10(c0, c1, c2, c3, seed & MASK32, (seed >> 32) & MASK32)
    return torch.stack(out, dim=1).reshape(-1)[:n]


def uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 -> (0, 1): ((x >> 8) + 0.5) * 2^-24, exact in float64."""
    return ((x >> 8).to(torch.float64) + 0.5) * 2.0**-24


def randn(shape, seed: int, offset: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normals of the stream: Box-Muller on lane pairs (0,1) and (2,3), in float64."""
    n = math.prod(shape)
    x = bits(4 * ((n + 3) // 4), seed, offset, device).reshape(-1, 2, 2)  # (block, pair, lane in pair)
    radius = torch.sqrt(-2.0 * torch.log(uniform(x[..., 0])))
    angle = 2.0 * math.pi * uniform(x[..., 1])
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1).reshape(-1)[:n]
    # genkern normals are float32 values, whatever the dtype they are delivered in.
    return z.reshape(shape).to(torch.float32).to(dtype)
