"""`genkern train`: train a model on image data and write a checkpoint (genkern._checkpoints).

Data: "digits" (scikit-learn's bundled 8x8 digits at their 17 levels 0..16), "digits-binary" (the same,
> 8 -> 1), or a `.npz` of integer images (key `images`, else its first array; (N, H, W), (N, C, H, W) or
(N, H, W, C) with C in 1 or 3; levels from the key `levels`, else 256 for uint8, else max + 1). The last
sixth is held out (the digits: the last 297, as the model tests use) and the test metric is reported:
bits/dim for the likelihood models (the IWAE-64 bound for the VAE), and for the GAN (and the diffusion
UNet) the stated proxy `pixel_fd`, the Frechet distance between the pixel means and covariances of
1000 samples and of the test set, beside the same distance between the training and the test set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _checkpoints

MODEL_DATA = {
    "pixelcnn": "digits",
    "gated_pixelcnn": "digits",
    "nade": "digits-binary",
    "vae": "digits-binary",
    "dcgan": "digits",
    "unet": "digits",
}
DEFAULT_STEPS = {"pixelcnn": 400, "gated_pixelcnn": 400, "nade": 1500, "vae": 3000, "dcgan": 3000, "unet": 2000}
DEFAULT_LR = {"pixelcnn": 3e-3, "gated_pixelcnn": 3e-3, "nade": 5e-3, "vae": 2e-3, "dcgan": 2e-4, "unet": 2e-3}
IWAE_K = 64
DIGITS_TEST = 297


class TrainError(ValueError):
    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


@dataclass
class Data:
    name: str
    train: Tensor  # (N, C, H, W) int64 levels
    test: Tensor
    levels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train": int(self.train.shape[0]),
            "test": int(self.test.shape[0]),
            "levels": self.levels,
        }


def load_data(spec: str) -> Data:
    if spec in ("digits", "digits-binary"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise TrainError("--data", "the digits need scikit-learn (pip install scikit-learn)") from None
        images = torch.tensor(load_digits().images, dtype=torch.int64).unsqueeze(1)  # 0..16
        levels = 17
        if spec == "digits-binary":
            images, levels = (images > 8).long(), 2
        return Data(spec, images[:-DIGITS_TEST], images[-DIGITS_TEST:], levels)
    path = Path(spec)
    if path.suffix != ".npz":
        raise TrainError("--data", f"digits, digits-binary or a .npz file, got {spec!r}")
    if not path.is_file():
        raise TrainError("--data", f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            key = "images" if "images" in z.files else z.files[0]
            images = z[key]
            given = int(z["levels"]) if "levels" in z.files else None
    except Exception as exc:
        raise TrainError("--data", f"{path}: not a readable .npz ({str(exc).splitlines()[0]})") from None
    if images.dtype.kind not in "ui" and images.dtype != np.bool_:
        raise TrainError("--data", f"{path}: images must be integer levels, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[0] < 2:
        raise TrainError("--data", f"{path}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), N >= 2")
    x = torch.from_numpy(np.ascontiguousarray(images)).long()
    if int(x.min()) < 0:
        raise TrainError("--data", f"{path}: levels must be non-negative")
    levels = given or (256 if images.dtype == np.uint8 else max(2, int(x.max()) + 1))
    if int(x.max()) >= levels:
        raise TrainError("--data", f"{path}: a level {int(x.max())} is not below levels={levels}")
    n_test = max(1, round(x.shape[0] / 6))
    return Data(str(path), x[:-n_test], x[-n_test:], levels)


def build(model_name: str, data: Data) -> tuple[torch.nn.Module, dict]:
    from . import models

    c, h, w = data.shape
    if model_name in ("pixelcnn", "gated_pixelcnn"):
        kwargs = {"in_channels": c, "levels": data.levels, "image_size": [h, w], "hidden_channels": 32 * c}
        kwargs.update(n_layers=5, kernel_size=5)
        cls = models.PixelCNN if model_name == "pixelcnn" else models.GatedPixelCNN
        return cls(**kwargs), kwargs
    if model_name == "nade":
        if data.levels != 2 or c != 1:
            raise TrainError("--data", "nade models binary one-channel images; use --data digits-binary")
        kwargs = {"n_dims": h * w, "hidden": 128}
        return models.NADE(**kwargs), kwargs
    if model_name == "vae":
        kwargs = {"in_channels": c, "levels": data.levels, "image_size": [h, w], "latent_dim": 16, "hidden": 256}
        return models.VAE(**kwargs), kwargs
    if model_name == "dcgan":
        kwargs = {"in_channels": c, "image_size": [h, w], "latent_dim": 32, "channels": 64, "levels": data.levels}
        return models.DCGAN(**kwargs), kwargs
    if model_name == "unet":
        if h != w:
            raise TrainError("--data", "the unet needs square images")
        kwargs = {"in_channels": c, "base_channels": 32, "channel_mults": [1, 2], "image_size": h}
        return models.UNet(**kwargs), kwargs
    raise TrainError("model", f"unknown model {model_name!r}")


def independent_pixel_bits(train: Tensor, test: Tensor, levels: int) -> float:
    """The baseline: per-dimension categorical frequencies (add-one smoothing) fitted on train, bits/dim on test."""
    counts = torch.nn.functional.one_hot(train, levels).sum(0).double() + 1
    logp = (counts / counts.sum(-1, keepdim=True)).log()
    nll = -logp.expand(test.shape[0], *logp.shape).gather(-1, test.unsqueeze(-1)).squeeze(-1)
    return nll.mean().item() / math.log(2)


def pixel_fd(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to the flattened pixels (in [0, 1]) of a and b."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(ca)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    inner = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * inner)


def _unit(levels_x: Tensor, levels: int) -> Tensor:
    return levels_x.double() / (levels - 1)


def train(
    model_name: str,
    *,
    data: str | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
    out=None,
    device=None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train `model_name` and write its checkpoint to `out`; returns the checkpoint's config (with metrics)."""
    from tqdm import tqdm

    from .diffusion import NoiseSchedule, training_loss

    data_spec = data or MODEL_DATA[model_name]
    ds = load_data(data_spec)
    steps = steps or DEFAULT_STEPS[model_name]
    lr = lr or DEFAULT_LR[model_name]
    device = torch.device(device or "cpu")
    torch.manual_seed(seed)
    model, kwargs = build(model_name, ds)
    model.to(device)
    train_x, test_x = ds.train.to(device), ds.test.to(device)
    g = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule("cosine") if model_name == "unet" else None

    def batch() -> Tensor:
        return train_x[torch.randint(0, train_x.shape[0], (batch_size,), generator=g).to(device)]

    def flat(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).float() if model_name == "nade" else x

    if model_name == "dcgan":
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"training {model_name}", unit="step", disable=not progress, dynamic_ncols=True)
    loss_value = float("nan")
    model.train()
    for step in bar:
        x = batch()
        if model_name == "dcgan":
            z = torch.randn(batch_size, model.latent_dim, generator=g).to(device)
            d_loss = model.discriminator_loss(model.scaled(x), z)
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            g_loss = model.generator_loss(z)
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
            loss_value = g_loss.item()
            if step % 10 == 0:
                bar.set_postfix(g_loss=f"{loss_value:.3f}", d_loss=f"{d_loss.item():.3f}")
            continue
        if model_name == "vae":
            loss = model.loss(x, seed=seed * 1_000_003 + step)
        elif model_name == "unet":
            x0 = x.float() * (2.0 / (ds.levels - 1)) - 1.0
            loss = training_loss(model, x0, schedule, seed=seed * 1_000_003 + step)
        else:
            loss = model.bits_per_dim(flat(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}")
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()

    metrics = {"steps": steps, "train_seconds": round(seconds, 2), "final_loss": loss_value}
    sampling = {}
    with torch.no_grad():
        if model_name in ("pixelcnn", "gated_pixelcnn", "nade"):
            metrics["test_bits_per_dim"] = float(model.bits_per_dim(flat(test_x)).mean())
        elif model_name == "vae":
            metrics["test_bits_per_dim"] = float(model.bits_per_dim(test_x, IWAE_K, seed=0).mean())
            metrics["test_bits_per_dim_estimate"] = f"IWAE-{IWAE_K} bound"
            metrics["test_elbo_bits_per_dim"] = float(model.bits_per_dim(test_x, 1, seed=0).mean())
        if model_name in ("pixelcnn", "gated_pixelcnn", "nade", "vae"):
            metrics["baseline_independent_pixels_bits_per_dim"] = independent_pixel_bits(ds.train, ds.test, ds.levels)
        if model_name == "unet":
            sampling = {"steps": 20, "schedule": "cosine"}
            x0 = test_x.float() * (2.0 / (ds.levels - 1)) - 1.0
            metrics["test_diffusion_loss"] = float(training_loss(model, x0, schedule, seed=0))
        if model_name in ("dcgan", "unet"):
            from ._sampling import _Generator

            gen = _Generator(model, 0, None, {"sampling": sampling}, ds.shape, ds.levels)
            samples = gen.draw(0, 1000 if model_name == "dcgan" else 256).double() / 255
            metrics["proxy"] = "pixel_fd: Frechet distance of pixel means/covariances, samples vs test set"
            metrics["pixel_fd"] = pixel_fd(samples, _unit(ds.test, ds.levels))
            metrics["pixel_fd_train_vs_test"] = pixel_fd(_unit(ds.train, ds.levels), _unit(ds.test, ds.levels))
    extra = {"data": ds.describe(), "metrics": metrics, "training": {"batch_size": batch_size, "lr": lr, "seed": seed}}
    if sampling:
        extra["sampling"] = sampling
    model.cpu()
    out = Path(out or f"{model_name}.safetensors")
    config = _checkpoints.save(out, model_name, model, kwargs, image_shape=ds.shape, levels=ds.levels, **extra)
    return config
