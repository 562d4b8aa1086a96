"""The memory allocator of CPU runs.

XLA:CPU allocates each step's temporaries afresh on every run, in one buffer (458 MiB for
the demo's training step). glibc's malloc maps a buffer that large anew on every call and
unmaps it when it is freed, so each step pays a page fault for every 4 KiB page it
touches. Two remedies (figures in docs/benchmarks.md):

- Transparent huge pages for malloc (glibc 2.35+, where the kernel gives them on
  request: /sys/kernel/mm/transparent_hugepage/enabled is "madvise"). The commands turn
  them on themselves: `use_huge_pages` re-executes the command once with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so that the buffer is faulted in 2 MiB pages
  instead of 4 KiB ones. Any glibc.malloc.hugetlb setting of your own in GLIBC_TUNABLES
  (e.g. =0, to turn them off) is left alone.
- tcmalloc, which keeps freed memory: faster still, but a system library that must be
  preloaded before Python starts:

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python -m glipjax.train ...
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
from typing import Iterable, Mapping

LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
LIBRARY_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
INSTALL = "apt-get install libtcmalloc-minimal4 (Debian, Ubuntu) or gperftools-libs (Fedora)"
HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def find(dirs: Iterable[str] = LIBRARY_DIRS) -> pathlib.Path | None:
    """The first tcmalloc library in `dirs`, or None."""
    for folder in dirs:
        for name in LIBRARY_NAMES:
            path = pathlib.Path(folder) / name
            if path.exists():
                return path
    return None


def loaded(maps: pathlib.Path = pathlib.Path("/proc/self/maps")) -> bool:
    """Whether this process runs with tcmalloc (False where `maps` cannot be read)."""
    try:
        return "libtcmalloc" in maps.read_text()
    except OSError:
        return False


def hint(dirs: Iterable[str] = LIBRARY_DIRS) -> str | None:
    """What to do for faster CPU steps on Linux without tcmalloc; None when it is loaded
    or the system is not Linux."""
    if not sys.platform.startswith("linux") or loaded():
        return None
    path = find(dirs)
    how = f"rerun with LD_PRELOAD={path}" if path else f"install it ({INSTALL}) and preload it with LD_PRELOAD"
    return f"XLA:CPU steps run faster with tcmalloc: {how}"


def describe() -> str:
    """The allocator this process runs with, in words."""
    if loaded():
        return "tcmalloc"
    if HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        return "glibc malloc with huge pages"
    return "system malloc"


def huge_pages_environment(environ: Mapping[str, str], libc: tuple[str, str], thp_mode: str) -> dict[str, str] | None:
    """`environ` with glibc's huge pages for malloc added to GLIBC_TUNABLES, or None where
    they would change nothing: the C library is not glibc 2.35+, the kernel's
    transparent-huge-page mode (the text of THP_MODE) is not "madvise", or GLIBC_TUNABLES
    already sets glibc.malloc.hugetlb."""
    name, version = libc
    try:
        new_enough = name == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        new_enough = False
    tunables = environ.get("GLIBC_TUNABLES", "")
    if not new_enough or "[madvise]" not in thp_mode or "glibc.malloc.hugetlb" in tunables:
        return None
    return dict(environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGE_PAGES) if t))


def use_huge_pages() -> None:
    """Re-executes this command (sys.orig_argv) with glibc's huge pages for malloc where
    huge_pages_environment says they help; returns without doing anything otherwise.
    A command calls it under `if __name__ == "__main__":` above its other imports, which
    would otherwise run twice; library code never calls it."""
    if not sys.platform.startswith("linux") or not sys.executable or loaded():
        return
    try:
        thp_mode = THP_MODE.read_text()
    except OSError:
        return
    environ = huge_pages_environment(os.environ, platform.libc_ver(), thp_mode)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:  # the command goes on with the allocator it has
        return
