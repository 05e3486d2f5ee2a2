"""genkern.sample: batch sampling of a trained model into uint8 images, in memory or as shard files.

    images = genkern.sample(model, 1000, seed=0, batch_size=256)                # (1000, C, H, W) uint8
    manifest = genkern.sample("pixelcnn", 10_000, seed=0, out_dir="samples")    # the shipped checkpoint

Sample i depends only on (seed, i): every model draws its noise keyed by the sample's index, so the images
are the same for any batch size, resume point or number of processes (see genkern.models._latent).

Output directory (out_dir): `samples-<first>-<last>.npz` shards (`images` uint8 (m, C, H, W), `indices`
int64, `run` the run's identity as JSON), `grid.png` (the first 64), `manifest.json`, and `run.json` (the
identity, written first, so a different run is recognised before anything is replaced). Shards are the
fixed grid [first_sample + k * batch_size, ...) whatever the process count; under torch.distributed (e.g.
torchrun) rank r takes a contiguous share of the shards and rank 0 writes the grid and the manifest after a
barrier. Every file is written to a temporary name and renamed, so an interrupted run leaves whole shards
only; resume=True keeps the shards that load and match the run.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import _checkpoints, _checks
from .models import _latent

DEFAULT_STEPS = 20  # DDIM steps of the diffusion model
GRID = 64


class SampleError(ValueError):
    """Bad arguments or output directory; `option` names the command-line option it concerns."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}" if option else message)
        self.option = option


# ------------------------------------------------------------------------------------------------------
# models -> uint8 images
# ------------------------------------------------------------------------------------------------------
def image_spec(model: nn.Module, config: dict | None = None) -> tuple[tuple[int, int, int], int]:
    """((C, H, W), levels) of the model's images."""
    from .models import NADE, UNet

    if config and "image_shape" in config:
        return tuple(config["image_shape"]), int(config["levels"])
    if isinstance(model, NADE):
        side = math.isqrt(model.n_dims)
        if side * side != model.n_dims:
            raise SampleError("model", f"NADE with n_dims={model.n_dims} is not a square image; pass image_shape")
        return (1, side, side), 2
    if isinstance(model, UNet):
        if model.image_size is None:
            raise SampleError("model", "a UNet built without image_size; pass image_shape")
        return (model.in_channels, model.image_size, model.image_size), 256
    return (model.in_channels, *model.image_size), model.levels


