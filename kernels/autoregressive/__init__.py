"""genkern's autoregressive kernels (CUDA sources are compiled into genkern._C; the Triton modules import from here)."""
