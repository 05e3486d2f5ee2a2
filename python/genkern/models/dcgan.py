"""DCGAN (Radford et al. 2016): a transposed-convolution generator and a strided-convolution discriminator,
trained with the non-saturating generator loss of Goodfellow et al. (2014).

    gan = DCGAN(in_channels=1, image_size=8, levels=17)
    d_loss = gan.discriminator_loss(real, z)     # real: images scaled to [-1, 1]; z: (B, latent_dim)
    g_loss = gan.generator_loss(z)               # -log D(G(z)), not log(1 - D(G(z)))
    images = gan.sample(16, seed=0)              # (16, 1, 8, 8) int64 levels; sample i depends on (seed, i) only

The one model without a likelihood. The image side is halved by each discriminator layer (and doubled by
each generator layer) while it is even and above 4: 8 -> 4, 16 -> 8 -> 4, 28 -> 14 -> 7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from . import _latent
from ._autoregressive import _image_size


def _halvings(size: int) -> int:
    n = 0
    while size % 2 == 0 and size > 4:
        size //= 2
        n += 1
    return n


class DCGAN(nn.Module):
    """generator(z (B, latent_dim)) -> images (B, C, H, W) in [-1, 1]; discriminator(x) -> logits (B,).

    Images of integer levels in [0, levels) map linearly onto [-1, 1] (scaled / to_levels)."""

    def __init__(
        self, in_channels: int = 1, image_size=8, latent_dim: int = 32, channels: int = 64, *, levels: int = 256
    ):
        super().__init__()
        self.in_channels = _checks.integer("in_channels", in_channels, low=1)
        self.image_size = _image_size(image_size)
        self.latent_dim = _checks.integer("latent_dim", latent_dim, low=1)
        self.channels = _checks.integer("channels", channels, low=1)
        self.levels = _checks.integer("levels", levels, low=2)
        h, w = self.image_size
        ups = min(_halvings(h), _halvings(w))
        if h >> ups << ups != h or w >> ups << ups != w:
            raise ValueError(f"image_size={self.image_size} must be a multiple of 2^{ups} on both sides")
        if ups == 0:
            raise ValueError(f"image_size must be even and above 4 on both sides, got {self.image_size}")
        self.base = (h >> ups, w >> ups)
        top = self.channels * 2 ** (ups - 1)
        gen: list[nn.Module] = [
            nn.Linear(self.latent_dim, top * self.base[0] * self.base[1]),
            nn.Unflatten(1, (top, *self.base)),
        ]
        ch = top
        for i in range(ups):
            out = self.in_channels if i == ups - 1 else ch // 2
            gen += [nn.ReLU(), nn.ConvTranspose2d(ch, out, 4, 2, 1)]
            ch = out
        gen.append(nn.Tanh())
        self.generator = nn.Sequential(*gen)
        disc: list[nn.Module] = []
        ch_in, ch = self.in_channels, self.channels
        for _ in range(ups):
            disc += [nn.Conv2d(ch_in, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
            ch_in, ch = ch, ch * 2
        disc += [nn.Flatten(), nn.Linear(ch_in * self.base[0] * self.base[1], 1)]
        self.discriminator = nn.Sequential(*disc)

    def scaled(self, x: Tensor) -> Tensor:
        """Integer levels -> [-1, 1] in the parameters' dtype."""
        dtype = next(self.parameters()).dtype
        return x.to(dtype) * (2.0 / (self.levels - 1)) - 1.0

    def to_levels(self, images: Tensor) -> Tensor:
        """[-1, 1] -> the nearest integer level, int64."""
        return torch.round((images.float() + 1) * (0.5 * (self.levels - 1))).clamp_(0, self.levels - 1).long()

    def generate(self, z: Tensor) -> Tensor:
        return self.generator(_checks.float_tensor("z", z))

    def discriminate(self, x: Tensor) -> Tensor:
        """Logits of 'real' for images in [-1, 1], (B,)."""
        return self.discriminator(x).squeeze(1)

    def forward(self, z: Tensor) -> Tensor:
        return self.generate(z)

    def discriminator_loss(self, real: Tensor, z: Tensor) -> Tensor:
        """-log D(x) - log(1 - D(G(z))), batch means; G(z) is detached (the generator is not trained by it)."""
        fake = self.generate(z).detach()
        return F.softplus(-self.discriminate(real)).mean() + F.softplus(self.discriminate(fake)).mean()

    def generator_loss(self, z: Tensor) -> Tensor:
        """The non-saturating generator loss -log D(G(z)) (batch mean)."""
        return F.softplus(-self.discriminate(self.generate(z))).mean()

    @torch.no_grad()
    def sample(self, n: int, *, seed=None, first_sample: int = 0) -> Tensor:
        """n images (n, C, H, W) of int64 levels, z from the genkern stream keyed by the sample index, the
        generator run on aligned index groups (genkern.models._latent): sample s is sample first_sample + s of
        the seed whatever n, the batch split or the device count. seed None draws one from torch's generator."""
        n, first_sample = _latent.check_window(n, first_sample)
        seed = _latent.seed_of(seed)
        param = next(self.parameters())

        def group(first: int, count: int) -> Tensor:
            z = _latent.normals(count, self.latent_dim, seed=seed, first_sample=first, device=param.device)
            return self.to_levels(self.generate(z.to(param.dtype)))

        return _latent.by_granule(n, first_sample, group)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, image_size={self.image_size}, latent_dim={self.latent_dim}, "
            f"channels={self.channels}, levels={self.levels}"
        )
