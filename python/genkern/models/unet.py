"""A small U-Net denoiser for diffusion models on 8x8 to 32x32 images (Ho et al. 2020; Dhariwal & Nichol 2021).

    model = UNet(in_channels=1, base_channels=32, channel_mults=(1, 2), num_classes=10)
    eps_hat = model(x_t, t, class_labels=y)          # x_t (B, 1, H, W), t (B,), y (B,) in [0, 10]

Each level holds `num_res_blocks` residual blocks at base_channels * mult channels, then halves the spatial
size (a stride-2 conv); the decoder mirrors it, concatenating the encoder's activations (skip connections),
and upsamples by nearest neighbour + conv. The timestep enters through a sinusoidal embedding and an MLP,
added to every residual block; a class label (optional) adds a learned embedding to it. Label
`num_classes` is the "null" class: train with it in place of some labels and classifier-free guidance can
ask the same model for the unconditional prediction.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_PERIOD = 10000


def timestep_embedding(t: Tensor, dim: int, max_period: float = MAX_PERIOD) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): sin(t f_k) then cos(t f_k), f_k = max_period^(-k / (dim // 2)),
    k = 0 .. dim // 2 - 1, zero-padded to an odd dim. t may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, + time embedding, GroupNorm, SiLU, dropout, conv3x3; a 1x1 skip when the
    channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_proj(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Single-head self-attention over the spatial positions, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        # Starts as the identity, so adding attention does not disturb the signal path at initialisation.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """Blocks applied in order, each given the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            x = block(x, emb)
        return x


def _positive_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{name} must be positive, got {x}")
    return int(x)


def _int_tuple(name: str, xs) -> tuple[int, ...]:
    if isinstance(xs, (str, bytes)) or not hasattr(xs, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(xs).__name__}")
    return tuple(_positive_int(f"{name} entry", x) for x in xs)


