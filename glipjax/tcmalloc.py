"""tcmalloc for CPU runs.

XLA:CPU allocates a step's temporaries afresh on every run. glibc's malloc gives the
large ones back to the kernel when they are freed, so every step pays again for page
faults and zeroed pages; tcmalloc keeps them. On a 2-core machine the demo's training
step ran about a fifth faster with it (docs/benchmarks.md). The library must be
preloaded before Python starts:

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python -m glipjax.train ...
"""

from __future__ import annotations

import pathlib
import sys
from typing import Iterable

LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
LIBRARY_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
INSTALL = "apt-get install libtcmalloc-minimal4 (Debian, Ubuntu) or gperftools-libs (Fedora)"


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
    return f"XLA:CPU steps run faster with tcmalloc: {how} (glipjax/tcmalloc.py)"
