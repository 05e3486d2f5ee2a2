"""A minimal PNG writer (8-bit greyscale), so the tests can save image grids without PIL or torchvision."""

import struct
import zlib

import torch

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: torch.Tensor) -> bytes:
    """PNG bytes of a (H, W) uint8 tensor (8-bit greyscale, no interlacing)."""
    if image.dtype != torch.uint8 or image.dim() != 2:
        raise ValueError(f"image must be a (H, W) uint8 tensor, got {image.dtype} of shape {tuple(image.shape)}")
    H, W = image.shape
    # Filter type 0 (none) before each row.
    rows = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), image.cpu()], dim=1)
    header = struct.pack(">IIBBBBB", W, H, 8, 0, 0, 0, 0)  # bit depth 8, colour type 0 (greyscale)
    return (
        SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def image_grid(images: torch.Tensor, nrow: int, low: float = -1.0, high: float = 1.0, pad: int = 1) -> torch.Tensor:
    """(N, 1, h, w) floats in [low, high] -> one (H, W) uint8 image, `nrow` images per row, `pad` black
    pixels between them."""
    N, _, h, w = images.shape
    ncol = -(-N // nrow)
    grid = torch.zeros(ncol * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    pixels = ((images[:, 0].float().cpu() - low) / (high - low)).clamp(0, 1).mul(255).round().to(torch.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = pixels[i]
    return grid


def save_png(path, image: torch.Tensor) -> None:
    with open(path, "wb") as f:
        f.write(encode_png(image))
