"""The `genkern` command answers help and command-line mistakes without importing torch (seconds on a cold
machine): only running a command loads the engine."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

# Runs the console script's target on ARGS in a fresh interpreter and prints whether torch got imported.
RUN = """
import sys
from _genkern_cli import main
try:
    main(ARGS)
except SystemExit as exc:
    print("exit", exc.code)
print("torch imported:", "torch" in sys.modules)
"""

COMMANDS = [
    (["--help"], 0),
    (["--version"], 0),
    (["bench", "--help"], 0),
    (["sample", "--help"], 0),
    (["bench", "--bogus"], 2),
    (["bench", "--repeats", "0"], 2),
    (["bench", "--dtype", "int3"], 2),
    (["bench", "--all", "--ops", "q_sample"], 2),
    (["sample", "nomodel", "--n", "4"], 2),
    (["nope"], 2),
]


def _run(args: list[str]) -> str:
    script = f"ARGS = {args!r}\n" + RUN
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout


def test_the_console_script_starts_outside_the_package():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "genkern"]
    assert script.value == "_genkern_cli:main"


@pytest.mark.parametrize(("args", "code"), COMMANDS, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_help_and_usage_errors_do_not_import_torch(args, code):
    out = _run(args)
    assert f"exit {code}" in out and "torch imported: False" in out


def test_a_command_does_import_torch():
    """The check above can fail: the same harness sees torch once a command runs."""
    assert "torch imported: True" in _run(["info"])


def test_model_names_are_the_checkpoint_registry():
    import _genkern_cli
    from genkern import _checkpoints

    assert set(_genkern_cli.MODEL_NAMES) == set(_checkpoints.model_classes())
