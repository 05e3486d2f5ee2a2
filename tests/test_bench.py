"""The `genkern` command and the benchmark registry: a tiny run end to end, and the cases wired right."""
from __future__ import annotations

import json

import pytest
import torch

import genkern
from genkern import bench
from genkern.autoregressive import bench_cases as sampling_cases
from genkern.cli import main
from genkern.reparam import reference as ref

CASES = bench.all_cases()

SMALL = 64 * 1024

ROW_KEYS = {"op", "size", "shape", "dtype", "impl", "time_ms", "speedup_vs_eager", "speedup_vs_compile", "gbps",
            "pct_copy_bandwidth"}


def test_bench_writes_report(tmp_path, capsys):
    out = tmp_path / "x.json"
    rc = main(["bench", "--device", "cpu", "--sizes", "64K", "--ops", "reparameterize_kl", "--repeats", "2",
               "--no-compile", "--output", out, "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())

    assert report["device_kind"] == "cpu" and report["device"]
    assert report["threads"] == torch.get_num_threads()
    assert report["copy_bandwidth_gbps"] > 0
    assert {"genkern", "torch", "python", "numpy"} <= report["versions"].keys()
    assert report["versions"]["genkern"] == genkern.__version__
    assert report["date"].endswith("+00:00")
    assert report["command"][:2] == ["genkern", "bench"]

    rows = {r["impl"]: r for r in report["rows"]}
    assert {"eager", "genkern:cpu"} <= rows.keys() and "compile" not in rows
    for row in rows.values():
        assert ROW_KEYS <= row.keys()
        assert (row["op"], row["size"], row["dtype"]) == ("reparameterize_kl", SMALL, "float32")
        assert row["shape"] == [64, 1024]
        assert row["time_ms"] > 0 and row["gbps"] > 0 and row["pct_copy_bandwidth"] > 0
        assert row["speedup_vs_compile"] is None  # --no-compile
    assert rows["eager"]["speedup_vs_eager"] == 1.0
    ours = rows["genkern:cpu"]
    assert ours["speedup_vs_eager"] == pytest.approx(rows["eager"]["time_ms"] / ours["time_ms"])

    printed = capsys.readouterr()
    assert "genkern:cpu" in printed.out and "copy bandwidth" in printed.out
    assert printed.err == ""  # --quiet


def test_bench_rejects_bad_arguments(capsys):
    for bad in (["--ops", "nope"], ["--sizes", "1Q"], ["--backends", "triton"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--device", "cpu", *bad])
        assert exc.value.code == 2
    assert "unknown op nope" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert genkern.__version__ in out and "backends available" in out and "built with CUDA" in out


def test_sizes():
    assert [bench.parse_size(s) for s in ("65536", "64K", "1m", "16M")] == [65536, 65536, 1 << 20, 16 << 20]
    assert [bench.format_size(n) for n in (65536, 1 << 20, 3000)] == ["64K", "1M", "3000"]
    assert bench.matrix_shape(1 << 20) == (1024, 1024) and bench.matrix_shape(16 << 20) == (4096, 4096)


def test_sampling_case_reports_images_per_second(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["bench", "--device", "cpu", "--ops", "pixelcnn_sample_b1", "--repeats", "1", "--output", out,
                 "--quiet"]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"eager", "genkern:cpu"} == rows.keys()  # no torch.compile of a Python sampling loop
    naive, cached = rows["eager"], rows["genkern:cpu"]
    assert naive["extrapolated_by"] == 28 * 28 / sampling_cases.NAIVE_STEPS
    assert naive["time_ms"] == pytest.approx(naive["measured_ms"] * naive["extrapolated_by"])
    for row in (naive, cached):
        assert row["items"] == 1 and row["item_unit"] == "img" and row["gbps"] is None
        assert row["items_per_s"] == pytest.approx(1e3 / row["time_ms"])
    assert cached["speedup_vs_eager"] == pytest.approx(naive["time_ms"] / cached["time_ms"])
    printed = capsys.readouterr().out
    assert "img/s" in printed and "* extrapolated" in printed


@pytest.mark.parametrize("case", [c for c in CASES if c.family == "pixelcnn_sampling" and c.items(0) <= 4],
                         ids=lambda c: c.name)
def test_sampling_cases_draw_the_same_pixels(case):
    """Naive (eager, extrapolated) and cached sampling draw the same first pixels from the same stream."""
    model, x = case.make_inputs(SMALL, torch.device("cpu"), torch.float32)
    ours = case.genkern(model, x.clone(), backend="cpu")
    eager = case.eager(model, x.clone())
    steps = sampling_cases.NAIVE_STEPS
    assert torch.equal(ours[:, 0, 0, :steps], eager[:, 0, 0, :steps])


def test_the_rgb_sampling_case_draws_the_colours_in_turn():
    """The 32x32 RGB case at batch 1: its first NAIVE_STEPS draws run over the colours of a pixel first."""
    case = next(c for c in CASES if c.name == "pixelcnn_sample_rgb32_b256")
    model, _ = case.make_inputs(SMALL, torch.device("cpu"), torch.float32)
    x = torch.zeros(1, 3, 32, 32, dtype=torch.int64)
    ours = model.sample(1, seed=0, backend="cpu")
    eager = case.eager(model, x)
    steps = sampling_cases.NAIVE_STEPS  # raster order, colours inside a pixel
    order = ours.permute(0, 2, 3, 1).reshape(1, -1)[:, :steps]
    assert torch.equal(order, eager.permute(0, 2, 3, 1).reshape(1, -1)[:, :steps])
    assert case.shape(0) == (256, 3, 32, 32) and case.eager_scale(0) == 3 * 32 * 32 / steps


def test_default_cases_follow_the_device():
    cpu = {c.name for c in bench.select_cases(CASES, None, "cpu")}
    cuda = {c.name for c in bench.select_cases(CASES, None, "cuda")}
    assert "pixelcnn_sample_b64" in cpu and "pixelcnn_sample_b64" in cuda
    assert "pixelcnn_sample_rgb32_b256" in cuda and "pixelcnn_sample_rgb32_b256" not in cpu
    assert "pixelcnn_sample_b256" not in cpu | cuda  # in --ops runs only


@pytest.mark.parametrize("case", [c for c in CASES if c.family != "pixelcnn_sampling"], ids=lambda c: c.name)
def test_cases_agree_with_reference(case):
    """Each case's genkern call and eager baseline compute the same thing, so the benchmark compares like
    with like. Random ops draw different noise, so only their deterministic parts are compared."""
    torch.manual_seed(0)
    args = case.make_inputs(SMALL, torch.device("cpu"), torch.float32)
    # The eager call gets copies: an op that updates an input in place (a rolling state) must start from
    # the same values as genkern's call did.
    eager_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    ours = case.genkern(*args, backend="cpu")
    # Copies: the _out cases write into buffers of `args`, which the eager call then overwrites.
    ours = tuple(x.clone() for x in ours) if isinstance(ours, tuple) else ours.clone()
    eager = case.eager(*eager_args)
    if case.name in ("reparameterize_kl", "ddpm_step", "ddpm_step_out"):  # the deterministic output
        ours, eager = ours[1], eager[1]
    if case.name in ("reparameterize", "q_sample", "diffusion_loss"):  # different noise: shapes only
        ours, eager = ours.shape, eager.shape
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-3)
    if case.name == "iwae_bound":
        torch.testing.assert_close(eager, ref.iwae_bound(*args), rtol=1e-4, atol=1e-3)
    assert case.bytes_moved(SMALL, torch.float32) >= 4 * SMALL  # at least the main tensor is read
