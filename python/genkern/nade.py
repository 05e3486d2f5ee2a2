"""NADE (Larochelle & Murray, 2011) on fused kernels: the public functions.

    logp = genkern.nade_log_prob(x, weight, c, v, b)           # x (B, D) of 0/1 -> (B,) nats, differentiable
    x = genkern.nade_sample(weight, c, v, b, 16, seed=0)        # (16, D) of 0.0 / 1.0

Parameters: W (H, D), c (H), V (D, H), b (D); the model is in genkern.reference.nade (shared/math.md,
section 4). log p(x) costs O(D H) per example through the shared-weight recurrence, with the pre-activations
held per example, never the (B, H, D) tensor an eager implementation builds. genkern.models.NADE wraps these
as a module.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from . import backend as _backend
from .ops import nade as _ops
from .ops._backends import to_signed
from .random import check_offset, resolve_seed

FAMILY = "nade"
_DATA_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, *_checks.FLOAT_DTYPES)


def _params(weight, c, v, b) -> tuple[int, int]:
    """(D, H), after checking W (H, D), c (H), V (D, H), b (D): float tensors of one dtype and device."""
    _checks.float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (H, D), got {tuple(weight.shape)}")
    hidden, dims = weight.shape
    for name, t, shape in (("c", c, (hidden,)), ("v", v, (dims, hidden)), ("b", b, (dims,))):
        _checks.like(name, t, "weight", weight, shape=shape)
    return dims, hidden


def binary_data(name: str, x, dims: int, weight: Tensor) -> Tensor:
    """x (B, D) of 0/1 values in any real dtype (bool and integers too), as the parameters' dtype. Out of range
    values are a ValueError (on a GPU this check waits for the data). Under torch.compile the values are not
    checked: a data-dependent branch would break the graph."""
    _checks.tensor(name, x)
    if x.dtype not in _DATA_DTYPES:
        raise TypeError(f"{name} must be a bool, integer or float tensor of 0/1 values, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != dims:
        raise ValueError(f"{name} must have shape (B, {dims}), got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{name} is on {x.device} but weight is on {weight.device}")
    checkable = x.dtype != torch.bool and x.numel() and not torch.compiler.is_compiling()
    if checkable and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (binary data)")
    return x.to(weight.dtype)


def nade_log_prob(x: Tensor, weight: Tensor, c: Tensor, v: Tensor, b: Tensor, *, backend: str | None = None) -> Tensor:
    """log p(x) in nats for each row of x (B, D), whose entries must be 0 or 1 (any real dtype). Returns (B,)
    in the parameters' dtype, differentiable w.r.t. weight, c, v and b (x gets no gradient)."""
    dims, _ = _params(weight, c, v, b)
    x = binary_data("x", x, dims, weight)
    name = _backend.resolve(backend, weight.device, weight.dtype, FAMILY)
    return torch.ops.genkern.nade_log_prob(x, weight, c, v, b, name)


def nade_sample(weight: Tensor, c: Tensor, v: Tensor, b: Tensor, num_samples: int, *, seed: int | None = None,
                offset: int = 0, first: int = 0, backend: str | None = None) -> Tensor:
    """Samples first .. first + num_samples - 1 of the model as a (num_samples, D) tensor of 0.0 / 1.0 in the
    parameters' dtype. Dimension i of sample s is 1 iff u < p(x_i = 1 | x_<i), u the genkern uniform at stream
    element s * D + i of (seed, offset): a sample is the same whatever else is drawn with it. seed None draws
    one from torch's generator (pass one under torch.compile). Not differentiable."""
    dims, _ = _params(weight, c, v, b)
    num_samples = _checks.integer("num_samples", num_samples, low=0, high=_ops.INT64_MAX)
    first = _checks.integer("first", first, low=0, high=_ops.INT64_MAX)
    if (first + num_samples) * max(dims, 1) > _ops.INT64_MAX:
        raise ValueError("first + num_samples is too large: (first + num_samples) * D must stay below 2^63")
    seed, offset = resolve_seed(seed), check_offset(offset)
    name = _backend.resolve(backend, weight.device, weight.dtype, FAMILY)
    return torch.ops.genkern.nade_sample(weight, c, v, b, num_samples, to_signed(seed), to_signed(offset), first, name)
