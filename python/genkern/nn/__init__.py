"""torch.nn modules on genkern's ops."""
from .masked_conv import MaskedConv2d

__all__ = ["MaskedConv2d"]
