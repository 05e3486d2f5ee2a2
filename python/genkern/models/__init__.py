"""Models on genkern's ops: denoisers for the diffusion family, autoregressive image models, a VAE and a GAN."""

from .dcgan import DCGAN
from .gated_pixelcnn import GatedPixelCNN
from .nade import NADE
from .pixelcnn import PixelCNN
from .unet import UNet
from .vae import VAE

__all__ = ["DCGAN", "GatedPixelCNN", "NADE", "PixelCNN", "UNet", "VAE"]