def to_uint8(levels: Tensor, n_levels: int) -> Tensor:
    """Integer levels in [0, n_levels) -> 0 .. 255, rounded (2 levels: 0 and 255)."""
    x = levels.to(torch.int64)
    return ((x * 510 + (n_levels - 1)) // (2 * (n_levels - 1))).to(torch.uint8)


class _Generator:
    """draw(first, n) -> (n, C, H, W) uint8 on the CPU: samples first .. first + n - 1 of the seed."""

    def __init__(self, model: nn.Module, seed: int, steps: int | None, config: dict | None, shape, levels):
        from .models import NADE, UNet

        self.model, self.seed, self.shape, self.levels = model, seed, shape, levels
        self.diffusion = isinstance(model, UNet)
        if steps is not None and not self.diffusion:
            raise SampleError("--steps", "applies to the diffusion model (unet) only")
        self.steps = (
            (steps or (config or {}).get("sampling", {}).get("steps", DEFAULT_STEPS)) if self.diffusion else None
        )
        self.nade = isinstance(model, NADE)
        if self.diffusion:
            from .diffusion import DDIMSampler, NoiseSchedule

            schedule = (config or {}).get("sampling", {}).get("schedule", "cosine")
            self.sampler = DDIMSampler(NoiseSchedule(schedule))

    @torch.no_grad()
    def draw(self, first: int, n: int) -> Tensor:
        model, seed = self.model, self.seed
        if self.nade:
            from .autoregressive import nade_sample

            x = nade_sample(model.W, model.c, model.V, model.b, n, seed=seed, first=first, backend=model.backend)
            levels = x.view(n, *self.shape)
        elif self.diffusion:
            device = next(model.parameters()).device
            c, h, w = self.shape

            def group(g: int, count: int) -> Tensor:
                x_T = _latent.normals(count, c * h * w, seed=seed, first_sample=g, device=device).view(count, c, h, w)
                x0 = self.sampler.sample(model, (count, c, h, w), self.steps, x_T=x_T, seed=0, device=device)
                return torch.round((x0.float().clamp(-1, 1) + 1) * (0.5 * (self.levels - 1))).long()

            levels = _latent.by_granule(n, first, group)
        else:
            levels = model.sample(n, seed=seed, first_sample=first)
        return to_uint8(levels, self.levels).cpu()


# ------------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------------
def _atomic(path: Path, write) -> None:
    """write(file) into a temporary file beside path, then rename it over path."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_json(path: Path, obj) -> None:
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def shard_name(first: int, last: int) -> str:
    return f"samples-{first:08d}-{last:08d}.npz"


def _write_shard(path: Path, images: np.ndarray, first: int, run_json: str) -> None:
    indices = np.arange(first, first + images.shape[0], dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, images=images, indices=indices, run=np.array(run_json))
    _atomic(path, lambda f: f.write(buf.getbuffer()))


def read_shard(path) -> tuple[np.ndarray, np.ndarray]:
    """(images, indices) of a shard; never unpickles."""
    with np.load(path, allow_pickle=False) as z:
        return z["images"], z["indices"]


def _shard_ok(path: Path, first: int, count: int, shape, run_json: str) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, indices, run = z["images"], z["indices"], str(z["run"])
    except Exception:
        return False
    return (
        run == run_json
        and images.dtype == np.uint8
        and images.shape == (count, *shape)
        and np.array_equal(indices, np.arange(first, first + count, dtype=np.int64))
    )


def write_grid(path: Path, images: np.ndarray, columns: int = 8) -> None:
    """A grid of (m, C, H, W) uint8 images as a PNG, small images scaled up to about 32 pixels."""
    from PIL import Image

    m, c, h, w = images.shape
    scale = max(1, 32 // max(h, w))
    rows = max(1, -(-m // columns))
    pad = 2
    canvas = np.full((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad, c), 64, np.uint8)
    for k in range(m):
        img = images[k].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
        r, q = divmod(k, columns)
        y, x = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        canvas[y : y + h * scale, x : x + w * scale] = img
    mode = {1: "L", 3: "RGB"}.get(c)
    if mode is None:
        canvas = canvas[..., :1]
        mode = "L"
    picture = Image.fromarray(canvas[..., 0] if mode == "L" else canvas, mode=mode)
    _atomic(path, lambda f: picture.save(f, format="PNG"))


def _make_dir(out_dir: Path) -> None:
    """mkdir -p, as a SampleError('--out') on failure with the directories it made removed again."""
    missing = []
    probe = out_dir
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        test = out_dir / f".write-test-{os.getpid()}"
        test.write_bytes(b"")
        test.unlink()
    except OSError as exc:
        for d in missing:
            if d.is_dir():
                d.rmdir()
        raise SampleError("--out", f"{out_dir} is not writable ({exc.strerror or exc})") from None


def _ours(out_dir: Path) -> list[Path]:
    names = [*out_dir.glob("samples-*.npz"), out_dir / "grid.png", out_dir / "manifest.json", out_dir / "run.json"]
    return [p for p in names if p.exists()]


def check_out_dir(out_dir: Path, identity: dict, *, resume: bool, force: bool) -> None:
    """SampleError('--out', ...) when out_dir cannot be written or holds another run's output (unless
    force). Reads only: nothing is created or removed here."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SampleError("--out", f"{out_dir} exists and is not a directory")
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SampleError("--out", f"{out_dir} is not writable ({probe} is not a writable directory)")
    if not out_dir.exists() or force:
        return
    run_file = out_dir / "run.json"
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != identity:
            diff = "unreadable run.json"
            if isinstance(previous, dict):
                keys = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
                diff = ", ".join(f"{k} {previous.get(k)!r} -> {identity.get(k)!r}" for k in keys)
            raise SampleError(
                "--out",
                f"{out_dir} holds another run's samples ({diff}); use --force to replace them, or another --out",
            )
    elif _ours(out_dir):
        raise SampleError("--out", f"{out_dir} holds samples of an unknown run; use --force to replace them")


# ------------------------------------------------------------------------------------------------------
# the public function
# ------------------------------------------------------------------------------------------------------
def _resolve_model(model, device, expect=None):
    """(module, config, checkpoint path or None) from a module, a checkpoint path or a shipped model name."""
    if isinstance(model, nn.Module):
        return model, getattr(model, "genkern_config", None), None
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        path = _checkpoints.packaged(text) if text in _checkpoints.MODEL_NAMES else Path(text)
        if text in _checkpoints.MODEL_NAMES and not path.exists():
            raise SampleError(
                "--checkpoint", f"no shipped checkpoint for {text}; train one with `genkern train {text}`"
            )
        try:
            module, config = _checkpoints.load(path, expect=expect, device=device)
        except _checkpoints.CheckpointError as exc:
            raise SampleError("--checkpoint", str(exc)) from None
        return module, config, path
    raise TypeError(f"model must be an nn.Module, a checkpoint path or a model name, got {type(model).__name__}")


