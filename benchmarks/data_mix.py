"""Mix proportions: the share of each source over --samples pipeline samples against
the configured weights (goal: within 2 percentage points).

  python benchmarks/data_mix.py [--samples 10000] [--workdir DIR]

Uses configs/demo.py:tiny with three shapes sources of unequal weights (captions,
detection prompts, the fixed class prompt of the novel split) and runs the whole
input pipeline; prints each source's configured and measured share.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import ml_collections
import numpy as np

from glipjax.config import load_config
from glipjax.data import pipeline

WEIGHTS = {"captions": 0.5, "detection": 0.3, "novel_fixed": 0.2}


def config() -> ml_collections.ConfigDict:
    cfg = load_config("configs/demo.py:tiny").unlock()
    cfg.data.sources = ml_collections.ConfigDict({
        "captions": dict(kind="shapes", split="train", prompt="caption", weight=WEIGHTS["captions"]),
        "detection": dict(kind="shapes", split="train", prompt="detection", weight=WEIGHTS["detection"]),
        "novel_fixed": dict(kind="shapes", split="novel", prompt="fixed", weight=WEIGHTS["novel_fixed"]),
    })
    cfg.data.batch_size = 50
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--workdir", default=None, help="where to build the shapes dataset")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="data_mix_"))
    cfg = config()
    loader = pipeline.DataLoader(cfg, root / "tfds", process_index=0, process_count=1)
    start = time.perf_counter()
    sources = np.concatenate([loader.next_host_batch()["source"] for _ in range(-(-args.samples // 50))])
    sources = sources[: args.samples]
    elapsed = time.perf_counter() - start
    loader.close()
    total = sum(WEIGHTS.values())
    worst = 0.0
    print(f"{len(sources)} samples in {elapsed:.1f} s")
    for i, name in enumerate(loader.source_names):
        configured, measured = WEIGHTS[name] / total, float(np.mean(sources == i))
        worst = max(worst, abs(measured - configured))
        print(f"  {name}: configured {configured:.4f}, measured {measured:.4f}, "
              f"difference {measured - configured:+.4f}")
    print(f"largest difference {100 * worst:.2f} percentage points (goal: within 2)")


if __name__ == "__main__":
    main()
