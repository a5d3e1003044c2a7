"""The on-disk cache: hits, invalidation, corruption, atomic writes."""

from __future__ import annotations

import pytest
import torch

from gsr_compiler.circuits import CircuitCache, default_cache_dir, load_circuit
from gsr_compiler.circuits import cache as cache_module
from gsr_compiler.circuits import labels as labels_module
from gsr_compiler.circuits import loading

from .conftest import cache_entries
from .reference import write_bench


def assert_same(a, b):
    assert a.node_names == b.node_names
    for key in ("x", "edge_index", "level", "reverse_level", "prob", "toggle"):
        assert torch.equal(a[key], b[key]), key


def fail(*args, **kwargs):
    raise AssertionError("should have been read from the cache")


def test_second_load_reads_the_cache(cache_dir, monkeypatch):
    first = load_circuit("c17", cache_dir=cache_dir)
    assert len(cache_entries(cache_dir)) == 5  # one netlist + four labels
    monkeypatch.setattr(loading, "read_netlist", fail)
    for name in ("logic_level", "reverse_level", "signal_probability", "toggle_rate"):
        monkeypatch.setattr(labels_module, name, fail)
    assert_same(load_circuit("c17", cache_dir=cache_dir), first)


def test_new_label_settings_do_not_reparse(cache_dir, monkeypatch):
    load_circuit("c17", cache_dir=cache_dir)
    monkeypatch.setattr(loading, "read_netlist", fail)
    data = load_circuit("c17", labels=("prob",), num_patterns=128, cache_dir=cache_dir)
    assert torch.allclose(data.prob * 128, torch.round(data.prob * 128))
    assert len(cache_entries(cache_dir)) == 6


def test_disabled_cache_writes_nothing(cache_dir, monkeypatch, tmp_path):
    load_circuit("c17", cache_dir=cache_dir, use_cache=False)
    assert cache_entries(cache_dir) == []


def test_default_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GSR_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    load_circuit("c17", labels=("level",))
    assert len(cache_entries(tmp_path / "env")) == 2
    monkeypatch.delenv("GSR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "gsr_compiler"


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "empty", "garbage"])
def test_damaged_entry_is_detected_and_rebuilt(cache_dir, monkeypatch, damage):
    first = load_circuit("c17", cache_dir=cache_dir)
    netlist_file = next(p for p in cache_entries(cache_dir) if p.parent.name == "netlist")
    good = netlist_file.read_bytes()
    if damage == "truncate":
        netlist_file.write_bytes(good[: len(good) // 2])
    elif damage == "flip_byte":
        raw = bytearray(good)
        raw[len(raw) // 2] ^= 0xFF
        netlist_file.write_bytes(bytes(raw))
    elif damage == "empty":
        netlist_file.write_bytes(b"")
    else:
        netlist_file.write_bytes(b"not a cache file at all" * 10)
    calls = []
    original = loading.read_netlist
    monkeypatch.setattr(
        loading, "read_netlist", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    again = load_circuit("c17", cache_dir=cache_dir)
    assert calls == [1]  # the damaged entry was not trusted
    assert_same(again, first)
    assert netlist_file.read_bytes() == good  # and it was rewritten whole


def test_damaged_label_entry_is_rebuilt(cache_dir):
    first = load_circuit("c17", cache_dir=cache_dir)
    for p in cache_entries(cache_dir):
        if p.parent.name == "label":
            p.write_bytes(p.read_bytes()[:-7])
    assert_same(load_circuit("c17", cache_dir=cache_dir), first)


def test_entry_under_the_wrong_key_is_stale(cache_dir):
    cache = CircuitCache(cache_dir)
    cache.put("label", "a" * 64, {"value": torch.arange(3).numpy()}, {})
    cache.path("label", "b" * 64).write_bytes(cache.path("label", "a" * 64).read_bytes())
    assert cache.get("label", "b" * 64) is None
    assert not cache.path("label", "b" * 64).exists()
    assert cache.get("label", "a" * 64) is not None


def test_edited_netlist_is_reparsed(tmp_path, cache_dir):
    path = write_bench(tmp_path / "edit.bench", ["a", "b"], ["y"], [("y", "and", ["a", "b"])])
    assert load_circuit(path, cache_dir=cache_dir).num_nodes == 3
    write_bench(path, ["a", "b"], ["y"], [("t", "or", ["a", "b"]), ("y", "not", ["t"])])
    assert load_circuit(path, cache_dir=cache_dir).num_nodes == 4


def _partial_then_fail(f, data):
    f.write(data[: len(data) // 2])
    raise OSError("disk full")


def test_failed_write_leaves_no_partial_file(cache_dir, monkeypatch):
    monkeypatch.setattr(cache_module, "_write_all", _partial_then_fail)
    data = load_circuit("c17", cache_dir=cache_dir)  # a cache failure does not fail the load
    assert data.num_nodes == 11
    assert cache_entries(cache_dir) == []  # neither the entry nor its temporary file


def test_failed_overwrite_keeps_the_old_entry(tmp_path, monkeypatch):
    target = tmp_path / "entry.gsr"
    cache_module.atomic_write(target, b"old contents")
    monkeypatch.setattr(cache_module, "_write_all", _partial_then_fail)
    with pytest.raises(OSError):
        cache_module.atomic_write(target, b"new contents that never land")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.gsr"]
