"""genkern's kernels by family: CUDA sources (compiled into genkern._C) and Triton modules (this package)."""
