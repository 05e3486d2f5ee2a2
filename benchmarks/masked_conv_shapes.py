"""genkern's masked_conv2d against the dense path (F.conv2d on the masked weight, what a PyTorch user writes
and what the bench's eager baseline runs) and the reference backend, at the PixelCNN layer shapes genkern
ships and benchmarks, forward and forward + backward, on 1 and 2 threads.

    python benchmarks/masked_conv_shapes.py [--repeats 15] [--threads 1,2] [--only NAME] [--impls cpu,dense]

The implementations are interleaved repeat by repeat and the minimum is reported, so a machine shared with
other work still gives comparable numbers (the minimum is the run least disturbed)."""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch
import torch.nn.functional as F

import genkern
from genkern.autoregressive import _masked_conv_dense
from genkern.autoregressive import reference as ref

# (name, batch, C_in, C_out, k, mask, colour groups, side): the layers of the shipped 8 x 8 digit models
# (`genkern train` defaults: hidden 32, 5 layers, a 5 x 5 first layer, 17 levels) at the training batch
# (64), the test set (297) and one image; the bench's masked_conv2d cases (28 x 28, 64 channels, at 1M and
# 16M elements: batch 21 and 335); the layers of the sampling bench's PixelCNNs (28 x 28 grey, 64 channels,
# 256 levels; 32 x 32 RGB, 96 channels, 3 colour groups).
SHAPES = [
    *(
        (f"digits_{what}_b{b}", b, ci, co, k, m, 1, 8)
        for b in (1, 64, 297)
        for what, ci, co, k, m in (
            ("in", 1, 32, 5, "A"),
            ("hidden", 32, 32, 3, "B"),
            ("head", 32, 32, 1, "B"),
            ("out", 32, 17, 1, "B"),
        )
    ),
    *(
        (f"px28_{what}_b{b}", b, ci, co, k, m, 1, 28)
        for b in (1, 21, 64)
        for what, ci, co, k, m in (
            ("in", 1, 64, 7, "A"),
            ("hidden", 64, 64, 3, "B"),
            ("head", 64, 64, 1, "B"),
            ("out", 64, 256, 1, "B"),
        )
    ),
    ("px28_in_b335", 335, 1, 64, 7, "A", 1, 28),
    ("px28_hidden_b335", 335, 64, 64, 3, "B", 1, 28),
    *(
        (f"rgb32_{what}_b{b}", b, ci, co, k, m, 3, 32)
        for b in (1, 16)
        for what, ci, co, k, m in (
            ("in", 3, 96, 7, "A"),
            ("hidden", 96, 96, 3, "B"),
            ("head", 96, 96, 1, "B"),
            ("out", 96, 768, 1, "B"),
        )
    ),
]


def make(shape, dtype=torch.float32):
    _, b, ci, co, k, m, g, side = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, ci, side, side, generator=gen, dtype=dtype).requires_grad_(ci > 1)
    w = (torch.randn(co, ci, k, k, generator=gen, dtype=dtype) / math.sqrt(ci * k * k)).requires_grad_()
    bias = torch.randn(co, generator=gen, dtype=dtype).requires_grad_()
    gy = torch.randn(b, co, side, side, generator=gen, dtype=dtype)
    mask = ref.mask(k, m, ci, co, g, dtype=dtype)
    return x, w, bias, gy, mask


@contextlib.contextmanager
def forced(dense):
    """The cpu backend with its per-shape rule replaced: always dense (True), always the kernels (False)."""
    rule = _masked_conv_dense.use_dense
    _masked_conv_dense.use_dense = lambda op, shape, dtype: dense
    try:
        yield
    finally:
        _masked_conv_dense.use_dense = rule


