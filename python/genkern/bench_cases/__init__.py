"""The ops that `genkern bench` and benchmarks/ measure: one module per family, each exporting CASES.

A new family adds a module here and one line below; the engine (genkern.bench) does not change.
"""
from __future__ import annotations

from ..bench import BenchCase
from . import causal_conv1d, diffusion, masked_conv, nade, pixelcnn_sampling, reparam

CASES: tuple[BenchCase, ...] = (*reparam.CASES, *diffusion.CASES, *causal_conv1d.CASES, *masked_conv.CASES,
                                *pixelcnn_sampling.CASES, *nade.CASES)

_names = [c.name for c in CASES]
if len(set(_names)) != len(_names):  # --ops selects by name, so a repeated name would be ambiguous
    raise RuntimeError(f"benchmark case names must be unique: {sorted(n for n in _names if _names.count(n) > 1)}")

__all__ = ["CASES", "BenchCase"]
