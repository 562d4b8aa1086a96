"""The allocator of CPU runs: finding tcmalloc, telling whether it is loaded, the advice
the trainer logs, and the re-execution with glibc's huge pages for malloc."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from glipjax import allocator


def test_find_takes_the_first_folder_and_name_that_exists(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    assert allocator.find([str(first), str(second)]) is None
    (second / "libtcmalloc.so.4").touch()
    assert allocator.find([str(first), str(second)]) == second / "libtcmalloc.so.4"
    (second / "libtcmalloc_minimal.so.4").touch()
    assert allocator.find([str(first), str(second)]) == second / "libtcmalloc_minimal.so.4"
    (first / "libtcmalloc.so.4").touch()
    assert allocator.find([str(first), str(second)]) == first / "libtcmalloc.so.4"


def test_loaded_reads_the_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert not allocator.loaded(maps)
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.loaded(maps)
    assert not allocator.loaded(tmp_path / "missing")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the advice is for Linux")
def test_hint_names_the_library_found_or_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "loaded", lambda: False)
    assert "install it (apt-get install libtcmalloc-minimal4" in allocator.hint([str(tmp_path)])
    (tmp_path / "libtcmalloc_minimal.so.4").touch()
    assert f"rerun with LD_PRELOAD={tmp_path / 'libtcmalloc_minimal.so.4'}" in allocator.hint([str(tmp_path)])
    monkeypatch.setattr(allocator, "loaded", lambda: True)
    assert allocator.hint([str(tmp_path)]) is None


@pytest.mark.skipif(allocator.find() is None, reason="no tcmalloc library on this machine")
def test_a_preloaded_library_is_seen_as_loaded():
    probe = [sys.executable, "-c", "from glipjax import allocator; print(allocator.loaded())"]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    preloaded = subprocess.run(probe, env=dict(env, LD_PRELOAD=str(allocator.find())), capture_output=True, text=True,
                               check=True)
    assert (plain.stdout.strip(), preloaded.stdout.strip()) == ("False", "True")


MADVISE = "always [madvise] never\n"


def test_huge_pages_are_added_where_glibc_and_the_kernel_support_them():
    env = allocator.huge_pages_environment({"PATH": "/bin"}, ("glibc", "2.36"), MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = allocator.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, ("glibc", "2.35"), MADVISE)
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("environ, libc, thp_mode", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, ("glibc", "2.36"), MADVISE),  # the user's own setting
    ({}, ("glibc", "2.34"), MADVISE),  # no such tunable before 2.35
    ({}, ("", ""), MADVISE),  # not glibc (musl)
    ({}, ("glibc", "2.36"), "[always] madvise never\n"),  # every large mapping has them already
    ({}, ("glibc", "2.36"), "always madvise [never]\n"),  # none to be had
])
def test_huge_pages_are_left_out_where_they_change_nothing(environ, libc, thp_mode):
    assert allocator.huge_pages_environment(environ, libc, thp_mode) is None


def _huge_pages_help() -> bool:
    try:
        mode = allocator.THP_MODE.read_text()
    except OSError:
        return False
    return sys.platform.startswith("linux") and allocator.huge_pages_environment({}, platform.libc_ver(), mode) is not None


PROBE = """
import os, sys
from glipjax import allocator
print("before", os.getpid(), flush=True)
allocator.use_huge_pages()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), allocator.describe(), sys.argv[1:])
"""


@pytest.mark.skipif(not _huge_pages_help(), reason="this machine's glibc or kernel gives no huge pages on request")
def test_use_huge_pages_reexecutes_the_command_once_with_them():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROBE, "--flag", "a b"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    # The output printed before the re-execution is kept; the process (same pid) ran
    # the command again, with its arguments, and did not re-execute a second time.
    pid = out[0].split()[1]
    assert out[:3] == [f"before {pid}", f"before {pid}",
                       f"after {pid} glibc.malloc.hugetlb=1 glibc malloc with huge pages ['--flag', 'a b']"]
    own = subprocess.run([sys.executable, "-c", PROBE], env=dict(env, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"),
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert own[1].endswith("glibc.malloc.hugetlb=0 system malloc []")