def _device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SampleError("--device", f"{device!r} is not a device (cpu or cuda)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SampleError("--device", "cuda is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SampleError("--device", f"{dev} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise SampleError("--device", f"{device!r}: cpu or cuda only")
    return dev


def _count(option: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise SampleError(option, f"must be an integer >= {low}, got {value!r}")
    return int(value)


def _dist():
    """(rank, world_size) of torch.distributed when initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sample(
    model,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 256,
    first_sample: int = 0,
    out_dir=None,
    device=None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
    model_name: str | None = None,
):
    """Samples first_sample .. first_sample + n - 1 of `model` for `seed`, as uint8 images (n, C, H, W).

    model: an nn.Module (PixelCNN, GatedPixelCNN, NADE, VAE, DCGAN, or a UNet sampled by DDIM with `steps`
    steps), a checkpoint path, or the name of a shipped model ("pixelcnn", ...). Sample i depends only on
    (seed, i), whatever batch_size (the samples per model call and per shard) or device.

    Without out_dir: returns the tensor. With out_dir: writes shards, grid.png and manifest.json there
    (see the module docstring; under torch.distributed each rank writes its share) and returns the manifest.
    resume: keep shards already complete and verified; force: replace another run's output.
    Bad arguments raise SampleError (a ValueError) naming the option, before anything is written."""
    n = _count("--n", n, 1)
    batch_size = _count("--batch-size", batch_size, 1)
    seed = _count("--seed", seed, 0)
    if seed > _checks.UINT64_MAX:
        raise SampleError("--seed", f"must be below 2^64, got {seed}")
    first_sample = _count("--first-sample", first_sample, 0)
    if first_sample + n > _latent.MAX_INDEX:
        raise SampleError("--n", "first_sample + n must be at most 2^62")
    steps = None if steps is None else _count("--steps", steps, 1)
    dev = _device(device)
    module, config, ckpt_path = _resolve_model(model, dev, expect=model_name)
    if dev is not None:
        module.to(dev)
    module.eval()
    dev = next(module.parameters()).device
    shape, levels = image_spec(module, config)
    gen = _Generator(module, seed, steps, config, shape, levels)

    if out_dir is None:
        parts = [gen.draw(first_sample + s, min(batch_size, n - s)) for s in range(0, n, batch_size)]
        return torch.cat(parts)

    name = model_name or (config or {}).get("model") or type(module).__name__.lower()
    identity = {
        "model": name,
        "checkpoint_sha256": _checkpoints.sha256(ckpt_path) if ckpt_path is not None else None,
        "seed": seed,
        "n": n,
        "first_sample": first_sample,
        "batch_size": batch_size,
        "steps": gen.steps,
        "image_shape": list(shape),
        "levels": levels,
    }
    out = Path(out_dir)
    check_out_dir(out, identity, resume=resume, force=force)
    rank, world = _dist()
    run_json = json.dumps(identity, sort_keys=True)
    if rank == 0:
        _make_dir(out)
        previous = (out / "run.json").exists() and json.loads((out / "run.json").read_text()) == identity
        for p in _ours(out):
            # Another run's files go (force); this run's shards stay for resume, the manifest always goes.
            if not previous or p.name == "manifest.json" or (not resume and p.name != "run.json"):
                p.unlink()
        _atomic_json(out / "run.json", identity)
    _barrier()

    shards = [(first_sample + s, min(batch_size, n - s)) for s in range(0, n, batch_size)]
    mine = shards[rank * len(shards) // world : (rank + 1) * len(shards) // world]
    drawn = reused = 0
    write_s = 0.0
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=sum(c for _, c in mine), unit="sample", desc=f"sampling {name}", dynamic_ncols=True)
    start = time.perf_counter()

    def write(path, images, first):
        t = time.perf_counter()
        _write_shard(path, images, first, run_json)
        return time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=1) as writer:  # writing overlaps the next shard's sampling
        pending = []
        for first, count in mine:
            path = out / shard_name(first, first + count - 1)
            if resume and _shard_ok(path, first, count, shape, run_json):
                reused += count
            else:
                images = gen.draw(first, count).numpy()
                pending.append(writer.submit(write, path, images, first))
                drawn += count
            if bar is not None:
                bar.update(count)
        write_s = sum(f.result() for f in pending)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    stats = {"rank": rank, "drawn": drawn, "reused": reused, "seconds": seconds, "write_seconds": write_s}
    all_stats = [stats]
    if world > 1:
        import torch.distributed as dist

        all_stats = [None] * world
        dist.all_gather_object(all_stats, stats)
    wall = max(s["seconds"] for s in all_stats)
    total_drawn = sum(s["drawn"] for s in all_stats)
    manifest = {
        **identity,
        "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
        "shards": [{"file": shard_name(f, f + c - 1), "first": f, "last": f + c - 1, "count": c} for f, c in shards],
        "samples_per_s": total_drawn / wall if wall > 0 and total_drawn else None,
        "seconds": wall,
        "drawn": total_drawn,
        "reused": sum(s["reused"] for s in all_stats),
        "write_seconds": sum(s["write_seconds"] for s in all_stats),
        "device": str(dev) if world == 1 else f"{world} x {dev.type}",
        "world_size": world,
        "ranks": all_stats,
        "format": "images uint8 (m, C, H, W), indices int64 (m,)",
    }
    if rank == 0:
        grid, have = [], 0
        for f, c in shards:
            if have >= GRID:
                break
            images, _ = read_shard(out / shard_name(f, f + c - 1))
            grid.append(images[: GRID - have])
            have += grid[-1].shape[0]
        write_grid(out / "grid.png", np.concatenate(grid))
        manifest["grid"] = "grid.png"
        _atomic_json(out / "manifest.json", manifest)
    _barrier()
    return manifest
