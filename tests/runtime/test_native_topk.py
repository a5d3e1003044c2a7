"""The native CPU group top-k: the same set and values as the torch selection, and its build."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsr_compiler.runtime.native import build as native_build
from gsr_compiler.runtime.native import topk as native_topk
from gsr_compiler.runtime.native import (native_group_topk, native_topk_available,
                                         native_topk_covers, native_topk_status)
from gsr_compiler.runtime.sparse import group_topk, group_topk_compress, select_group_topk

SPECIAL = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"),
                        1.0, -1.0, 3.4e38, -1e-45])

needs_native = pytest.mark.skipif(not native_topk_available(),
                                  reason=f"native top-k unavailable: {native_topk_status()}")


def _tied_input(rows: int, groups: int, g: int, gen: torch.Generator) -> torch.Tensor:
    """Small integers (many ties) with some NaN, infinities and signed zeros mixed in."""
    x = torch.randint(-3, 4, (rows, groups, g), generator=gen).float()
    special = torch.rand(x.shape, generator=gen) < 0.2
    x[special] = SPECIAL[torch.randint(0, len(SPECIAL), (int(special.sum()),), generator=gen)]
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@needs_native
@pytest.mark.parametrize("g", [2, 3, 8, 17, 64, 65, 100, 256, 300])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 40])
def test_native_equals_torch_selection_with_ties_nan_and_ragged_rows(g, rows, rng):
    gen = rng
    x = _tied_input(rows, 2, g, gen)
    for k in sorted({1, 2, g // 2, g // 2 + 1, g - 1, g} & set(range(1, g + 1))):
        expected = select_group_topk(x, k)
        positions, values = native_group_topk(x, k)
        assert torch.equal(positions, expected), (g, rows, k)
        # bit for bit: -0.0 stays -0.0, NaN payloads are copied
        assert _same_bits(values, x.gather(-1, expected)), (g, rows, k)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_threads_split_rows_without_changing_the_result(threads, rng):
    gen = rng
    x = torch.randn(3001, 4, 64, generator=gen)  # enough rows for several threads
    x[::7, :, 3] = x[::7, :, 9]  # ties inside the kept set and at its boundary
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in (8, 40):
            positions, values = native_group_topk(x, k)
            assert torch.equal(positions, select_group_topk(x, k))
            assert torch.equal(values, x.gather(-1, positions))
    finally:
        torch.set_num_threads(before)


@needs_native
def test_native_reads_non_contiguous_input(rng):
    x = torch.randn(64, 3, 16, generator=rng).transpose(0, 1)  # [3, 64, 16], strided
    positions, values = native_group_topk(x, 5)
    assert torch.equal(positions, select_group_topk(x, 5))
    assert torch.equal(values, x.gather(-1, positions))


def test_native_covers_only_cpu_float32():
    assert not native_topk_covers(torch.zeros(2, 4, dtype=torch.float64))
    assert not native_topk_covers(torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="does not cover torch.float64"):
        native_group_topk(torch.zeros(2, 1, 4, dtype=torch.float64), 2)


@needs_native
@pytest.mark.parametrize("k", [0, 5])
def test_native_rejects_k_outside_the_group(k):
    with pytest.raises(ValueError, match="k must be in 1..4"):
        native_group_topk(torch.zeros(2, 1, 4), k)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty cache folder and no library loaded in this process yet."""
    monkeypatch.setenv("GSR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_build, "_loaded", {})
    return tmp_path / "native"


def _ops_agree_with_torch_path(x: torch.Tensor, k: int, g: int) -> None:
    c = group_topk_compress(x, k, g, backend="torch")
    assert torch.equal(c.indices.long(), select_group_topk(x.view(x.shape[0], -1, g), k))
    dense = group_topk(x, k, g)
    assert torch.equal(dense.view(x.shape[0], -1, g).gather(-1, c.indices.long()), c.values)


def _matches_manifest(library: Path) -> bool:
    recorded = json.loads(library.with_suffix(".json").read_text())
    data = library.read_bytes()
    return (recorded["size"], recorded["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


@needs_native
def test_build_is_cached_atomically_and_reused(fresh_build, rng):
    assert native_topk_available()
    built = sorted(fresh_build.iterdir())
    # the library and its manifest, no temporary file left behind
    assert [p.suffix for p in built] == [".json", ".so"] and built[0].stem == built[1].stem
    assert _matches_manifest(built[1])
    assert str(built[1]) in native_topk_status()
    mtime = built[0].stat().st_mtime_ns
    native_build._loaded.clear()  # a new process: finds the build, does not compile again
    assert native_topk_available()
    assert sorted(fresh_build.iterdir()) == built and built[0].stat().st_mtime_ns == mtime
    _ops_agree_with_torch_path(torch.randn(50, 32, generator=rng), 3, 16)


REPO = Path(__file__).resolve().parents[2]

# Loading a damaged library can kill the process (SIGBUS), so it is loaded in a child process.
SELECT_IN_A_NEW_PROCESS = """
import torch
from gsr_compiler.runtime.native import native_topk_status
from gsr_compiler.runtime.sparse import group_topk_compress, select_group_topk
x = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
assert torch.equal(group_topk_compress(x, 3, 16).indices.long(),
                   select_group_topk(x.view(40, 2, 16), 3))
print(native_topk_status())
"""


def _select_in_a_new_process(cache: Path) -> subprocess.CompletedProcess:
    # cwd: `python -c` imports gsr_compiler from this checkout first
    env = {**os.environ, "GSR_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-c", SELECT_IN_A_NEW_PROCESS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _replace(library: Path, data: bytes) -> None:
    # A new file, not a rewrite: the library this process has mapped must stay intact.
    library.unlink()
    library.write_bytes(data)


@needs_native
@pytest.mark.parametrize("manifest", ["kept", "absent"])  # absent: a cache from before manifests
def test_truncated_cached_library_is_rebuilt_not_loaded(fresh_build, manifest):
    assert native_topk_available()
    [library] = fresh_build.glob("*.so")
    whole = library.read_bytes()
    _replace(library, whole[: len(whole) // 2])
    if manifest == "absent":
        library.with_suffix(".json").unlink()
    done = _select_in_a_new_process(fresh_build.parent)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    if manifest == "kept":
        assert f"is {len(whole) // 2} bytes, {len(whole)} were built; rebuilding it" in done.stderr
    assert "(rebuilt: the cached copy " in done.stdout
    assert _matches_manifest(library)


@needs_native
def test_another_library_at_the_cached_path_is_rebuilt(fresh_build, tmp_path):
    assert native_topk_available()
    [library] = fresh_build.glob("*.so")
    other = tmp_path / "other.cpp"
    other.write_text('extern "C" int gsr_other() { return 1; }\n')
    compiled = native_build._compile(native_build._compiler(), other, str(tmp_path / "other.so"))
    assert compiled.returncode == 0, compiled.stderr
    _replace(library, (tmp_path / "other.so").read_bytes())  # loads, lacks the selection
    done = _select_in_a_new_process(fresh_build.parent)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    assert "rebuilding it" in done.stderr and "rebuilt" in done.stdout
    assert _matches_manifest(library)


@needs_native
def test_library_without_a_needed_function_falls_back_to_torch(fresh_build, monkeypatch, rng):
    x = _tied_input(33, 2, 16, rng).view(33, 32)
    expected = select_group_topk(x.view(33, 2, 16), 5)
    monkeypatch.setitem(native_topk._SYMBOLS, torch.float32, "gsr_group_topk_f32_v0")
    with pytest.warns(RuntimeWarning, match="does not export gsr_group_topk_f32_v0"):
        assert not native_topk_available()
    assert "does not export gsr_group_topk_f32_v0" in native_topk_status()
    assert not native_topk_covers(x)
    assert torch.equal(group_topk_compress(x, 5, 16).indices.long(), expected)


@pytest.mark.parametrize("setting", ["GSR_NATIVE", "CXX"])
def test_without_native_code_the_torch_path_gives_the_same_result(setting, tmp_path, monkeypatch,
                                                                  rng):
    x = _tied_input(33, 2, 16, rng).view(33, 32)
    expected = (group_topk_compress(x, 5, 16).indices, group_topk(x, 5, 16))
    monkeypatch.setenv("GSR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_build, "_loaded", {})  # a new process, under this setting:
    if setting == "GSR_NATIVE":
        monkeypatch.setenv("GSR_NATIVE", "0")
        reason = "disabled by GSR_NATIVE=0"
    else:  # a compiler that fails
        monkeypatch.setattr(native_build, "_compiler", lambda: "/bin/false")
        reason = "false failed on group_topk.cpp"
    assert not native_topk_available()
    assert reason in native_topk_status()
    assert not native_topk_covers(x)
    assert torch.equal(group_topk_compress(x, 5, 16).indices, expected[0])
    assert _same_bits(group_topk(x, 5, 16), expected[1])
    native = tmp_path / "native"
    assert not (native.exists() and any(native.iterdir()))  # nothing half-written


def test_explain_names_the_cpu_top_k_selection():
    from gsr_compiler import gsr_compile
    from gsr_compiler.models import ResidualGNN
    from gsr_compiler.synthetic import random_graph

    x, edge_index, _ = random_graph(64, 256, 8)
    text = gsr_compile(ResidualGNN(8, 16, 1, 2), sparse_k=2,
                       example_inputs=(x, edge_index)).explain()
    assert "group top-k on CPU (float32): " in text
    assert native_topk_status() in text
    dense = gsr_compile(ResidualGNN(8, 16, 1, 2), example_inputs=(x, edge_index)).explain()
    assert "group top-k on CPU" not in dense
