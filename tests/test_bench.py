"""The `genkern` command and the benchmark registry: a tiny run end to end, and the cases wired right."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import genkern
from genkern import bench
from genkern.autoregressive import bench_cases as sampling_cases
from genkern.cli import main
from genkern.reparam import reference as ref

CASES = bench.all_cases()

SMALL = 64 * 1024

ROW_KEYS = {
    "op",
    "size",
    "shape",
    "dtype",
    "impl",
    "time_ms",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "gbps",
    "pct_copy_bandwidth",
}


def test_bench_writes_report(tmp_path, capsys):
    out = tmp_path / "x.json"
    rc = main(
        [
            "bench",
            "--device",
            "cpu",
            "--sizes",
            "64K",
            "--ops",
            "reparameterize_kl",
            "--repeats",
            "2",
            "--no-compile",
            "--output",
            out,
            "--quiet",
        ]
    )
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
    assert (
        main(["bench", "--device", "cpu", "--ops", "pixelcnn_sample_b1", "--repeats", "1", "--output", out, "--quiet"])
        == 0
    )
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


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.family == "pixelcnn_sampling" and c.items(0) <= 4], ids=lambda c: c.name
)
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


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.family not in ("pixelcnn_sampling", "sampling")], ids=lambda c: c.name
)
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
    if case.name in ("reparameterize", "q_sample", "diffusion_loss", "euler_ancestral_step"):  # other noise: shapes
        ours, eager = ours.shape, eager.shape
    if case.family == "sampling_head":  # tokens drawn with other noise: both inside each row's top_k
        (logits,) = args
        top = logits.topk(50, dim=-1).indices
        for tokens in (ours, eager):
            assert tokens.shape == (logits.shape[0],) and bool((top == tokens[:, None]).any(1).all())
        ours, eager = ours.shape, eager.shape
    torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-3)
    if case.name == "iwae_bound":
        torch.testing.assert_close(eager, ref.iwae_bound(*args), rtol=1e-4, atol=1e-3)
    assert case.bytes_moved(SMALL, torch.float32) >= 4 * SMALL  # at least the main tensor is read


def _case(name):
    return next(c for c in CASES if c.name == name)


@pytest.mark.parametrize("name", ["sample_vae_b64", "sample_nade_b64", "sample_pixelcnn_b64"])
def test_model_sampling_cases_run_genkern_sample_to_files(name):
    """A `sampling` case times genkern.sample end to end (shards, grid and manifest written) against the
    naive sampler of the same model, over the same number of samples (PixelCNN: a scaled fraction)."""
    case = _case(name)
    model, batch, shards, out = case.make_inputs(SMALL, torch.device("cpu"), torch.float32)
    manifest = case.genkern(model, batch, shards, out, backend="cpu")
    files = sorted(p.name for p in Path(out.name).iterdir())
    assert manifest["n"] == case.items(SMALL) == shards * batch and manifest["drawn"] == shards * batch
    assert len([f for f in files if f.startswith("samples-")]) == shards and "grid.png" in files
    eager = case.eager(model, batch, shards, out)
    if case.eager_scale is None:
        assert sum(len(x) for x in eager) == shards * batch
    else:  # PixelCNN: NAIVE_STEPS of the model's dims full passes were drawn
        assert eager.shape[0] == batch and case.eager_scale(SMALL) * 4 == model.dims


def _config(cases, sizes=(SMALL,), backends=("cpu",)):
    return bench.Config(
        device=torch.device("cpu"),
        cases=cases,
        sizes=sizes,
        dtype=torch.float32,
        backends=backends,
        repeats=1,
        use_compile=False,
    )


def test_a_baseline_needing_a_missing_library_is_skipped(tmp_path, capsys, monkeypatch):
    """Without diffusers (a test extra, not installed by `pip install .`), ddim_loop's eager baseline is
    skipped with a note, its genkern row still runs, and the command succeeds."""
    assert "diffusers" in _case("ddim_loop").requires
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    out = tmp_path / "d.json"
    assert main(["bench", "--device", "cpu", "--ops", "ddim_loop", "--repeats", "1", "--output", out, "--quiet"]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows.keys() == {"eager", "genkern:cpu"}
    assert "diffusers" in rows["eager"]["skipped"] and rows["eager"]["time_ms"] is None
    assert "error" not in rows["eager"]
    assert rows["genkern:cpu"]["time_ms"] > 0 and rows["genkern:cpu"]["speedup_vs_eager"] is None
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ddim_loop")]
    assert len(skipped) == 2 and "skipped: needs diffusers" in skipped[0]


def test_a_failing_implementation_fails_the_command(tmp_path, monkeypatch):
    """Skipping is for missing optional libraries only: an eager baseline that raises still fails the run."""

    def broken(*args):
        raise ImportError("a bug, not a missing library")

    case = dataclasses.replace(_case("reparameterize_kl"), eager=broken)
    monkeypatch.setattr(bench, "all_cases", lambda: (case,))
    assert (
        main(
            [
                "bench",
                "--device",
                "cpu",
                "--sizes",
                "64K",
                "--repeats",
                "1",
                "--no-compile",
                "--output",
                tmp_path / "f.json",
                "--quiet",
            ]
        )
        == 1
    )


def test_a_failed_row_does_not_widen_the_table():
    message = "RuntimeError: " + "a very long error message " * 12

    def broken(*args):
        raise RuntimeError(message.removeprefix("RuntimeError: ") + "\nsecond line")

    good = _case("reparameterize_kl")
    bad = dataclasses.replace(good, name="broken_op", eager=broken)
    clean = bench.format_table(bench.run(_config([good], backends=[])))
    table = bench.format_table(bench.run(_config([good, bad], backends=[])))

    def body(text):  # the table's lines, from its header row to the end of its rows
        lines = text.split("\nfailures:\n")[0].splitlines()
        return lines[lines.index(next(line for line in lines if line.startswith("op "))) :]

    rule = next(line for line in body(clean) if line.startswith("---"))
    assert rule in body(table)
    assert max(map(len, body(table))) <= len(rule)
    failed = next(line for line in body(table) if line.startswith("broken_op"))
    assert "failed [1]: RuntimeError: a very long" in failed and failed.endswith("...")
    assert f"[1] broken_op 64K eager: {message}" in table  # in full below the table


def test_default_output_is_a_new_file_in_the_current_directory(tmp_path, capsys, monkeypatch):
    """Run from a checkout, the default output goes to the current directory, never into benchmarks/results
    and never over an existing file."""
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "benchmarks" / "results"
    committed.mkdir(parents=True)
    args = [
        "bench",
        "--device",
        "cpu",
        "--sizes",
        "64K",
        "--ops",
        "gaussian_kl",
        "--repeats",
        "1",
        "--no-compile",
        "--quiet",
    ]
    assert main(args) == 0 and main(args) == 0  # within the same second, most likely: the same time stamp
    written = sorted(tmp_path.glob("genkern-bench-*.json"))
    assert len(written) == 2 and not any(committed.iterdir())
    slug = json.loads(written[0].read_text())["device_slug"]
    assert all(re.fullmatch(rf"genkern-bench-{slug}-\d{{8}}T\d{{6}}Z(-\d+)?\.json", p.name) for p in written)
    printed = capsys.readouterr().out
    assert all(f"wrote {p.name}" in printed for p in written)

    taken = bench.default_output_path(slug, tmp_path)
    taken.write_text("earlier results")
    assert bench.default_output_path(slug, tmp_path) != taken


def test_the_report_is_written_atomically(tmp_path, monkeypatch):
    """The target is only ever replaced whole: a write that fails leaves the old file and no temp file."""
    path = tmp_path / "r.json"
    path.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(bench.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        bench.write_report({"rows": []}, path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    monkeypatch.undo()
    assert bench.write_report({"rows": [1]}, path) == path
    assert json.loads(path.read_text()) == {"rows": [1]} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_the_default_selection_is_a_headline_per_group():
    """A plain `genkern bench` runs one or two cases of each group, not every case."""
    for device in ("cpu", "cuda"):
        chosen = bench.select_cases(CASES, None, device)
        groups = {c.family for c in CASES} - {"nade"}  # NADE's case takes seconds a call: --ops nade only
        for group in groups:
            assert 1 <= sum(c.family == group for c in chosen) <= 2, (device, group)
        assert len(chosen) <= 2 * len(groups) and len(chosen) < len(CASES) / 2


def test_all_runs_every_case_and_list_prints_them(capsys):
    import _genkern_cli
    from genkern import cli

    config = cli._bench_config(_genkern_cli._parser().parse_args(["bench", "--all", "--device", "cpu"]), [])
    assert list(config.cases) == list(CASES)
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--all", "--ops", "q_sample"])
    assert exc.value.code == 2
    capsys.readouterr()

    assert main(["bench", "--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert all(c.name in lines for c in CASES)
    assert lines["reparameterize_kl"].split()[1:] == ["reparam", "forward", "pass", "yes"]
    assert lines["masked_conv2d"].split()[1:] == ["autoregressive/masked_conv", "forward+backward", "yes"]
    assert lines["nade_log_prob"].endswith("no") and lines["pixelcnn_sample_rgb32_b256"].endswith("on cuda only")
    assert "eager needs diffusers" in lines["ddim_loop"]


def test_progress_lines_give_the_time_left():
    messages = []
    bench.run(_config([_case("gaussian_kl"), _case("iwae_bound")], sizes=(SMALL, 2 * SMALL)), messages.append)
    steps = [m for m in messages if m.startswith("[") and not m.startswith("[copy]")]
    assert len(steps) == 8 and steps[0].startswith("[1/8] gaussian_kl 64K eager")
    assert not any("left" in m for m in steps[:2])  # the first case pays for start-up: no estimate from it
    assert all(re.search(r"\(\d+s so far, about \d+s left\)$", m) for m in steps[2:])


def test_the_time_left_scales_earlier_sizes():
    eta = bench._Eta()
    kl, iwae = _case("gaussian_kl"), _case("iwae_bound")
    eta.record(kl, 1 << 20, "eager", 1.0, None)
    eta.record(kl, 1 << 20, "compile", 5.5, 5.0)  # 5 s compiling, 0.5 s timing
    assert eta.left([(kl, 16 << 20, "eager")]) == pytest.approx(16.0)
    assert eta.left([(kl, 2 << 20, "compile")]) == pytest.approx(1.0 + 5.0)
    # not timed yet: the mean time per element of everything so far
    assert eta.left([(iwae, 1 << 20, "eager")]) == pytest.approx(1.5 / 2)
    # a larger size took twice the time its smaller one predicted: later predictions are doubled
    eta.record(kl, 2 << 20, "eager", 4.0, None)
    assert eta.left([(kl, 4 << 20, "eager"), (kl, 2 << 20, "compile")]) == pytest.approx(16.0 + 2.0 + 5.0)
    assert bench.format_duration(42.4) == "42s" and bench.format_duration(125) == "2m05s"


def test_busy_cores_keeps_every_core_busy_and_stops():
    """The spinners run inside the block, and are killed and reaped when it ends, even by an exception."""
    with pytest.raises(RuntimeError), bench.busy_cores(2, settle_s=0.0) as spinners:
        assert len(spinners) == 2 and all(p.poll() is None for p in spinners)
        raise RuntimeError("the timed code failed")
    assert all(p.returncode is not None for p in spinners)
    assert bench.busy_core_count() >= 1


def test_a_busy_case_is_timed_under_load_and_only_it(monkeypatch):
    """under_load(case) gives <op>_busy, outside the default selection, whose implementations are all
    timed inside busy_cores; the idle case is not, and each keeps its own ratios."""
    loaded = []

    class Recorder:
        def __enter__(self):
            loaded.append(True)
            return ["p1", "p2"]

        def __exit__(self, *exc):
            loaded.append(False)

    idle = _case("ddim_step_small")
    busy = _case("ddim_step_small_busy")
    assert busy == bench.under_load(idle) and busy.busy and not idle.busy and busy.default is False
    times = []

    def eager(*args):
        times.append(bool(loaded and loaded[-1]))
        return idle.eager(*args)

    monkeypatch.setattr(bench, "busy_cores", Recorder)
    report = bench.run(_config([dataclasses.replace(idle, eager=eager), bench.under_load(idle), _case("ddim_loop")]))
    rows = {(r["op"], r["impl"]): r for r in report["rows"]}
    assert not any(times) and loaded == [True, False]  # one busy block, around the busy case only
    assert rows[("ddim_step_small_busy", "genkern:cpu")]["busy_processes"] == 2
    assert "busy_processes" not in rows[("ddim_step_small", "genkern:cpu")]
    assert rows[("ddim_step_small_busy", "eager")]["speedup_vs_eager"] == 1.0
    assert "_busy: timed while 2 other processes kept every core busy" in bench.format_table(report)
