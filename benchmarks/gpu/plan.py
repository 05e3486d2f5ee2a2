"""The GPU proof in one prepared run: build, test, sanitize, time, summarise (called by run.sh).

    benchmarks/gpu/run.sh OUTDIR [--dry-run] [--bundle] [--stages build,tests,...] [--deadline S]

Stages, each under its own time limit, each logging into OUTDIR/logs (or, with --bundle, into a work folder
packed into OUTDIR/logs.tar.gz after every stage, so that OUTDIR never holds more than a handful of files):

    setup      the GPU, its compute capability, tool versions; wheels in .whl/ installed to a private site
    build      genkern with CUDA for this GPU's compute capability only, all cores, into a fresh prefix,
               nvcc's ptxas -v figures (registers, stack, spills) per kernel
    tests      the cuda and triton backends of every family against the reference (all dtypes), and the
               CUDA-graph tests; JUnit XML
    memcheck, racecheck, synccheck
               compute-sanitizer on a smoke subset: one small test per family and GPU backend
    bench      `genkern bench` on the GPU, a time-boxed selection in three groups, merged into
               benchmarks/results/<device>.json (and OUTDIR/<device>.json)
    summary    the last thing printed: stage, status, time; per bench case the speedups over eager and
               torch.compile, % of copy bandwidth, and the issue's targets

Without a GPU (or with --dry-run) nothing is built or timed: every stage's command line is built and checked,
the test selections are collected with pytest, the bench cases are looked up in the registry, the summary is
rendered from a results JSON already in the repository, and the plan is printed. It exits non-zero when
anything is invalid, so CI catches a selection that stopped matching the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the pyproject check is skipped
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]
CALL_LIMIT_S = 600  # one device call
DEADLINE_S = 570  # this run's own limit: every stage's budget is cut to fit, and the summary still prints
RESERVE_S = 8  # kept back from the deadline for packing logs and the summary
KILL_GRACE_S = 12  # a stage stopped at its limit may take this long to go (see run_logged)

# ----------------------------------------------------------------------------------------------- tests
# Stage 2 selects by the backend in the test ids ("[cuda-float16]", "[triton]"), so it does not depend on
# where the sources live. "graph" adds the CUDA-graph tests in other files; the module tests/test_cuda_graphs.py
# matches through its own name. On a CPU the same expression with "cpu" for "cuda" must select tests from every
# family's file (triton runs there under TRITON_INTERPRET=1): that is what the dry run checks.
TEST_PATHS = ["tests"]
TEST_EXPR = "{gpu} or triton or graph"
TEST_MARKERS = "not slow"
GRAPH_TESTS = "tests/test_cuda_graphs.py"
FAMILY_TEST_FILES = {
    "random": ["tests/test_random.py"],
    "reparam": ["tests/test_reparam.py"],
    "diffusion": ["tests/test_diffusion.py", "tests/test_diffusion_steps.py"],
    "autoregressive": [
        "tests/test_causal_conv1d.py",
        "tests/test_causal_conv1d_states.py",
        "tests/test_masked_conv.py",
        "tests/test_nade.py",
        "tests/test_pixelcnn_sampling.py",
    ],
}


@dataclass(frozen=True)
class Smoke:
    """One small test per GPU backend for the sanitizers: file, test function, further -k words ({be}: the
    backend)."""

    file: str
    function: str
    words: tuple[str, ...] = ("{be}-float32",)
    backends: tuple[str, ...] = ("cuda", "triton")

    def expr(self, backend: str) -> str:
        return " and ".join([self.function, *(w.format(be=backend) for w in self.words)])


SMOKE = (
    Smoke("tests/test_random.py", "test_element_depends_only_on_its_index", ("{be}",)),
    Smoke("tests/test_reparam.py", "test_reparameterize_kl_is_both_ops_in_one"),
    Smoke("tests/test_diffusion.py", "test_diffusion_loss_matches_reference", ("epsilon", "{be}-float32")),
    Smoke("tests/test_diffusion_steps.py", "test_ddim_step_matches_reference", ("epsilon", "{be}-float32")),
    Smoke("tests/test_causal_conv1d.py", "test_backward_matches_reference", ("silu", "{be}-float32")),
    Smoke("tests/test_masked_conv.py", "test_matches_reference_forward_and_backward"),
    Smoke("tests/test_nade.py", "test_gradients_match_reference"),
    Smoke("tests/test_pixelcnn_sampling.py", "test_program_runner_matches_the_reference", ("5-{be}",), ("cuda",)),
)
SANITIZERS = {"memcheck": 50, "racecheck": 40, "synccheck": 30}  # budget (s) of each tool's stage


def smoke_expr(gpu: str) -> str:
    """One -k expression for every smoke test; `gpu` stands for "cuda" (the dry run passes "cpu")."""
    return " or ".join(f"({s.expr(gpu if b == 'cuda' else b)})" for s in SMOKE for b in s.backends)


def smoke_files() -> list[str]:
    return sorted({s.file for s in SMOKE})


# ----------------------------------------------------------------------------------------------- bench
@dataclass(frozen=True)
class BenchGroup:
    """One `genkern bench` process: its own time limit, its own JSON, so a hang loses one group only."""

    name: str
    ops: tuple[str, ...]
    sizes: str
    budget_s: int
    estimate_s: int


BENCH_GROUPS = (
    # memory-bound headline cases at 64M elements (256 MB per float32 tensor, far past the 60 MB L2)
    BenchGroup("elementwise", ("reparameterize_kl", "ddim_step", "causal_conv1d"), "64M", 75, 55),
    # training steps, forward + backward: masked_conv2d at batch 335 of 64 x 28 x 28, NADE at batch 512,
    # PixelCNN++'s loss at 16 x 3 x 32 x 32, K = 10 (time and peak memory against the eager loss); and the
    # sampling head's (64, 32000) top_k/top_p draw (their shapes are fixed, the size is ignored)
    BenchGroup(
        "training",
        ("masked_conv2d", "nade_log_prob", "logistic_mixture_nll", "sample_logits_topk50_topp0.9"),
        "16M",
        60,
        50,
    ),
    # whole loops: the 50-step DDIM loop and the solvers' loops (Heun 25 steps, DPM-Solver++ and UniPC 50) at
    # batch 1 in CUDA graphs against diffusers' scheduler loops (a second or so each), cached PixelCNN 32x32 RGB
    # batch 256, and genkern.sample of the shipped VAE to files (the sampling family)
    BenchGroup(
        "loops",
        ("ddim_loop", "heun_loop", "dpm_solver_loop", "unipc_loop", "pixelcnn_sample_rgb32_b256", "sample_vae_b256"),
        "64M",
        50,
        38,
    ),
)

# The targets, judged on the best genkern backend of each case.
TARGETS = {
    "reparameterize_kl": ("pct_copy_bandwidth>=85,speedup_vs_compile>1", "≥ 85 % of copy and ahead of compile"),
    "ddim_step": ("pct_copy_bandwidth>=85,speedup_vs_compile>1", "≥ 85 % of copy and ahead of compile"),
    "masked_conv2d": ("speedup_vs_eager>=1.3", "≥ 1.3x eager cuDNN"),
    "pixelcnn_sample_rgb32_b256": ("speedup_vs_eager>=200", "≥ 200x naive"),
    "ddim_loop": ("speedup_vs_eager>=5", "≥ 5x the diffusers loop"),
    "heun_loop": ("speedup_vs_eager>=5", "≥ 5x the diffusers loop"),
    "dpm_solver_loop": ("speedup_vs_eager>=5", "≥ 5x the diffusers loop"),
    "unipc_loop": ("speedup_vs_eager>=5", "≥ 5x the diffusers loop"),
}


# ----------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    name: str
    budget_s: int
    estimate_s: int
    what: str
    status: str = "pending"
    seconds: float = 0.0
    note: str = ""


def make_stages() -> list[Stage]:
    stages = [
        Stage("setup", 15, 5, "nvidia-smi, versions, wheels from .whl/"),
        Stage("build", 100, 55, "pip install --target, CUDA for this GPU only, ptxas -v"),
        Stage("tests", 140, 100, f"pytest -k '{TEST_EXPR.format(gpu='cuda')}' -m '{TEST_MARKERS}'"),
    ]
    smoke = sum(len(s.backends) for s in SMOKE)
    stages += [
        Stage(tool, budget, budget - 10, f"compute-sanitizer --tool {tool} on {smoke} smoke tests")
        for tool, budget in SANITIZERS.items()
    ]
    stages.append(
        Stage(
            "bench",
            sum(g.budget_s for g in BENCH_GROUPS),
            sum(g.estimate_s for g in BENCH_GROUPS),
            "genkern bench: " + "; ".join(f"{','.join(g.ops)} @{g.sizes}" for g in BENCH_GROUPS),
        )
    )
    return stages


class Run:
    """Paths, environment and the clock shared by the stages."""

    def __init__(self, args: argparse.Namespace):
        self.t0 = time.monotonic()
        self.deadline = args.deadline
        self.out = Path(args.outdir).resolve()
        self.work = Path(args.work).resolve()
        self.bundle = args.bundle
        self.logs = (self.work / "logs") if self.bundle else (self.out / "logs")
        self.prefix = self.work / "prefix"
        self.site = self.work / "site"
        self.python = sys.executable
        self.cc: str | None = None
        self.device = ""
        self.bench_json: Path | None = None
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(self.work / "triton-cache"))

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    def child_env(self, **extra) -> dict:
        path = [str(self.prefix), str(self.site), *filter(None, [os.environ.get("PYTHONPATH")])]
        return dict(self.env, PYTHONPATH=os.pathsep.join(path), **extra)

    def pack(self) -> None:
        if self.bundle and self.logs.is_dir():
            with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
                tar.add(self.logs, arcname="logs")


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict, cwd: Path = ROOT) -> tuple[int, float, bool]:
    """cmd with stdout and stderr appended to `log`, stopped (its whole process group) at `timeout`: SIGINT
    first, so pytest still writes its JUnit XML and summary for the tests it ran, then SIGTERM, then SIGKILL
    (at most KILL_GRACE_S after the timeout). Returns (exit status, seconds, timed out)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGINT, 8), (signal.SIGTERM, 4), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode if proc.returncode is not None else -9
            f.write(f"\n[killed after {timeout:.0f} s]\n")
    return rc, time.monotonic() - start, timed_out