def impl(name, shape):
    """cpu (as shipped), kernel / dense_op (the cpu backend forced to one path), dense (eager F.conv2d on the
    masked weight), reference (the reference backend); with --ops, one op of the three alone."""
    _, _, _, _, k, m, g, _ = shape

    def run(x, w, bias, gy, mask, backward):
        if name == "dense":
            y = F.conv2d(x, w * mask, bias, padding=k // 2)
        elif name in ("kernel", "dense_op"):
            with forced(name == "dense_op"):
                y = genkern.masked_conv2d(x, w, bias, mask_type=m, color_groups=g, backend="cpu")
                if backward:
                    torch.autograd.grad(y, [t for t in (x, w, bias) if t.requires_grad], gy)
            return
        else:
            y = genkern.masked_conv2d(x, w, bias, mask_type=m, color_groups=g, backend=name)
        if backward:
            torch.autograd.grad(y, [t for t in (x, w, bias) if t.requires_grad], gy)

    return run


def op_impl(name, shape, op):
    """One op (forward, grad_input, grad_weight) on the cpu backend forced to the kernels or the dense path."""
    _, _, _, _, k, m, g, _ = shape
    ops = torch.ops.genkern

    def run(x, w, bias, gy, mask, backward):
        x, w, bias = x.detach(), w.detach(), bias.detach()
        with forced(name == "dense_op"), genkern.set_backend("cpu"):
            if op == "forward":
                ops.masked_conv2d(x, w, bias, m, g, 1)
            elif op == "grad_input":
                ops.masked_conv2d_grad_input(gy, w, m, g, 1)
            else:
                ops.masked_conv2d_grad_weight(gy, x, k, m, g, 1)

    return run


def measure(shape, impls, threads, repeats, backward, op=None):
    torch.set_num_threads(threads)
    args = make(shape)
    fns = {n: (impl(n, shape) if op is None else op_impl(n, shape, op)) for n in impls}
    for fn in fns.values():  # warm up (thread pools, scratch buffers, oneDNN primitives)
        fn(*args, backward)
    # Repeats so that one sample is >= ~20 ms of work (timer noise), capped for the big shapes.
    t0 = time.perf_counter()
    fns[impls[0]](*args, backward)
    inner = max(1, min(200, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    best = {n: float("inf") for n in impls}
    for _ in range(repeats):
        for n, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn(*args, backward)
            best[n] = min(best[n], (time.perf_counter() - t) / inner)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--only", default="")
    p.add_argument("--impls", default="cpu,dense,reference")
    p.add_argument("--max-batch", type=int, default=10**9)
    p.add_argument("--ops", action="store_true", help="each op alone, kernel vs dense_op")
    a = p.parse_args()
    if a.ops:
        return per_op(a)
    impls = a.impls.split(",")
    print("shape,pass,threads," + ",".join(f"{n}_ms" for n in impls) + ",cpu/dense")
    for shape in SHAPES:
        if a.only and a.only not in shape[0]:
            continue
        if shape[1] > a.max_batch:
            continue
        for backward in (False, True):
            for threads in map(int, a.threads.split(",")):
                reps = a.repeats if shape[1] < 100 else max(3, a.repeats // 4)
                best = measure(shape, impls, threads, reps, backward)
                ratio = best["cpu"] / best["dense"] if "cpu" in best and "dense" in best else float("nan")
                times = ",".join(f"{best[n] * 1e3:.3f}" for n in impls)
                print(f"{shape[0]},{'fwd+bwd' if backward else 'fwd'},{threads},{times},{ratio:.2f}", flush=True)


def per_op(a):
    impls = ["kernel", "dense_op"]
    print("shape,op,threads,kernel_ms,dense_ms,kernel/dense")
    for shape in SHAPES:
        if (a.only and a.only not in shape[0]) or shape[1] > a.max_batch:
            continue
        for op in ("forward", "grad_input", "grad_weight"):
            if op == "grad_input" and shape[2] == 1:
                continue  # a first layer on data: no grad_x
            for threads in map(int, a.threads.split(",")):
                reps = a.repeats if shape[1] < 100 else max(3, a.repeats // 4)
                best = measure(shape, impls, threads, reps, False, op)
                kernel, dense = best["kernel"] * 1e3, best["dense_op"] * 1e3
                print(f"{shape[0]},{op},{threads},{kernel:.3f},{dense:.3f},{kernel / dense:.2f}", flush=True)


if __name__ == "__main__":
    main()