class UNet(nn.Module):
    """A configurable U-Net denoiser: forward(x (B, in_channels, H, W), t, class_labels=None) -> (B, C_out, H, W).

    Args:
        in_channels: channels of the images.
        out_channels: channels of the prediction (eps, v or x0); defaults to in_channels. With
            `learned_variance` the network outputs twice as many: the prediction, then the variance
            interpolation values that ddpm_step's variance_type="learned_range" reads.
        base_channels: channels of the first level, and the size of the sinusoidal time embedding (the MLP
            after it has 4 * base_channels).
        channel_mults: one entry per level, its channels = base_channels * mult. H and W must be divisible
            by 2 ** (len(channel_mults) - 1).
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more, to take the
            downsampling's skip connection).
        attention_resolutions: spatial sizes at which to add self-attention after each residual block; needs
            `image_size` to know which level has which size.
        image_size: the input's height and width. Optional without attention; when given, forward checks it.
        num_classes: class conditioning with labels 0 .. num_classes - 1, plus the null label num_classes
            (the unconditional model for classifier-free guidance). None: unconditional.
        learned_variance: output 2 * out_channels channels (see out_channels).
        dropout: dropout probability inside the residual blocks.
        groups: GroupNorm groups; must divide base_channels * mult for every mult.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults=(1, 2),
        num_res_blocks: int = 1,
        attention_resolutions=(),
        num_classes: int | None = None,
        learned_variance: bool = False,
        dropout: float = 0.0,
        groups: int = 8,
        image_size: int | None = None,
    ):
        super().__init__()
        in_channels = _positive_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else _positive_int("out_channels", out_channels)
        base_channels = _positive_int("base_channels", base_channels)
        channel_mults = _int_tuple("channel_mults", channel_mults)
        if not channel_mults:
            raise ValueError("channel_mults must have at least one level")
        num_res_blocks = _positive_int("num_res_blocks", num_res_blocks)
        attention_resolutions = set(_int_tuple("attention_resolutions", attention_resolutions))
        if num_classes is not None:
            num_classes = _positive_int("num_classes", num_classes)
        if not isinstance(learned_variance, bool):
            raise TypeError(f"learned_variance must be a bool, got {type(learned_variance).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"dropout must be a real number, got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        groups = _positive_int("groups", groups)
        for mult in channel_mults:
            if base_channels * mult % groups:
                raise ValueError(
                    f"groups={groups} must divide the channels of every level, but base_channels * "
                    f"mult = {base_channels} * {mult} = {base_channels * mult} is not a multiple"
                )
        levels = len(channel_mults)
        if image_size is not None:
            image_size = _positive_int("image_size", image_size)
            if image_size % 2 ** (levels - 1):
                raise ValueError(
                    f"image_size={image_size} must be divisible by 2 ** (len(channel_mults) - 1) = {2 ** (levels - 1)}"
                )
        if attention_resolutions:
            if image_size is None:
                raise ValueError("attention_resolutions needs image_size, to know which level has which size")
            sizes = {image_size >> level for level in range(levels)}
            if not attention_resolutions <= sizes:
                raise ValueError(
                    f"attention_resolutions {sorted(attention_resolutions)} must be spatial sizes of "
                    f"the levels, {sorted(sizes, reverse=True)} for image_size={image_size}"
                )

        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.out_channels = out_channels * (2 if learned_variance else 1)
        self.learned_variance = learned_variance
        self.base_channels, self.num_levels = base_channels, levels

        emb_channels = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.class_emb = None if num_classes is None else nn.Embedding(num_classes + 1, emb_channels)

        def stage(ch_in: int, ch_out: int, level: int) -> Stage:
            blocks = [ResBlock(ch_in, ch_out, emb_channels, dropout, groups)]
            if image_size is not None and image_size >> level in attention_resolutions:
                blocks.append(SelfAttention(ch_out, groups))
            return Stage(blocks)

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, base_channels * mult, level))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < levels - 1:
                self.down.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle = stage(ch, ch, levels - 1)
        self.middle.append(ResBlock(ch, ch, emb_channels, dropout, groups))

        # Every encoder activation in skip_channels feeds one decoder block, last in first out.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                block = stage(ch + skip_channels.pop(), base_channels * mult, level)
                ch = base_channels * mult
                if level > 0 and i == num_res_blocks:
                    block.append(Upsample(ch))
                self.up.append(block)

        self.output = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1))
        # The untrained model predicts 0 (the mean of eps, v and, for centred data, x0) instead of noise.
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    def forward(self, x: Tensor, t, class_labels: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W); t a number or a tensor of shape () or (B,), integer or float; class_labels
        an integer tensor (B,) in [0, num_classes], None meaning the null class (unconditional)."""
        self._check_input(x)
        B = x.shape[0]
        emb = self.time_mlp(timestep_embedding(self._timesteps(t, B, x.device), self.base_channels))
        if self.class_emb is not None:
            emb = emb + self.class_emb(self._labels(class_labels, B, x.device))
        elif class_labels is not None:
            raise ValueError("class_labels given, but the model is unconditional (num_classes=None)")

        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.output(h)

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[2:]
        factor = 2 ** (self.num_levels - 1)
        if H % factor or W % factor:
            raise ValueError(
                f"x's height and width must be divisible by 2 ** (len(channel_mults) - 1) = {factor}, got {H}x{W}"
            )
        if self.image_size is not None and (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"x must be {self.image_size}x{self.image_size} (image_size), got {H}x{W}")

    @staticmethod
    def _timesteps(t, batch: int, device: torch.device) -> Tensor:
        if isinstance(t, Tensor):
            if t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"t must be an integer or float tensor, got dtype {t.dtype}")
            if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
                raise ValueError(f"t must have shape () or ({batch},), got {tuple(t.shape)}")
            return t.to(device).expand(batch)
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"t must be a number or a tensor, got {type(t).__name__}")
        return torch.full((batch,), float(t), device=device)

    def _labels(self, class_labels, batch: int, device: torch.device) -> Tensor:
        if class_labels is None:
            return torch.full((batch,), self.num_classes, dtype=torch.int64, device=device)
        if not isinstance(class_labels, Tensor):
            raise TypeError(f"class_labels must be a torch.Tensor, got {type(class_labels).__name__}")
        if class_labels.dtype.is_floating_point or class_labels.dtype.is_complex or class_labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be an integer tensor, got dtype {class_labels.dtype}")
        if tuple(class_labels.shape) != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
        # Reading a GPU tensor's values would synchronise the host (and break CUDA graph capture).
        if class_labels.device.type == "cpu" and class_labels.numel():
            lo, hi = int(class_labels.min()), int(class_labels.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(
                    f"class_labels must be in [0, {self.num_classes}] (num_classes is the null "
                    f"class), got values in [{lo}, {hi}]"
                )
        return class_labels.to(device)
