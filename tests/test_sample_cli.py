"""genkern.sample and `genkern sample`: sample i depends only on (seed, i) for any batch size, resume point
or process count; shards, grid and manifest; atomic, resumable writes; bad input refused with status 2 and
nothing written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import genkern
from genkern import _checkpoints, _sampling
from genkern.cli import main
from genkern.models import DCGAN, NADE, VAE, GatedPixelCNN, PixelCNN, UNet


def tiny(name):
    torch.manual_seed(0)
    if name == "pixelcnn":
        kw = {
            "in_channels": 1,
            "levels": 4,
            "image_size": [8, 8],
            "hidden_channels": 8,
            "n_layers": 2,
            "kernel_size": 3,
        }
        return PixelCNN(**kw), kw, 4
    if name == "gated_pixelcnn":
        kw = {
            "in_channels": 1,
            "levels": 3,
            "image_size": [8, 8],
            "hidden_channels": 8,
            "n_layers": 2,
            "kernel_size": 3,
        }
        return GatedPixelCNN(**kw), kw, 3
    if name == "nade":
        kw = {"n_dims": 64, "hidden": 16}
        return NADE(**kw), kw, 2
    if name == "vae":
        kw = {"in_channels": 1, "levels": 2, "image_size": [8, 8], "latent_dim": 4, "hidden": 16}
        return VAE(**kw), kw, 2
    if name == "dcgan":
        kw = {"in_channels": 1, "image_size": [8, 8], "latent_dim": 4, "channels": 8, "levels": 17}
        return DCGAN(**kw), kw, 17
    kw = {"in_channels": 1, "base_channels": 8, "channel_mults": [1], "image_size": 8}
    return UNet(**kw), kw, 256  # without a checkpoint's config: 256 levels


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name in ("vae", "pixelcnn", "dcgan"):
        model, kw, levels = tiny(name)
        paths[name] = root / f"{name}.safetensors"
        _checkpoints.save(paths[name], name, model, kw, image_shape=(1, 8, 8), levels=levels, metrics={})
    return paths


@pytest.mark.parametrize(
    "name", ["pixelcnn", "gated_pixelcnn", "nade", "vae", "dcgan", pytest.param("unet", marks=pytest.mark.slow)]
)
def test_a_sample_depends_only_on_seed_and_index(name):
    model, _, levels = tiny(name)
    steps = {"steps": 2} if name == "unet" else {}
    full = genkern.sample(model, 70, seed=5, batch_size=70, **steps)
    assert full.dtype == torch.uint8 and full.shape == (70, 1, 8, 8)
    assert torch.equal(genkern.sample(model, 70, seed=5, batch_size=9, **steps), full)
    tail = genkern.sample(model, 3, seed=5, batch_size=2, first_sample=66, **steps)
    assert torch.equal(tail, full[66:69])
    assert not torch.equal(genkern.sample(model, 70, seed=6, batch_size=70, **steps), full)
    expected = {round(k * 255 / (levels - 1)) for k in range(levels)}
    assert set(full.unique().tolist()) <= expected


def test_checkpoint_round_trip_never_unpickles(ckpts, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, config = _checkpoints.load(ckpts["vae"], expect="vae")
    original, _, _ = tiny("vae")
    for (k, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert config["model"] == "vae" and config["genkern_version"] == genkern.__version__
    assert json.loads(ckpts["vae"].with_suffix(".json").read_text())["kwargs"] == config["kwargs"]
    with pytest.raises(_checkpoints.CheckpointError, match="not pixelcnn"):
        _checkpoints.load(ckpts["vae"], expect="pixelcnn")


def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def shards(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("samples-*.npz"))}


def test_cli_writes_shards_grid_and_manifest(ckpts, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sample", "vae", "--checkpoint", ckpts["vae"], "--n", 150, "--batch-size", 64, "--seed", 3, "--out", out]
    code, stdout, _ = run_cli([*args, "--quiet"], capsys)
    assert code == 0
    assert "samples/s on cpu" in stdout.strip().splitlines()[-1]
    files = shards(out)
    assert list(files) == [
        "samples-00000000-00000063.npz",
        "samples-00000064-00000127.npz",
        "samples-00000128-00000149.npz",
    ]
    images, indices = zip(*(_sampling.read_shard(out / f) for f in files))
    images, indices = np.concatenate(images), np.concatenate(indices)
    assert np.array_equal(indices, np.arange(150))
    model, _ = _checkpoints.load(ckpts["vae"])
    assert np.array_equal(images, genkern.sample(model, 150, seed=3, batch_size=150).numpy())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n"] == 150 and manifest["seed"] == 3 and manifest["device"] == "cpu"
    assert manifest["checkpoint_sha256"] == _checkpoints.sha256(ckpts["vae"])
    assert [s["file"] for s in manifest["shards"]] == list(files) and manifest["samples_per_s"] > 0
    from PIL import Image

    assert Image.open(out / "grid.png").size[0] > 8 * 32
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # --resume keeps whole shards and redraws a missing or corrupt one, to the same bytes
    (out / "samples-00000064-00000127.npz").unlink()
    (out / "samples-00000128-00000149.npz").write_bytes(b"truncated")
    code, stdout, _ = run_cli([*args, "--resume", "--quiet"], capsys)
    assert code == 0 and "(86 drawn, 64 kept)" in stdout
    assert shards(out) == files

    # another run's output is refused (nothing touched), replaced with --force
    code, _, err = run_cli([*args[:-4], "--seed", 4, "--out", out, "--quiet"], capsys)
    assert code == 2 and "--out" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert shards(out) == files
    code, _, _ = run_cli([*args[:-4], "--seed", 4, "--out", out, "--quiet", "--force"], capsys)
    assert code == 0 and shards(out).keys() == files.keys() and shards(out) != files


def test_batch_size_does_not_change_the_samples(ckpts, tmp_path, capsys):
    def union(batch):
        out = tmp_path / f"b{batch}"
        args = ["sample", "pixelcnn", "--checkpoint", ckpts["pixelcnn"], "--n", 40, "--batch-size", batch]
        assert run_cli([*args, "--out", out, "--quiet"], capsys)[0] == 0
        return np.concatenate([_sampling.read_shard(p)[0] for p in sorted(out.glob("samples-*.npz"))])

    assert np.array_equal(union(40), union(7))


BAD = [
    (["--checkpoint", "{tmp}/missing.safetensors"], "--checkpoint"),
    (["--checkpoint", "{tmp}/corrupt.safetensors"], "--checkpoint"),
    (["--checkpoint", "{dcgan}"], "--checkpoint"),  # a checkpoint of another model
    (["--n", "0"], "--n"),
    (["--batch-size", "0"], "--batch-size"),
    (["--out", "{tmp}/a-file/out"], "--out"),
    (["--device", "cuda:7"], "--device"),
    (["--device", "nonsense"], "--device"),
    (["--steps", "3"], "--steps"),  # the vae has no sampler steps
]


@pytest.mark.parametrize(("extra", "option"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_exits_2_naming_the_option(ckpts, tmp_path, capsys, extra, option):
    (tmp_path / "corrupt.safetensors").write_bytes(ckpts["vae"].read_bytes()[:200])
    (tmp_path / "a-file").write_text("")
    fill = {"tmp": tmp_path, "dcgan": ckpts["dcgan"]}
    extra = [e.format(**fill) for e in extra]
    args = ["sample", "vae", "--checkpoint", ckpts["vae"], "--n", 4, "--out", tmp_path / "out", "--quiet", *extra]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert option in err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "a-file" / "out").exists()


def test_two_gloo_processes_write_the_shards_of_one(ckpts, tmp_path, capsys):
    """torchrun with 2 CPU processes: each rank writes its contiguous share, the union is bit for bit the
    shards of a 1-process run (the files themselves are equal), and rank 0's manifest lists every shard."""
    common = ["vae", "--checkpoint", str(ckpts["vae"]), "--batch-size", "30", "--seed", "9", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "genkern"]
    two = tmp_path / "two"
    result = subprocess.run(
        [*cmd, "sample", *common, "--num-samples", "200", "--out", str(two)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 x cpu" in result.stdout
    torch.set_num_threads(1)
    try:
        assert run_cli(["sample", *common, "--n", 200, "--out", tmp_path / "one"], capsys)[0] == 0
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert shards(two) == shards(tmp_path / "one") and len(shards(two)) == 7
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and [r["drawn"] for r in manifest["ranks"]] == [90, 110]


@pytest.mark.parametrize("args", [["sample", "--help"], ["train", "--help"], ["sample", "vae", "--n", "0"]])
def test_the_new_commands_answer_without_torch(args):
    from test_cli import _run

    out = _run(args)
    assert "torch imported: False" in out and ("exit 0" in out or "exit 2" in out)


@pytest.mark.parametrize("name", sorted(_checkpoints.MODEL_NAMES))
def test_every_model_ships_a_checkpoint_with_its_metrics(name):
    """`genkern sample MODEL` without --checkpoint loads the packaged one (benchmarks/train_defaults.py), which
    records what it was trained on and how it scored."""
    model, config = _checkpoints.load(_checkpoints.packaged(name), expect=name)
    assert config["data"]["name"].startswith("digits") and config["metrics"]["steps"] > 0
    metric = "pixel_fd" if name in ("dcgan", "unet") else "test_bits_per_dim"
    assert config["metrics"][metric] > 0
    assert sum(p.numel() for p in model.parameters()) > 0
