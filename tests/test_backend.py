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
