"""Choosing a backend: refused at once when it cannot run here, and scoped choices stay in their context."""

import threading

import pytest
import torch

import genkern
from genkern import backend as gk_backend


def test_set_backend_refuses_a_backend_this_process_cannot_run():
    missing = [name for name in gk_backend.BACKENDS if not gk_backend.is_available(name)]
    if not missing:
        pytest.skip("every backend is available on this machine (a GPU with CUDA and Triton)")
    before = genkern.get_backend()
    with pytest.raises(ValueError, match=repr(missing[0])):
        genkern.set_backend(missing[0])
    assert genkern.get_backend() == before


def test_set_backend_refuses_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        genkern.set_backend("fast")


def test_a_scoped_choice_is_per_thread():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with gk_backend.scoped(name):
            barrier.wait()  # both threads are inside their scopes at once
            seen[name] = gk_backend.selected(torch.device("cpu"), torch.float32)
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("cpu", "reference")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"cpu": "cpu", "reference": "reference"}
    assert gk_backend.scoped_choice() is None


def test_set_backend_blocks_in_threads_leave_the_process_choice_alone():
    """Four threads scope different backends at once (the race of issue 16 left the process choice changed):
    each sees its own, and the process-wide choice is the same after."""
    before = genkern.get_backend()
    names = ["cpu", "reference", "cpu", "reference"]
    barrier = threading.Barrier(len(names))
    seen, errors = {}, []

    def worker(i, name):
        try:
            for _ in range(50):
                with genkern.set_backend(name):
                    barrier.wait()
                    seen.setdefault(i, set()).add(genkern.get_backend())
                    x = torch.randn(8, dtype=torch.float64)
                    assert genkern.reparameterize(x, x, seed=1).shape == x.shape
                    assert gk_backend.selected(torch.device("cpu"), torch.float32) == name
        except Exception as exc:  # noqa: BLE001 - reported below, with the thread's name
            errors.append((name, exc))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert seen == {i: {n} for i, n in enumerate(names)}
    assert genkern.get_backend() == before


def test_the_plain_call_is_process_wide_and_a_block_inside_it_is_scoped():
    before = genkern.get_backend()
    try:
        genkern.set_backend("reference")
        seen = []
        thread = threading.Thread(target=lambda: seen.append(genkern.get_backend()))
        thread.start()
        thread.join()
        assert seen == ["reference"]  # the plain call reaches every thread
        with genkern.set_backend("cpu"):
            assert gk_backend.selected(torch.device("cpu"), torch.float32) == "cpu"
            assert genkern.get_backend() == "cpu"
        assert genkern.get_backend() == "reference"
        with genkern.set_backend(None):  # automatic inside the block
            assert gk_backend.selected(torch.device("cpu"), torch.float32) == "cpu"
        assert gk_backend.selected(torch.device("cpu"), torch.float32) == "reference"
    finally:
        genkern.set_backend(before)
