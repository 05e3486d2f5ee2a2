"""Every ```python block of README.md runs as written, each in a fresh namespace.

The README promises examples that work on a fresh CPU-only install; this test keeps that promise. A block
that raises (a name it never defines, a wrong signature, an "equivalent to" check that does not hold) fails
its test case, reported at the README's own line numbers. There are no blocks meant not to run: every
example must be runnable, and fast (the whole file takes a few seconds).
"""

import pathlib
import re

import pytest
import torch

import genkern

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def _blocks() -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block, in order."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def _label(code: str) -> str:
    first = next((line.strip() for line in code.splitlines() if line.strip()), "(empty)")
    first = first.lstrip("#").strip()
    return first if len(first) <= 60 else first[:57] + "..."


BLOCKS = _blocks()


def test_readme_has_python_examples():
    assert BLOCKS, f"no ```python blocks found in {README}"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i}-{_label(code)}" for i, (_, code) in enumerate(BLOCKS)])
def test_readme_example_runs(index):
    line, code = BLOCKS[index]
    # Padding with newlines makes tracebacks point at the README's own lines.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    previous_backend = genkern.get_backend()
    try:
        with torch.random.fork_rng():  # a block's torch.manual_seed must not leak into other tests
            exec(compiled, {"__name__": f"readme_block_{index}"})
    finally:
        genkern.set_backend(previous_backend)  # nor a process-wide backend choice
