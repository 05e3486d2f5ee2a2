"""Models on genkern's ops: denoisers for the diffusion family, autoregressive image models."""

from .gated_pixelcnn import GatedPixelCNN
from .nade import NADE
from .pixelcnn import PixelCNN
from .unet import UNet

__all__ = ["GatedPixelCNN", "NADE", "PixelCNN", "UNet"]
