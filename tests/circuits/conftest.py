"""Fixtures for the circuit tests: every test gets a private cache folder."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_default_cache(tmp_path_factory, monkeypatch):
    # Nothing in this folder may write to the user's real cache.
    monkeypatch.setenv("GSR_CACHE_DIR", str(tmp_path_factory.mktemp("default_cache")))


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for read-only tests of bundled circuits, so each is parsed once."""
    return tmp_path_factory.mktemp("shared_cache")


def cache_entries(root):
    """All cache entry files under ``root`` (none if it does not exist)."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
