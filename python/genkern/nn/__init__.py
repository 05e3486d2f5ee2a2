"""torch.nn modules on genkern's ops."""

from .gated_masked_conv import GatedMaskedConv2d
from .masked_conv import MaskedConv2d

__all__ = ["GatedMaskedConv2d", "MaskedConv2d"]
