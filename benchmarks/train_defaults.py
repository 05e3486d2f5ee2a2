"""Train every shipped model on scikit-learn's digits and write its checkpoint into the package data
(python/genkern/checkpoints/<model>.safetensors and .json), so that `genkern sample MODEL` needs no
--checkpoint; then time `genkern.sample` of each into a temporary directory (shards, grid and manifest
included) and print a table of test metric and samples/s.

    python benchmarks/train_defaults.py                    # every default model (minutes on 2 cores)
    python benchmarks/train_defaults.py vae nade --threads 2

Re-runnable: the seeds are fixed (training seed 0, the test IWAE and sampling seeds 0), so a rerun on the
same machine and torch version reproduces the checkpoints, and elsewhere the metrics within noise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import genkern
from genkern import _checkpoints, _training

DEFAULTS = ("pixelcnn", "gated_pixelcnn", "nade", "vae", "dcgan", "unet")
SAMPLE_N = {"pixelcnn": 1024, "gated_pixelcnn": 1024, "nade": 4096, "vae": 4096, "dcgan": 4096, "unet": 256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models", nargs="*", help=f"some of {', '.join(_checkpoints.MODEL_NAMES)} (default: {', '.join(DEFAULTS)})"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--out", type=Path, default=_checkpoints.PACKAGED)
    parser.add_argument("--no-sample", action="store_true", help="skip the sampling benchmark")
    args = parser.parse_args()
    args.models = args.models or list(DEFAULTS)
    for name in args.models:
        if name not in _checkpoints.MODEL_NAMES:
            parser.error(f"unknown model {name!r}; choose from {', '.join(_checkpoints.MODEL_NAMES)}")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        path = args.out / f"{name}.safetensors"
        config = _training.train(name, out=path, seed=0)
        metrics = config["metrics"]
        row = {"model": name, "kb": round(path.stat().st_size / 1024), **metrics}
        if not args.no_sample:
            with tempfile.TemporaryDirectory() as tmp:
                n = SAMPLE_N[name]
                genkern.sample(path, 64, seed=0, batch_size=64, model_name=name)  # warm-up
                start = time.perf_counter()
                manifest = genkern.sample(path, n, seed=0, batch_size=256, out_dir=tmp, model_name=name)
                row["samples_per_s"] = round(n / (time.perf_counter() - start), 1)
                row["write_fraction"] = round(manifest["write_seconds"] / manifest["seconds"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    for r in rows:
        metric = r.get("test_bits_per_dim", r.get("pixel_fd"))
        base = r.get("baseline_independent_pixels_bits_per_dim", r.get("pixel_fd_train_vs_test"))
        kind = "bits/dim" if "test_bits_per_dim" in r else "pixel FD"
        print(
            f"{r['model']:>15}: test {metric:.4f} {kind} (baseline {base:.4f}), {r['train_seconds']:.0f} s training, "
            f"{r.get('samples_per_s', float('nan'))} samples/s, {r['kb']} KB"
        )


if __name__ == "__main__":
    main()