def tail(log: Path, lines: int = 12) -> str:
    try:
        return "\n".join("    " + s for s in log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------- commands
def build_command(run: Run) -> list[str]:
    return [
        run.python,
        "-m",
        "pip",
        "install",
        "-v",
        "--no-build-isolation",
        "--no-deps",
        "--no-cache-dir",
        "--target",
        str(run.prefix),
        f"--config-settings=build-dir={run.work / 'build'}",
        ".",
    ]


# -Xptxas=-v: registers, stack frame and spills per kernel; -lineinfo: source lines in compute-sanitizer's
# reports (line tables only, the same machine code).
CUDA_FLAGS = "-Xptxas=-v -lineinfo"


def build_env(run: Run, cc: str) -> dict:
    return dict(
        run.env,
        GENKERN_CUDA="ON",
        GENKERN_CUDA_ARCHITECTURES=cc,
        GENKERN_CUDA_FLAGS=CUDA_FLAGS,
        CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1),
    )


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def pytest_plugins_args(workers: bool) -> list[str]:
    """xdist and pytest-timeout where installed (the GPU image has both)."""
    args = []
    if workers and has_module("xdist"):
        args += ["-n", str(min(8, max(1, (os.cpu_count() or 1) // 2)))]
    if has_module("pytest_timeout"):
        args += ["--timeout", "120"]
    return args


def tests_command(run: Run, gpu: str = "cuda", collect: bool = False) -> list[str]:
    cmd = [
        run.python,
        "-m",
        "pytest",
        *TEST_PATHS,
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        TEST_EXPR.format(gpu=gpu),
        "-m",
        TEST_MARKERS,
    ]
    if collect:
        return cmd + ["--collect-only"]
    return cmd + ["--maxfail", "200", f"--junitxml={run.out / 'junit.xml'}", *pytest_plugins_args(True)]


def sanitizer_command(run: Run, tool: str, gpu: str = "cuda", collect: bool = False) -> list[str]:
    pytest = [run.python, "-m", "pytest", *smoke_files(), "-p", "no:cacheprovider", "-k", smoke_expr(gpu)]
    if collect:
        return pytest + ["-q", "--collect-only"]
    pytest.append("-v")  # one line per test: a sanitizer report or a hang is attributed to its test
    return [
        "compute-sanitizer",
        "--tool",
        tool,
        "--error-exitcode",
        "99",
        "--print-limit",
        "20",
        *pytest,
        *pytest_plugins_args(False),
    ]


def bench_command(run: Run, group: BenchGroup, output: Path) -> list[str]:
    return [
        run.python,
        "-m",
        "genkern",
        "bench",
        "--device",
        "cuda",
        "--ops",
        ",".join(group.ops),
        "--sizes",
        group.sizes,
        "--output",
        str(output),
    ]


# ----------------------------------------------------------------------------------------------- stages, for real
def stage_setup(run: Run, stage: Stage, timeout: float) -> None:
    log = run.logs / "setup.log"
    query = [
        "nvidia-smi",
        "--query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm",
        "--format=csv,noheader",
    ]
    rc, _, _ = run_logged(query, log, min(timeout, 20), run.env)
    lines = [s for s in log.read_text().splitlines() if s and not s.startswith("$")]
    fields = [f.strip() for f in lines[-1].split(",")] if rc == 0 and lines else []
    if len(fields) < 2:
        stage.status, stage.note = "FAIL", "nvidia-smi gave no compute capability"
        return
    run.device, run.cc = fields[0], fields[1].replace(".", "")
    for cmd in (
        ["nvcc", "--version"],
        ["compute-sanitizer", "--version"],
        [
            run.python,
            "-c",
            "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,"
            " 'gpu', torch.cuda.is_available(), 'triton', triton.__version__)",
        ],
    ):
        if shutil.which(cmd[0]) or cmd[0] == run.python:
            run_logged(cmd, log, 20, run.env)
    if "gpu False" in log.read_text():
        stage.status, stage.note = "FAIL", "torch sees no GPU"
        return
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels:
        rc, _, _ = run_logged(
            [
                run.python,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--upgrade",
                "--target",
                str(run.site),
                *map(str, wheels),
            ],
            log,
            max(5, timeout - 5),
            run.env,
        )
        if rc != 0:
            stage.status, stage.note = "FAIL", "wheels from .whl/ did not install"
            return
    stage.status = "ok"
    stage.note = f"{run.device}, cc {fields[1]}, {len(wheels)} wheels" + ("" if wheels else " (no diffusers)")


PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
NINJA_CUDA = re.compile(r"Building CUDA object \S*?((?:kernels|csrc)/\S+?\.cu)\.o")


def parse_ptxas(text: str) -> list[dict]:
    """One record per kernel entry in nvcc's -Xptxas -v output, with the .cu file ninja was building."""
    kernels, source, current, properties_of = [], "?", None, None
    for line in text.splitlines():
        if m := NINJA_CUDA.search(line):
            source = m[1]
        if m := PTXAS_ENTRY.search(line):
            current = {
                "file": source,
                "kernel": m[1],
                "arch": m[2],
                "registers": 0,
                "stack": 0,
                "spill_stores": 0,
                "spill_loads": 0,
                "smem": 0,
            }
            kernels.append(current)
        elif m := PTXAS_PROPERTIES.search(line):
            properties_of = m[1]  # an entry's, or a non-inlined device function's
        elif current is not None and (m := PTXAS_FRAME.search(line)):
            if properties_of == current["kernel"]:
                current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := PTXAS_REGS.search(line)):
            current["registers"] = int(m[1])
            if s := PTXAS_SMEM.search(line):
                current["smem"] = int(s[1])
    names = demangle([k["kernel"] for k in kernels])
    for k, name in zip(kernels, names):
        k["name"] = name
    return kernels


def demangle(names: list[str]) -> list[str]:
    for tool in ("c++filt", "cu++filt"):
        if names and shutil.which(tool):
            try:
                out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30).stdout
                lines = out.splitlines()
                if len(lines) == len(names):
                    return lines
            except (OSError, subprocess.SubprocessError):
                pass
    return list(names)


def ptxas_report(kernels: list[dict]) -> tuple[str, str]:
    """(the table for ptxas.txt, a one-line summary)."""
    if not kernels:
        return "no ptxas -v output in the build log\n", "no ptxas figures (GENKERN_CUDA_FLAGS not honoured?)"
    rows = [f"{'file':40} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}  kernel"]
    for k in sorted(kernels, key=lambda k: (k["file"], -k["registers"])):
        name = k["name"] if len(k["name"]) <= 100 else k["name"][:97] + "..."
        rows.append(
            f"{k['file']:40} {k['registers']:>4} {k['stack']:>5} {k['spill_stores']:>5}/{k['spill_loads']:<5} "
            f"{k['smem']:>6}  {name}"
        )
    spilling = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    stacked = [k for k in kernels if k["stack"]]
    top = max(kernels, key=lambda k: k["registers"])
    summary = (
        f"{len(kernels)} kernels ({kernels[0]['arch']}), registers max {top['registers']} "
        f"(median {statistics.median(k['registers'] for k in kernels):.0f}), "
        f"{len(spilling)} spilling, {len(stacked)} with a stack frame"
    )
    lines = rows + ["", summary, f"most registers: {top['name'][:160]}"]
    lines += [f"spills: {k['spill_stores']}/{k['spill_loads']} B in {k['file']} {k['name'][:120]}" for k in spilling]
    return "\n".join(lines) + "\n", summary


def stage_build(run: Run, stage: Stage, timeout: float) -> None:
    log = run.logs / "build.log"
    for path in (run.prefix, run.work / "build"):
        shutil.rmtree(path, ignore_errors=True)
    rc, seconds, timed_out = run_logged(build_command(run), log, timeout, build_env(run, run.cc))
    kernels = parse_ptxas(log.read_text(errors="replace"))
    table, summary = ptxas_report(kernels)
    (run.out / "ptxas.txt").write_text(table)
    if rc != 0:
        stage.status = "TIMEOUT" if timed_out else "FAIL"
        stage.note = f"pip install exited {rc} after {seconds:.0f} s"
        return
    check = [
        run.python,
        "-c",
        "import genkern, genkern._native as n; assert n.with_cuda(), 'built without CUDA'; "
        "print(genkern.__file__, genkern.backends())",
    ]
    rc, _, _ = run_logged(check, log, 30, run.child_env())
    stage.status = "ok" if rc == 0 else "FAIL"
    stage.note = f"built in {seconds:.0f} s; {summary}" if rc == 0 else "the built module does not import with CUDA"
    print(f"  build time {seconds:.1f} s; {summary} (table: ptxas.txt)", flush=True)


def junit_summary(path: Path) -> tuple[dict, str]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts, "no JUnit XML"
    for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts, (
        f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    )


def stage_tests(run: Run, stage: Stage, timeout: float) -> None:
    log = run.logs / "tests.log"
    rc, seconds, timed_out = run_logged(tests_command(run), log, timeout, run.child_env(GENKERN_REQUIRE_CUDA_BUILD="1"))
    _, line = junit_summary(run.out / "junit.xml")
    stage.status = "TIMEOUT" if timed_out else ("ok" if rc == 0 else "FAIL")
    stage.note = line
    print(f"  tests: {line} in {seconds:.0f} s (junit.xml)", flush=True)


SANITIZER_SUMMARY = re.compile(r"(ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: [^\n]*)")
PYTEST_RESULT = re.compile(r"^=*\s*(\d+ (?:passed|failed|error)[^=\n]*?)\s*=*$", re.M)


def stage_sanitizer(run: Run, stage: Stage, timeout: float) -> None:
    tool, log = stage.name, run.logs / f"{stage.name}.log"
    if not shutil.which("compute-sanitizer"):
        stage.status, stage.note = "n/a", "compute-sanitizer not found"
        return
    extra = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {}  # a tensor per allocation
    rc, seconds, timed_out = run_logged(sanitizer_command(run, tool), log, timeout, run.child_env(**extra))
    text = log.read_text(errors="replace")
    found = SANITIZER_SUMMARY.findall(text)
    tests = PYTEST_RESULT.findall(text)
    if "Device not supported" in text:
        stage.status, stage.note = "n/a", "compute-sanitizer: device not supported on this machine"
        return
    stage.status = "TIMEOUT" if timed_out else ("ok" if rc == 0 else "FAIL")
    stage.note = "; ".join(
        filter(
            None,
            [
                found[-1] if found else "no sanitizer summary",
                tests[-1] if tests else "",
                "sanitizer errors" if rc == 99 else "",
            ],
        )
    )


def merge_reports(parts: list[tuple[BenchGroup, dict]]) -> dict:
    """One report in genkern bench's format from several runs of it: the first part's run-level fields, every
    row tagged with its part's copy bandwidth (its % of copy is against that), the parts listed."""
    first = parts[0][1]
    merged = {k: v for k, v in first.items() if k != "rows"}
    merged["rows"], merged["parts"] = [], []
    for group, report in parts:
        for row in report["rows"]:
            merged["rows"].append({**row, "copy_bandwidth_gbps": report["copy_bandwidth_gbps"], "group": group.name})
        merged["parts"].append(
            {
                "group": group.name,
                "command": report.get("command"),
                "copy_bandwidth_gbps": report["copy_bandwidth_gbps"],
                "elapsed_s": report.get("elapsed_s"),
            }
        )
    merged["elapsed_s"] = round(sum(p["elapsed_s"] or 0 for p in merged["parts"]), 1)
    merged["command"] = first.get("command", [])
    return merged


def stage_bench(run: Run, stage: Stage, timeout: float) -> None:
    parts, notes, clean = [], [], True
    end = time.monotonic() + timeout
    for group in BENCH_GROUPS:
        left = end - time.monotonic()
        if left < 10:
            notes.append(f"{group.name}: no time left")
            clean = False
            continue
        output = run.work / f"bench-{group.name}.json"
        output.unlink(missing_ok=True)
        rc, seconds, timed_out = run_logged(
            bench_command(run, group, output),
            run.logs / f"bench-{group.name}.log",
            min(group.budget_s, left),
            run.child_env(),
        )
        if output.is_file():
            parts.append((group, json.loads(output.read_text())))
        clean = clean and rc == 0 and output.is_file()
        notes.append(f"{group.name} " + ("timeout" if timed_out else f"rc {rc}") + f" {seconds:.0f}s")
    if not parts:
        stage.status, stage.note = "FAIL", "; ".join(notes)
        return
    merged = merge_reports(parts)
    slug = merged.get("device_slug", "cuda")
    results = ROOT / "benchmarks" / "results" / f"{slug}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    for path in (results, run.out / f"{slug}.json"):
        path.write_text(json.dumps(merged, indent=2) + "\n")
    run.bench_json = run.out / f"{slug}.json"
    stage.status = "ok" if clean else "FAIL"
    stage.note = "; ".join(notes) + f" -> {run.bench_json.name}"


# ----------------------------------------------------------------------------------------------- summary
def best_rows(report: dict) -> dict[str, list[dict]]:
    """Per op (first size), the genkern rows, fastest first."""
    per_op: dict[str, list[dict]] = {}
    first_size: dict[str, int] = {}
    for row in report["rows"]:
        first_size.setdefault(row["op"], row["size"])
        if row["impl"].startswith("genkern:") and row["size"] == first_size[row["op"]]:
            per_op.setdefault(row["op"], []).append(row)
    for rows in per_op.values():
        rows.sort(key=lambda r: r.get("time_ms") or float("inf"))
    return per_op


def judge(row: dict, rule: str) -> bool:
    for clause in rule.split(","):
        key, op, value = re.fullmatch(r"(\w+)(>=|>)([\d.]+)", clause).groups()
        got = row.get(key)
        if got is None or not (got >= float(value) if op == ">=" else got > float(value)):
            return False
    return True


def bench_table(report: dict) -> str:
    def fmt(v, spec, suffix=""):
        return "-" if v is None else format(v, spec) + suffix

    header = f"{'case':28} {'impl':15} {'ms':>10} {'vs eager':>9} {'vs compile':>10} {'% copy':>7} {'rate':>12}"
    copies = ", ".join(f"{p['group']} {p['copy_bandwidth_gbps']:.4g}" for p in report.get("parts", []))
    lines = [
        f"bench: {report.get('device', '?')}; copy bandwidth (GB/s, read + write): "
        f"{copies or fmt(report.get('copy_bandwidth_gbps'), '.4g')}",
        header,
        "-" * len(header),
    ]
    per_op = best_rows(report)
    for op, rows in per_op.items():
        for row in rows:
            if row.get("error"):
                lines.append(f"{op:28} {row['impl']:15} failed: {row['error'][:60]}")
                continue
            rate = f"{row['items_per_s']:.3g} {row['item_unit']}/s" if row.get("items_per_s") else "-"
            lines.append(
                f"{op:28} {row['impl']:15} {fmt(row.get('time_ms'), '.3f'):>10} "
                f"{fmt(row.get('speedup_vs_eager'), '.2f', 'x'):>9} "
                f"{fmt(row.get('speedup_vs_compile'), '.2f', 'x'):>10} "
                f"{fmt(row.get('pct_copy_bandwidth'), '.0f', '%'):>7} {rate:>12}"
            )
    targets = []
    for op, (rule, text) in TARGETS.items():
        rows = [r for r in per_op.get(op, []) if not r.get("error")]
        if not rows:
            targets.append(f"  {op}: {text}: not measured")
            continue
        met = [r["impl"] for r in rows if judge(r, rule)]
        targets.append(f"  {op}: {text}: " + (f"met by {', '.join(met)}" if met else "not met"))
    return "\n".join(lines + ["targets (from the numbers above):", *targets])


def summary_text(stages: list[Stage], report: dict | None) -> str:
    header = f"{'stage':10} {'status':8} {'time':>7} {'budget':>6}  note"
    lines = ["", "=" * 100, "GPU run summary", header, "-" * len(header)]
    for s in stages:
        lines.append(f"{s.name:10} {s.status:8} {s.seconds:6.0f}s {s.budget_s:5d}s  {s.note}")
    lines.append(f"{'total':10} {'':8} {sum(s.seconds for s in stages):6.0f}s {sum(s.budget_s for s in stages):5d}s")
    if report is not None:
        lines += ["", bench_table(report)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the real run
RUNNERS = {
    "setup": stage_setup,
    "build": stage_build,
    "tests": stage_tests,
    "bench": stage_bench,
    **{tool: stage_sanitizer for tool in SANITIZERS},
}


def real_run(run: Run, stages: list[Stage], selected: set[str]) -> int:
    run.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run.logs, ignore_errors=True)  # no stale logs from an earlier call on the same machine
    run.logs.mkdir(parents=True)
    selected = selected | {"setup"}  # every other stage needs the compute capability it reads
    print(plan_text(stages, run.deadline), flush=True)
    for stage in stages:
        if stage.name not in selected:
            stage.status = "skipped"
            continue
        if stage.name != "setup":
            if run.cc is None:
                stage.status, stage.note = "skipped", "no GPU found by setup"
                continue
            if stage.name != "build" and not (run.prefix / "genkern").is_dir():
                stage.status, stage.note = "skipped", "no build"
                continue
        timeout = min(stage.budget_s, run.left() - RESERVE_S)
        if timeout < 10:
            stage.status, stage.note = "skipped", "no time left"
            continue
        print(f"[{time.monotonic() - run.t0:5.0f}s] {stage.name} (limit {timeout:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            RUNNERS[stage.name](run, stage, timeout)
        except Exception as exc:  # noqa: BLE001 - a broken stage must not stop the others or the summary
            stage.status, stage.note = "FAIL", f"driver error: {type(exc).__name__}: {exc}"
        stage.seconds = time.monotonic() - start
        if stage.status not in ("ok", "n/a"):
            logs = sorted(run.logs.glob(f"{stage.name}*.log"))
            if logs:
                print(tail(logs[-1]), flush=True)
        run.pack()
    report = json.loads(run.bench_json.read_text()) if run.bench_json else None
    text = summary_text(stages, report)
    (run.out / "summary.txt").write_text(text + "\n")
    run.pack()
    print(text, flush=True)
    return 0 if all(s.status in ("ok", "n/a", "skipped") for s in stages if s.name in selected) else 1


def plan_text(stages: list[Stage], deadline: float) -> str:
    header = f"{'stage':10} {'budget':>6} {'estimate':>8}  what"
    lines = ["GPU run plan", header, "-" * len(header)]
    lines += [f"{s.name:10} {s.budget_s:5d}s {s.estimate_s:7d}s  {s.what}" for s in stages]
    lines.append(
        f"{'total':10} {sum(s.budget_s for s in stages):5d}s {sum(s.estimate_s for s in stages):7d}s  "
        f"(deadline {deadline:.0f} s, one device call {CALL_LIMIT_S} s)"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the dry run
@dataclass
class Checks:
    failures: list[str] = field(default_factory=list)

    def ok(self, text: str) -> None:
        print(f"  ok    {text}")

    def note(self, text: str) -> None:
        print(f"  note  {text}")

    def fail(self, text: str) -> None:
        print(f"  FAIL  {text}")
        self.failures.append(text)

    def expect(self, condition: bool, text: str) -> bool:
        (self.ok if condition else self.fail)(text)
        return condition


def collect(cmd: list[str]) -> tuple[int, list[str], str]:
    """Node ids that `pytest --collect-only -q` prints."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    ids = [line for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    return proc.returncode, ids, proc.stdout + proc.stderr


def bench_registry():
    """The bench cases by name, and where they came from: before the family-major move the registry is
    genkern.bench_cases.CASES, after it genkern.bench.all_cases()."""
    try:
        from genkern.bench_cases import CASES  # type: ignore[import-not-found]

        return {c.name: c for c in CASES}, "genkern.bench_cases.CASES"
    except ImportError:
        from genkern.bench import all_cases

        return {c.name: c for c in all_cases()}, "genkern.bench.all_cases()"


def dry_run(run: Run, stages: list[Stage]) -> int:
    checks = Checks()
    print(plan_text(stages, run.deadline))
    print("\ndry run: checking every stage without a GPU")

    print("[plan]")
    total = sum(s.budget_s for s in stages)
    checks.expect(
        total + RESERVE_S <= run.deadline <= CALL_LIMIT_S - KILL_GRACE_S - 15,
        f"budgets {total} s + {RESERVE_S} s reserve fit the deadline {run.deadline:.0f} s, inside one "
        f"{CALL_LIMIT_S} s call",
    )
    rc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu/run.sh")]).returncode
    checks.expect(rc == 0, "bash -n benchmarks/gpu/run.sh")

    print("[build]")
    cmake = (ROOT / "CMakeLists.txt").read_text()
    defines = {}
    if tomllib is None:
        checks.note("no tomllib (Python < 3.11): pyproject.toml's cmake defines unchecked")
    else:
        try:
            defines = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]["cmake"]["define"]
        except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
            checks.fail(f"pyproject.toml [tool.scikit-build.cmake.define]: {exc}")
    for name in ("GENKERN_CUDA", "GENKERN_CUDA_ARCHITECTURES", "GENKERN_CUDA_FLAGS"):
        env = defines.get(name, {}).get("env") if isinstance(defines.get(name), dict) else None
        checks.expect(
            (env == name or tomllib is None) and name in cmake,
            f"{name}: read from the environment by pyproject.toml and used by CMakeLists.txt",
        )
    pip_help = subprocess.run([run.python, "-m", "pip", "install", "--help"], capture_output=True, text=True).stdout
    flags = [a for a in build_command(run) if a.startswith("--")]
    missing = [f for f in flags if f.split("=")[0] not in pip_help]
    checks.expect(
        not missing,
        f"pip install knows {' '.join(f.split('=')[0] for f in flags)}" + (f" (missing: {missing})" if missing else ""),
    )
    for module in ("scikit_build_core", "pybind11"):
        (checks.ok if has_module(module) else checks.note)(f"{module} importable here (the GPU image has it)")
    (checks.ok if shutil.which("nvcc") else checks.note)("nvcc on PATH here")
    print(f"        would run: {shlex.join(build_command(run))}")
    print(
        f"        with GENKERN_CUDA=ON GENKERN_CUDA_ARCHITECTURES=<nvidia-smi compute_cap> "
        f"GENKERN_CUDA_FLAGS='{CUDA_FLAGS}' CMAKE_BUILD_PARALLEL_LEVEL={os.cpu_count()}"
    )
    sample = (
        "[12/30] Building CUDA object CMakeFiles/_C.dir/kernels/x/x.cu.o\n"
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 512 bytes smem, 380 bytes cmem[0]\n"
    )
    parsed = parse_ptxas(sample)
    checks.expect(
        len(parsed) == 1
        and parsed[0]["registers"] == 40
        and parsed[0]["spill_stores"] == 4
        and parsed[0]["file"] == "kernels/x/x.cu"
        and parsed[0]["smem"] == 512,
        "the ptxas -v parser reads a sample",
    )

    print("[tests]")
    for path in [*TEST_PATHS, GRAPH_TESTS, *(f for files in FAMILY_TEST_FILES.values() for f in files)]:
        if not (ROOT / path).exists():
            checks.fail(f"{path} is missing")
    rc, ids, output = collect(tests_command(run, gpu="cpu", collect=True))
    if checks.expect(
        rc == 0 and ids, f"pytest --collect-only of the GPU selection (cuda -> cpu here): {len(ids)} tests"
    ):
        for family, files in FAMILY_TEST_FILES.items():
            count = sum(1 for i in ids for f in files if i.startswith(f + "::"))
            checks.expect(count > 0, f"{family}: {count} backend-parametrised tests selected in {', '.join(files)}")
        graphs = sum(1 for i in ids if i.startswith(GRAPH_TESTS + "::"))
        checks.expect(graphs > 0, f"{GRAPH_TESTS}: {graphs} CUDA-graph tests collected (they skip without a GPU)")
    else:
        print(tail_text(output))
    print(f"        would run: {shlex.join(tests_command(run))}")
    (checks.ok if has_module("xdist") else checks.note)("pytest-xdist here (on the GPU image: -n 8)")

    print("[sanitizers]")
    rc, ids, output = collect(sanitizer_command(run, "memcheck", gpu="cpu", collect=True))
    triton_here = any("triton" in i for i in ids)
    if checks.expect(rc == 0 and ids, f"pytest --collect-only of the smoke subset: {len(ids)} tests"):
        for s in SMOKE:
            for b in s.backends:
                here = "cpu" if b == "cuda" else b
                n = sum(1 for i in ids if i.startswith(f"{s.file}::{s.function}[") and here in i)
                if b == "triton" and not triton_here:
                    checks.note(f"{s.file}::{s.function} [{b}]: triton not usable here, unchecked")
                else:
                    checks.expect(n >= 1, f"{s.file}::{s.function} [{b}]: {n} test(s) (as {here} here)")
    else:
        print(tail_text(output))
    print(f"        would run: {shlex.join(sanitizer_command(run, 'memcheck'))[:400]} ...")
    (checks.ok if shutil.which("compute-sanitizer") else checks.note)("compute-sanitizer here (GPU image only)")

    print("[bench]")
    try:
        cases, source = bench_registry()
        checks.ok(f"bench registry: {len(cases)} cases from {source}")
    except Exception as exc:  # noqa: BLE001
        cases, source = {}, None
        checks.fail(f"bench registry does not import: {type(exc).__name__}: {exc}")
    if cases:
        from genkern import backend as gk_backend
        from genkern.bench import parse_size

        for group in BENCH_GROUPS:
            size = parse_size(group.sizes)
            for op in group.ops:
                case = cases.get(op)
                if not checks.expect(case is not None, f"bench case {op} exists"):
                    continue
                try:
                    case.shape(size)
                    gpu = [b for b in ("cuda", "triton") if gk_backend.has_family(b, case.family)]
                    checks.expect(
                        bool(gpu),
                        f"  {op} ({case.family}) @{group.sizes}: shape {tuple(case.shape(size))}, "
                        f"GPU backends {', '.join(gpu)}",
                    )
                except Exception as exc:  # noqa: BLE001
                    checks.fail(f"  {op} @{group.sizes}: {type(exc).__name__}: {exc}")
        timed = {op for g in BENCH_GROUPS for op in g.ops}
        families = {c.family for c in cases.values()}
        missing = sorted(f for f in families if not any(cases[o].family == f for o in timed if o in cases))
        checks.expect(
            not missing,
            f"every bench family has a case in the selection ({', '.join(sorted(families))})"
            + (f": missing {missing}" if missing else ""),
        )
    helptext = subprocess.run(
        [run.python, "-m", "genkern", "bench", "--help"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    used = [a for a in bench_command(run, BENCH_GROUPS[0], Path("x.json")) if a.startswith("--")]
    checks.expect(all(f in helptext for f in used), f"genkern bench knows {' '.join(used)}")
    if "--list" in helptext:
        listed = subprocess.run(
            [run.python, "-m", "genkern", "bench", "--list"], capture_output=True, text=True, cwd=ROOT
        ).stdout
        absent = [op for g in BENCH_GROUPS for op in g.ops if op not in listed]
        checks.expect(
            not absent, "genkern bench --list shows every selected case" + (f" (not: {absent})" if absent else "")
        )
    else:
        checks.note("genkern bench has no --list yet: names checked against the registry only")
    (checks.ok if has_module("diffusers") else checks.note)(
        "diffusers here (ddim_loop's baseline; carry it as a wheel to the GPU: benchmarks/gpu/wheels.sh)"
    )
    wheels = sorted(p.name for p in (ROOT / ".whl").glob("*.whl"))
    (checks.ok if any(w.startswith("diffusers-") for w in wheels) else checks.note)(
        f".whl/ holds {', '.join(wheels) or 'no wheels'}"
    )
    for group in BENCH_GROUPS:
        print(f"        would run: {shlex.join(bench_command(run, group, run.work / f'bench-{group.name}.json'))}")

    print("[summary]")
    existing = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    if existing:
        try:
            report = merge_reports([(BENCH_GROUPS[0], json.loads(existing[0].read_text()))])
            demo = make_stages()
            for s in demo:
                s.status, s.seconds, s.note = "ok", float(s.estimate_s), "(dry run: the estimate)"
            text = summary_text(demo, report)
            checks.ok(f"summary rendered from {existing[0].relative_to(ROOT)}")
            print("\n".join("        " + line for line in text.splitlines()[-14:]))
        except Exception as exc:  # noqa: BLE001
            checks.fail(f"summary from {existing[0].name}: {type(exc).__name__}: {exc}")
    else:
        checks.note("no results JSON in benchmarks/results to render a summary from")

    print()
    if checks.failures:
        print(f"dry run: {len(checks.failures)} problem(s):")
        for f in checks.failures:
            print(f"  - {f}")
        return 1
    print("dry run: every stage checks out")
    return 0


def tail_text(text: str, lines: int = 15) -> str:
    return "\n".join("    " + s for s in text.splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------- main
def gpu_present() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def main(argv: list[str] | None = None) -> int:
    stage_names = [s.name for s in make_stages()]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="output folder: logs, junit.xml, ptxas.txt, <device>.json, summary.txt")
    parser.add_argument(
        "--dry-run", action="store_true", help="check everything, run nothing (automatic without a GPU)"
    )
    parser.add_argument(
        "--bundle",
        action="store_true",
        help="keep live logs in the work folder and pack them into OUTDIR/logs.tar.gz after each stage "
        "(for the device call, whose OUTDIR returns at most 8 files)",
    )
    parser.add_argument("--stages", default=",".join(stage_names), help=f"comma-separated subset of {stage_names}")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole run")
    parser.add_argument("--work", default="/tmp/genkern-gpu", help="build folder, prefix, wheels site, Triton cache")
    args = parser.parse_args(argv)
    selected = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = selected - set(stage_names)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; known: {stage_names}")
    run, stages = Run(args), make_stages()
    if args.dry_run or not gpu_present():
        if not args.dry_run:
            print("no GPU here (nvidia-smi -L failed): dry run\n")
        return dry_run(run, stages)
    return real_run(run, stages, selected)


if __name__ == "__main__":
    sys.exit(main())
