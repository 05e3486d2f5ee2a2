"""Eager PyTorch references: the readable specification of every genkern op (shared/math.md).

Each kernel backend is tested against these. They favour clarity over speed, compute half types in
float32 and random numbers in float64 from the exact Philox bits.
"""
from . import causal_conv1d, diffusion, masked_conv, nade, pixelcnn_sampling, random, reparam

__all__ = ["causal_conv1d", "diffusion", "masked_conv", "nade", "pixelcnn_sampling", "random", "reparam"]
