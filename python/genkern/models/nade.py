"""NADE (Larochelle & Murray, 2011): a tractable autoregressive model of binary vectors or images.

    model = NADE(n_dims=64, hidden=128)
    loss = -model.log_prob(x).mean()            # x (B, 64), (B, 8, 8) or (B, 1, 8, 8) of 0/1
    model.bits_per_dim(x)                        # mean NLL in bits per dimension
    samples = model.sample(16, seed=0)           # (16, 64) of 0.0 / 1.0

log p(x) is exact, O(D H) per example through the shared-weight recurrence (genkern.nade_log_prob, fused
kernels forward and backward); images are flattened in raster order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import nade_log_prob, nade_sample


class NADE(nn.Module):
    """p(x) = prod_i p(x_i | x_<i) over x in {0, 1}^n_dims, with `hidden` shared hidden units.

    Parameters W (hidden, n_dims), c (hidden,), V (n_dims, hidden), b (n_dims,), named as in the paper.
    Initialisation: W and V uniform in +-1/sqrt(fan-in) (n_dims for W, hidden for V), as nn.Linear draws its
    weights; c and b zero, so the untrained model starts near p(x_i = 1) = 1/2."""

    def __init__(self, n_dims: int, hidden: int, *, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.n_dims = _checks.integer("n_dims", n_dims, low=1)
        self.hidden = _checks.integer("hidden", hidden, low=1)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.W = nn.Parameter(torch.empty(self.hidden, self.n_dims, **factory))
        self.c = nn.Parameter(torch.empty(self.hidden, **factory))
        self.V = nn.Parameter(torch.empty(self.n_dims, self.hidden, **factory))
        self.b = nn.Parameter(torch.empty(self.n_dims, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.W.uniform_(-1 / math.sqrt(self.n_dims), 1 / math.sqrt(self.n_dims))
            self.V.uniform_(-1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))
            self.c.zero_()
            self.b.zero_()

    def flatten(self, x: Tensor) -> Tensor:
        """x as (B, n_dims): (B, n_dims) as is; images (B, H, W) or (B, 1, H, W) with H W = n_dims in raster order."""
        _checks.tensor("x", x)
        if x.dim() == 4 and x.shape[1] != 1:
            raise ValueError(f"x images must have one channel, (B, 1, H, W); got {tuple(x.shape)}")
        if x.dim() not in (2, 3, 4) or math.prod(x.shape[1:]) != self.n_dims:
            raise ValueError(
                f"x must have shape (B, {self.n_dims}), (B, H, W) or (B, 1, H, W) with H * W = "
                f"{self.n_dims}; got {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], self.n_dims)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats, (B,). Entries of x must be 0 or 1 (any real dtype), else ValueError."""
        return nade_log_prob(self.flatten(x), self.W, self.c, self.V, self.b, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """The batch's mean negative log-likelihood in bits per dimension: -mean log p(x) / (n_dims ln 2)."""
        return -self.log_prob(x).mean() / (self.n_dims * math.log(2))

    @torch.no_grad()
    def sample(self, n: int, *, seed: int | None = None, offset: int = 0) -> Tensor:
        """n samples as a (n, n_dims) tensor of 0.0 / 1.0 in the parameters' dtype (reshape for images).
        Sample s of (seed, offset) is the same whatever n: dimension i draws from stream element s * n_dims + i.
        seed None draws one from torch's generator, so torch.manual_seed makes it reproducible."""
        n = _checks.int64("n", n, low=0)
        _checks.allocation("n", (n, self.n_dims), self.W.element_size(), self.W.device, "the samples")
        return nade_sample(self.W, self.c, self.V, self.b, n, seed=seed, offset=offset, backend=self.backend)

    def extra_repr(self) -> str:
        return f"n_dims={self.n_dims}, hidden={self.hidden}"
