"""Triton kernels of genkern: the genkern random stream and the reparam family (shared/math.md)."""
