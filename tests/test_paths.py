"""Workdir and data paths: cloud URIs survive joins, local paths become absolute; the
compilation cache folder."""

from __future__ import annotations

import os

import ml_collections
import pytest

from glipjax import paths


def _config(data_dir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": {"data_dir": data_dir}})


@pytest.mark.parametrize("uri", ["gs://bucket/runs/demo", "s3://bucket/run"])
def test_uri_kept_through_joins(uri):
    path = paths.as_path(uri)
    assert paths.is_uri(path)
    assert os.fspath(path) == uri
    assert os.fspath(path / "checkpoints" / "12") == uri + "/checkpoints/12"


def test_local_path_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.as_path("runs/demo")) == os.fspath(tmp_path / "runs" / "demo")
    assert not paths.is_uri(paths.as_path("runs/demo"))


def test_data_dir_under_workdir_when_relative(tmp_path):
    assert os.fspath(paths.data_dir(_config("tfds"), "gs://b/run")) == "gs://b/run/tfds"
    assert os.fspath(paths.data_dir(_config("tfds"), tmp_path)) == os.fspath(tmp_path / "tfds")
    assert os.fspath(paths.data_dir(_config("gs://data/tfds"), tmp_path)) == "gs://data/tfds"
    assert os.fspath(paths.data_dir(_config(str(tmp_path / "shared")), "gs://b/run")) == os.fspath(
        tmp_path / "shared")


def test_compilation_cache_folder(monkeypatch, tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert paths.enable_compilation_cache() == str(tmp_path / "xdg" / "glipjax" / "jax")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "glipjax" / "jax")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
        assert paths.enable_compilation_cache() == str(tmp_path / "mine")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
        assert paths.enable_compilation_cache() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
