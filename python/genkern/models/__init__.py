"""Small reference models that exercise genkern's ops end to end (denoisers for the diffusion family, NADE)."""
from .nade import NADE
from .unet import UNet

__all__ = ["NADE", "UNet"]
