"""Workdir and data paths that may live on a local disk or in cloud storage, and the
folder of the persistent compilation cache.

A workdir such as gs://bucket/run is kept as a URI (pathlib would collapse the "//");
a local one is made absolute, as Orbax requires. File operations on these paths go
through etils.epath, which reaches GCS through tf.io.gfile.
"""

from __future__ import annotations

import os

import ml_collections
from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
    """True for gs://, s3://, ... paths."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URI kept as given, a local path expanded and absolute."""
    if is_uri(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def data_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
    """config.data.data_dir (where TFDS builds and reads datasets), under `workdir` when relative."""
    given = os.path.expanduser(config.data.data_dir)
    if is_uri(given) or os.path.isabs(given):
        return as_path(given)
    return as_path(workdir) / given


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache, so that a command run again (a resumed
    or repeated run, another evaluation of the same model) loads its compiled programs
    instead of compiling them. The folder is $JAX_COMPILATION_CACHE_DIR when set (set it
    empty to turn the cache off), else $XDG_CACHE_HOME/glipjax/jax (~/.cache/glipjax/jax).
    Returns the folder, or None when off."""
    import jax

    given = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if given == "":
        return None
    folder = given or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "glipjax", "jax")
    folder = folder if is_uri(folder) else os.path.abspath(os.path.expanduser(folder))
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder
