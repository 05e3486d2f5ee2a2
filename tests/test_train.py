"""`genkern train`: every model trains on the digits, writes a safetensors checkpoint with its config and
test metric, and `genkern sample` draws from it; bad data is refused; the VAE beats independent pixels."""

import json

import numpy as np
import pytest
import torch

import genkern
from genkern import _checkpoints, _training
from genkern.cli import main

pytest.importorskip("sklearn.datasets")


def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


METRIC = {"pixelcnn": "test_bits_per_dim", "nade": "test_bits_per_dim", "vae": "test_bits_per_dim", "dcgan": "pixel_fd"}


@pytest.mark.parametrize(
    "name",
    [
        "nade",
        "vae",
        "dcgan",
        pytest.param("pixelcnn", marks=pytest.mark.slow),
        pytest.param("gated_pixelcnn", marks=pytest.mark.slow),
        pytest.param("unet", marks=pytest.mark.slow),
    ],
)
def test_train_writes_a_checkpoint_that_samples(name, tmp_path, capsys):
    ckpt = tmp_path / f"{name}.safetensors"
    code, out, _ = run_cli(["train", name, "--steps", 3, "--batch-size", 16, "--out", ckpt, "--quiet"], capsys)
    assert code == 0, out
    config = json.loads(ckpt.with_suffix(".json").read_text())
    assert config == _checkpoints.read_config(ckpt)
    assert (
        config["model"] == name and config["data"]["test"] == 297 and config["genkern_version"] == genkern.__version__
    )
    metric = METRIC.get(name, "test_bits_per_dim" if "pixelcnn" in name else "pixel_fd")
    assert np.isfinite(config["metrics"][metric]) and metric in out
    model, _ = _checkpoints.load(ckpt, expect=name)
    steps = {"steps": 2} if name == "unet" else {}
    images = genkern.sample(ckpt, 5, seed=0, batch_size=5, model_name=name, **steps)
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.uint8


def test_npz_data_and_bad_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "bin.npz", images=rng.integers(0, 2, (60, 4, 4), dtype=np.int64))
    data = _training.load_data(str(tmp_path / "bin.npz"))
    assert data.levels == 2 and data.train.shape == (50, 1, 4, 4) and data.test.shape == (10, 1, 4, 4)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    data = _training.load_data(str(tmp_path / "rgb.npz"))
    assert data.levels == 256 and data.shape == (3, 8, 8)
    np.savez(tmp_path / "float.npz", images=rng.random((12, 8, 8)))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for data_arg in ["digits", tmp_path / "float.npz", tmp_path / "junk.npz", tmp_path / "none.npz", "mnist"]:
        code, _, err = run_cli(["train", "nade", "--data", data_arg, "--out", tmp_path / "x.safetensors"], capsys)
        assert code == 2 and "--data" in err.strip().splitlines()[-1], (data_arg, err)
    assert not (tmp_path / "x.safetensors").exists()


def test_pixel_fd():
    torch.manual_seed(0)
    a, b = torch.rand(500, 16), torch.rand(500, 16)
    assert _training.pixel_fd(a, a) == pytest.approx(0, abs=1e-6)
    assert _training.pixel_fd(a, b) < 0.1 < _training.pixel_fd(a, b * 0.5)


@pytest.mark.slow
def test_vae_beats_independent_pixels_on_binarised_digits(tmp_path, capsys):
    ckpt = tmp_path / "vae.safetensors"
    assert run_cli(["train", "vae", "--steps", 600, "--out", ckpt, "--quiet"], capsys)[0] == 0
    metrics = _checkpoints.read_config(ckpt)["metrics"]
    assert metrics["test_bits_per_dim"] < 0.9 * metrics["baseline_independent_pixels_bits_per_dim"]
    assert metrics["test_bits_per_dim"] <= metrics["test_elbo_bits_per_dim"] + 1e-3  # IWAE-64 at least as tight
