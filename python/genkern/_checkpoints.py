"""Checkpoints: a model's weights as safetensors, its configuration as JSON in the same file's header.

    save(path, model_name, model, kwargs, data=..., metrics=...)   # path.safetensors, and path.json beside it
    model, config = load(path, expect="vae")                       # never unpickles: safetensors + json only

The JSON config (also written beside the weights as a readable `<name>.json`, which loading does not need):
format, model (its genkern name), class, kwargs (the constructor's arguments), image_shape [C, H, W],
levels, data, metrics, sampling (e.g. the diffusion steps), genkern_version. A shipped checkpoint per model
lives in genkern/checkpoints/<model>.safetensors (see benchmarks/train_defaults.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from _genkern_cli import MODEL_NAMES as MODEL_NAMES  # re-exported: the names the command line accepts

FORMAT = "genkern-checkpoint-1"
META_KEY = "genkern_config"
PACKAGED = Path(__file__).parent / "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, not a safetensors file, not genkern's, another model."""


def model_classes() -> dict:
    from . import models

    return {
        "pixelcnn": models.PixelCNN,
        "gated_pixelcnn": models.GatedPixelCNN,
        "nade": models.NADE,
        "vae": models.VAE,
        "dcgan": models.DCGAN,
        "unet": models.UNet,
    }


def packaged(model_name: str) -> Path:
    return PACKAGED / f"{model_name}.safetensors"


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save(path, model_name: str, model, kwargs: dict, *, image_shape, levels: int, **extra) -> dict:
    """Write the weights and config atomically; returns the config. extra: data, metrics, sampling, ..."""
    from safetensors.torch import save

    from . import __version__

    path = Path(path)
    config = {
        "format": FORMAT,
        "model": model_name,
        "class": type(model).__name__,
        "kwargs": kwargs,
        "image_shape": list(image_shape),
        "levels": int(levels),
        **extra,
        "genkern_version": __version__,
    }
    text = json.dumps(config, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(path, save(tensors, metadata={META_KEY: text}))
    _atomic_bytes(path.with_suffix(".json"), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return config


def read_config(path) -> dict:
    """The config in a checkpoint's header; CheckpointError when it is not a genkern checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on a bad header
        raise CheckpointError(f"{path}: not a safetensors file ({str(exc).splitlines()[0]})") from None
    try:
        config = json.loads(meta[META_KEY])
        if config.get("format") != FORMAT:
            raise KeyError
    except (KeyError, ValueError, AttributeError):
        raise CheckpointError(f"{path}: a safetensors file without a genkern config (format {FORMAT})") from None
    return config


def load(path, *, expect: str | None = None, device=None):
    """(model, config) from a checkpoint, the model in eval mode on `device`. With `expect`, a checkpoint of
    another model is a CheckpointError."""
    from safetensors.torch import load_file

    config = read_config(path)
    name = config.get("model")
    classes = model_classes()
    if name not in classes:
        raise CheckpointError(f"{path}: unknown model {name!r}")
    if expect is not None and name != expect:
        raise CheckpointError(f"{path} is a {name} checkpoint, not {expect}")
    try:
        tensors = load_file(str(path))
        model = classes[name](**config["kwargs"])
        model.load_state_dict(tensors, strict=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or mismatched weights ({str(exc).splitlines()[0]})") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, config
