"""Evaluation over several processes: each reads a contiguous part of a set, and the
per-record results are gathered to every process; progress lines with images/s and ETA.

Gathering uses jax.experimental.multihost_utils.process_allgather on fixed-size
arrays padded to the largest part (int64 travels as int32 pairs, since JAX runs
without x64); with one process nothing is gathered. No TensorFlow here.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def host_bounds(total: int, process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """[start, end) of this process's contiguous part of `total` records."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return total * index // count, total * (index + 1) // count


def gather(tree: Any, size: int, total_sizes: Sequence[int]) -> Any:
    """Every process's rows of `tree` (numpy leaves whose first `size` rows are this
    process's results) concatenated in process order; `total_sizes` holds each
    process's row count. One process: the tree itself."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: x[:size], tree)
    rows = max(total_sizes)

    def pad(x):
        x = np.asarray(x)[:size]
        if x.dtype == np.int64:  # int64 travels as int32 pairs (JAX without x64)
            x = x.view(np.int32).reshape(*x.shape, 2)
        return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])

    gathered = multihost_utils.process_allgather(jax.tree.map(pad, tree), tiled=False)

    def unpad(x, like):
        x = np.concatenate([np.asarray(x[p, :n]) for p, n in enumerate(total_sizes)])
        return np.ascontiguousarray(x).view(np.int64).reshape(x.shape[:-1]) if like.dtype == np.int64 else x

    return jax.tree.map(unpad, gathered, tree)


class Progress:
    """"NAME: done/total images, R images/s, ETA Ts" on stderr (process 0),
    at most every `every_s` seconds and at the end."""

    def __init__(self, name: str, total: int, enabled: bool = True, every_s: float = 10.0, unit: str = "images"):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.enabled = enabled and jax.process_index() == 0
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"{self.name}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {eta:.0f}s",
                  file=sys.stderr, flush=True)
            self.last = now
