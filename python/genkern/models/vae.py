"""VAE (Kingma & Welling, 2014) over images of integer levels, on genkern's reparam ops.

    model = VAE(in_channels=1, levels=2, image_size=8, latent_dim=16)   # Bernoulli decoder for 0/1 images
    loss = model.loss(x, seed=step)              # negative ELBO in bits/dim (reparameterize_kl: z and KL in one pass)
    model.log_prob(x, k=64, seed=0)              # the IWAE-k estimate of log p(x) in nats (k = 1: the ELBO)
    model.bits_per_dim(x, k=64, seed=0)          # -log_prob / (D ln 2)
    images = model.sample(16, seed=0)            # (16, 1, 8, 8) int64 levels; sample i depends on (seed, i) only

Decoders: "bernoulli" (levels = 2) or "categorical" (a softmax over the levels of every dimension).
Architectures: "mlp" (two hidden layers of `hidden` units) or "conv" (two stride-2 convolutions of `hidden`
and 2 * `hidden` channels and their transposes; H and W divisible by 4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..autoregressive import gumbel_argmax
from ..reparam import iwae_bound, reparameterize, reparameterize_kl
from . import _latent
from ._autoregressive import _image_size

ARCHS = ("mlp", "conv")
DECODERS = ("bernoulli", "categorical")
INT64_MAX = (1 << 63) - 1


class VAE(nn.Module):
    """q(z | x) = N(mu(x), diag exp(logvar(x))), p(z) = N(0, I), p(x | z) Bernoulli or categorical per dimension.

    x: (B, in_channels, H, W) of integer levels in [0, levels), any real dtype."""

    def __init__(
        self,
        in_channels: int = 1,
        levels: int = 2,
        image_size=8,
        latent_dim: int = 16,
        hidden: int = 256,
        *,
        arch: str = "mlp",
        decoder: str | None = None,
    ):
        super().__init__()
        self.in_channels = _checks.integer("in_channels", in_channels, low=1)
        self.levels = _checks.integer("levels", levels, low=2)
        self.image_size = _image_size(image_size)
        self.latent_dim = _checks.integer("latent_dim", latent_dim, low=1)
        self.hidden = _checks.integer("hidden", hidden, low=1)
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        decoder = ("bernoulli" if self.levels == 2 else "categorical") if decoder is None else decoder
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if decoder == "bernoulli" and self.levels != 2:
            raise ValueError(f"the bernoulli decoder models levels=2 (binarised images), got levels={self.levels}")
        self.arch, self.decoder = arch, decoder
        c, (h, w), z, hid = self.in_channels, self.image_size, self.latent_dim, self.hidden
        self.outputs = 1 if decoder == "bernoulli" else self.levels  # decoder outputs per dimension
        if arch == "mlp":
            d = self.dims
            self.encoder = nn.Sequential(
                nn.Flatten(), nn.Linear(d, hid), nn.ReLU(), nn.Linear(hid, hid), nn.ReLU(), nn.Linear(hid, 2 * z)
            )
            self.decoder_net = nn.Sequential(
                nn.Linear(z, hid), nn.ReLU(), nn.Linear(hid, hid), nn.ReLU(), nn.Linear(hid, d * self.outputs)
            )
        else:
            if h % 4 or w % 4:
                raise ValueError(f"arch='conv' needs H and W divisible by 4, got image_size={self.image_size}")
            flat = 2 * hid * (h // 4) * (w // 4)
            self.encoder = nn.Sequential(
                nn.Conv2d(c, hid, 4, 2, 1),
                nn.ReLU(),
                nn.Conv2d(hid, 2 * hid, 4, 2, 1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(flat, 2 * z),
            )
            self.decoder_net = nn.Sequential(
                nn.Linear(z, flat),
                nn.ReLU(),
                nn.Unflatten(1, (2 * hid, h // 4, w // 4)),
                nn.ConvTranspose2d(2 * hid, hid, 4, 2, 1),
                nn.ReLU(),
                nn.ConvTranspose2d(hid, c * self.outputs, 4, 2, 1),
            )

    @property
    def dims(self) -> int:
        return self.in_channels * self.image_size[0] * self.image_size[1]

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def check_levels(self, x: Tensor) -> Tensor:
        x = _checks.tensor("x", x)
        shape = (self.in_channels, *self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"x must have shape (B, {shape[0]}, {shape[1]}, {shape[2]}), got {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"x must hold integer levels in a real numeric dtype, got {x.dtype}")
        if x.numel():
            bad = (x < 0) | (x > self.levels - 1)
            if x.is_floating_point():
                bad = bad | (x != torch.floor(x)) | torch.isnan(x)
            if bool(bad.any()):
                raise ValueError(f"x must hold integer levels in [0, {self.levels}); found values outside")
        return x

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | x), each (B, latent_dim)."""
        x = self.check_levels(x)
        h = self.encoder(x.to(self._dtype()) * (2.0 / (self.levels - 1)) - 1.0)
        mu, logvar = h.chunk(2, dim=1)
        return mu.contiguous(), logvar.contiguous()

    def decode(self, z: Tensor) -> Tensor:
        """Decoder logits for z (B, latent_dim): (B, C, H, W) for bernoulli, (B, levels, C, H, W) categorical."""
        out = self.decoder_net(z)
        c, (h, w) = self.in_channels, self.image_size
        if self.decoder == "bernoulli":
            return out.reshape(-1, c, h, w)
        return out.reshape(-1, c, self.levels, h, w).transpose(1, 2)

    def log_px_z(self, logits: Tensor, x: Tensor) -> Tensor:
        """log p(x | z) in nats per example, (B,), from decode(z)'s logits."""
        if self.decoder == "bernoulli":
            ll = -F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none")
        else:
            ll = -F.cross_entropy(logits, x.long(), reduction="none")
        return ll.flatten(1).sum(1)

    def elbo(self, x: Tensor, *, seed=None, offset: int = 0) -> Tensor:
        """The single-sample ELBO estimate per example in nats, (B,): log p(x | z) - KL(q(z | x) || p(z)), with
        z and the analytic KL from genkern.reparameterize_kl (one pass; the backward regenerates eps)."""
        mu, logvar = self.encode(x)
        z, kl = reparameterize_kl(mu, logvar, seed=seed, offset=offset)
        return self.log_px_z(self.decode(z), x) - kl

    def loss(self, x: Tensor, *, seed=None, offset: int = 0) -> Tensor:
        """The training loss: the batch's mean negative ELBO in bits per dimension (a scalar)."""
        return -self.elbo(x, seed=seed, offset=offset).mean() / (self.dims * math.log(2.0))

    def forward(self, x: Tensor, *, seed=None) -> Tensor:
        return self.loss(x, seed=seed)

    def log_prob(self, x: Tensor, k: int = 1, *, seed=None, offset: int = 0) -> Tensor:
        """The IWAE-k estimate of log p(x) in nats, (B,): logsumexp_k log [p(x|z_k) p(z_k) / q(z_k|x)] - log k
        with z_k ~ q(z | x) (genkern.reparameterize, num_samples=k) and genkern.iwae_bound. k = 1 is the
        ELBO (its single-sample estimate); the bound tightens as k grows."""
        k = _checks.integer("k", k, low=1)
        mu, logvar = self.encode(x)
        zk = reparameterize(mu, logvar, seed=seed, offset=offset, num_samples=k)  # (k, B, L)
        logits = self.decode(zk.flatten(0, 1))
        xk = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        log_px_z = self.log_px_z(logits, xk).view(k, x.shape[0])
        return iwae_bound(log_px_z, zk, mu, logvar)

    def bits_per_dim(self, x: Tensor, k: int = 1, *, seed=None, offset: int = 0) -> Tensor:
        """-log_prob(x, k) / (D ln 2), (B,): an upper bound on the negative log-likelihood in bits/dim."""
        return -self.log_prob(x, k, seed=seed, offset=offset) / (self.dims * math.log(2.0))

    @torch.no_grad()
    def sample(self, n: int, *, seed=None, first_sample: int = 0) -> Tensor:
        """n images (n, C, H, W) of int64 levels: z ~ N(0, I) from the genkern stream, x ~ p(x | z) by
        genkern.gumbel_argmax. Sample s is sample first_sample + s of the seed: its z, its draws and the
        decoder batch it is computed in depend on that index alone (see genkern.models._latent), so it is
        the same image for any n, batch split or device count. seed None draws one from torch's generator."""
        n, first_sample = _latent.check_window(n, first_sample)
        seed = _latent.seed_of(seed)
        d, levels = self.dims, self.levels
        if (first_sample + n) * d * levels > INT64_MAX:
            raise ValueError("first_sample + n is too large: (first_sample + n) * dims * levels must stay below 2^63")
        device = next(self.parameters()).device
        _checks.allocation("n", (n, d), 8, device, "the samples")

        def group(first: int, count: int) -> Tensor:
            z = _latent.normals(count, self.latent_dim, seed=seed, first_sample=first, device=device)
            logits = self.decode(z.to(self._dtype())).float()
            if self.decoder == "bernoulli":
                logits = torch.stack((torch.zeros_like(logits), logits), dim=-1).reshape(-1, 2)
            else:
                logits = logits.movedim(1, -1).reshape(-1, levels)
            samples = first + torch.arange(count, dtype=torch.int64, device=device)
            base = (samples[:, None] * d + torch.arange(d, device=device)) * levels
            x = gumbel_argmax(logits.contiguous(), base.reshape(-1), seed=seed, offset=0)
            return x.view(count, self.in_channels, *self.image_size)

        return _latent.by_granule(n, first_sample, group)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, levels={self.levels}, image_size={self.image_size}, "
            f"latent_dim={self.latent_dim}, hidden={self.hidden}, arch={self.arch!r}, decoder={self.decoder!r}"
        )
