"""Finding tcmalloc, telling whether it is loaded, and the advice the trainer logs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glipjax import tcmalloc


def test_find_takes_the_first_folder_and_name_that_exists(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    assert tcmalloc.find([str(first), str(second)]) is None
    (second / "libtcmalloc.so.4").touch()
    assert tcmalloc.find([str(first), str(second)]) == second / "libtcmalloc.so.4"
    (second / "libtcmalloc_minimal.so.4").touch()
    assert tcmalloc.find([str(first), str(second)]) == second / "libtcmalloc_minimal.so.4"
    (first / "libtcmalloc.so.4").touch()
    assert tcmalloc.find([str(first), str(second)]) == first / "libtcmalloc.so.4"


def test_loaded_reads_the_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert not tcmalloc.loaded(maps)
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert tcmalloc.loaded(maps)
    assert not tcmalloc.loaded(tmp_path / "missing")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the advice is for Linux")
def test_hint_names_the_library_found_or_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tcmalloc, "loaded", lambda: False)
    assert "install it (apt-get install libtcmalloc-minimal4" in tcmalloc.hint([str(tmp_path)])
    (tmp_path / "libtcmalloc_minimal.so.4").touch()
    assert f"rerun with LD_PRELOAD={tmp_path / 'libtcmalloc_minimal.so.4'}" in tcmalloc.hint([str(tmp_path)])
    monkeypatch.setattr(tcmalloc, "loaded", lambda: True)
    assert tcmalloc.hint([str(tmp_path)]) is None


@pytest.mark.skipif(tcmalloc.find() is None, reason="no tcmalloc library on this machine")
def test_a_preloaded_library_is_seen_as_loaded():
    probe = [sys.executable, "-c", "from glipjax import tcmalloc; print(tcmalloc.loaded())"]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    preloaded = subprocess.run(probe, env=dict(env, LD_PRELOAD=str(tcmalloc.find())), capture_output=True, text=True,
                               check=True)
    assert (plain.stdout.strip(), preloaded.stdout.strip()) == ("False", "True")
