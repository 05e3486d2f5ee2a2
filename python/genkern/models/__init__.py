"""Small reference models that exercise genkern's ops end to end (denoisers for the diffusion family)."""
from .unet import UNet

__all__ = ["UNet"]
