"""Shared setup for the runtime tests.

Triton kernels run on CPU tensors through the Triton interpreter: ``TRITON_INTERPRET`` must be set
before the kernels are handed to ``triton.jit``. The runtime jits lazily (on first launch), so
setting it here, before any test runs, is enough even if another module imported triton first.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _poisoned(*shape, dtype=torch.float32):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype)
    return torch.full(shape, 0xAB, dtype=dtype)


def _generator(*parts) -> torch.Generator:
    base = int(os.environ.get("GSR_TEST_SEED", "0"))
    seed = base
    for p in parts:
        for ch in str(p):
            seed = (seed * 131 + ord(ch)) % (2 ** 31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def poisoned():
    """``poisoned(*shape, dtype=...)``: NaN-filled (floats) or 0xAB-filled (integers) tensor, so
    any element a kernel fails to write stays visibly wrong."""
    return _poisoned


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded from the test id; set ``GSR_TEST_SEED`` to draw fresh inputs."""
    return _generator(request.node.nodeid)


def _interpreter_loop_problem():
    """Why kernels with runtime-bounded loops cannot run interpreted here, or None.

    Triton 3.6's interpreter turns a loop bound into an int with ``int(array)`` on a 1-element
    array, which NumPy 2.4 refuses; later Triton releases squeeze first. The compiled (GPU) path is
    unaffected.
    """
    try:
        import numpy
        import triton
    except ImportError:
        return None
    version = lambda v: tuple(int(p) for p in v.split(".")[:2] if p.isdigit())  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run loops with runtime bounds "
                f"under numpy {numpy.__version__} (use numpy<2.4 or a newer triton)")
    return None


def _library_mode_problem():
    """Why interpreted kernels cannot run in this process, or None.

    ``TRITON_INTERPRET`` is read when triton is first imported; if something imported triton
    before this file set it (torch_geometric does, so any test module collected before this
    folder can), triton's own helpers are compiled-only and interpreted kernels cannot call them.
    """
    from gsr_compiler.runtime.kernels._dispatch import interpreting, triton_library_mode

    mode = triton_library_mode()
    if mode == "unavailable" or not interpreting() or mode == "interpreted":
        return None
    return ("triton was imported before TRITON_INTERPRET=1 was set (torch_geometric imports it "
            "while other test folders are collected); run `TRITON_INTERPRET=1 pytest ...` or set "
            "it in tests/conftest.py")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "triton_kernels: launches Triton kernels (interpreted on CPU)")
    config.addinivalue_line(
        "markers", "interpreter_loops: runs Triton kernels whose loops have runtime bounds")


def pytest_collection_modifyitems(config, items):
    library = _library_mode_problem()
    loops = _interpreter_loop_problem()
    for item in items:
        if library and item.get_closest_marker("triton_kernels") is not None:
            item.add_marker(pytest.mark.skip(reason=library))
        elif loops and item.get_closest_marker("interpreter_loops") is not None:
            item.add_marker(pytest.mark.skip(reason=loops))
