"""The pixelcnn_sampling family as torch ops: `genkern::gumbel_argmax`, and the dispatch of the cached
sampler's program (a model-level routine, not a graph op: it takes a whole program of caches and nodes)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from ..reference import pixelcnn_sampling as ref
from ._backends import kernels, to_unsigned


@torch.library.custom_op("genkern::gumbel_argmax", mutates_args=())
def gumbel_argmax(logits: Tensor, base: Tensor, seed: int, offset: int, backend: str) -> Tensor:
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, levels >= 1), got {tuple(logits.shape)}")
    if base.dtype != torch.int64 or tuple(base.shape) != (logits.shape[0],) or base.device != logits.device:
        raise ValueError("base must be an int64 tensor of shape (N,) on logits' device")
    seed, offset = to_unsigned(seed), to_unsigned(offset)
    if backend == "reference":
        return ref.gumbel_argmax(logits, base, seed, offset)
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    kernels("pixelcnn_sampling", backend).gumbel_argmax(logits.contiguous(), base.contiguous(), out, seed, offset)
    return out


@gumbel_argmax.register_fake
def _(logits, base, seed, offset, backend):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


def sample(caches: list[Tensor], nodes: list[tuple], out: Tensor, logits: int, levels: int, scale: float,
           shift: float, seed: int, offset: int, first_sample: int, backend: str) -> None:
    """Run a cached-sampling program (csrc/pixelcnn_sampling.h) into `out`, on `backend`."""
    if backend == "reference":
        ref.sample(caches, nodes, out, logits, levels, scale, shift, seed, offset, first_sample)
        return
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"the cached sampler has no {backend} kernel")
    described = [tuple(_native.array(v) if isinstance(v, Tensor) else v for v in node) for node in nodes]
    args = ([_native.array(c) for c in caches], described, _native.array(out), logits, levels, scale, shift, seed,
            offset, first_sample)
    if out.is_cuda:
        with torch.cuda.device(out.device):
            _native._C.pixelcnn_sampling_sample(*args, stream=torch.cuda.current_stream(out.device).cuda_stream)
    else:
        _native._C.pixelcnn_sampling_sample(*args)
