"""The package as installed: compiled core, CUDA kernels when CI requires them, Triton kernels in the wheel."""

import os
from pathlib import Path

import genkern
from genkern import _native


def test_compiled_core_imports():
    assert _native.available(), _native.IMPORT_ERROR
    assert "cpu" in genkern.backends() and "reference" in genkern.backends()


def test_cuda_kernels_built_when_required():
    # CI sets GENKERN_REQUIRE_CUDA_BUILD: nvcc is there, so a module without CUDA kernels is a build failure.
    required = os.environ.get("GENKERN_REQUIRE_CUDA_BUILD", "") not in ("", "0")
    assert _native.with_cuda() or not required


def test_triton_kernels_ship_inside_the_package():
    import genkern.kernels.reparam.reparam as triton_reparam

    package_dir = Path(genkern.__file__).resolve().parent
    assert package_dir in Path(triton_reparam.__file__).resolve().parents
