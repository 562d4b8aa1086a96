"""Parameter counts of the GLIP presets by component (shapes only, nothing computed).

  python benchmarks/param_counts.py [glip_t glip_t_a glip_l glip_tiny]

Published totals (official model built from its configs, BERT-base and the unused
cls_logits included): GLIP-T 231,780,222; GLIP-L 430,422,384; GLIP-T(A) about 151.4M.
"""

from __future__ import annotations

import sys

import numpy as np
from flax import traverse_util

from glipjax.convert import glip_abstract_params
from glipjax.models.glip import PRESETS

PUBLISHED = {"glip_t": 231_780_222, "glip_l": 430_422_384, "glip_t_a": 151_400_000}


_TOWER_PARTS = {"b_attn": "fusion", "attention": "bert_layer", "intermediate": "bert_layer", "output": "bert_layer"}


def component(path: tuple[str, ...]) -> str:
    """A parameter path's component name for the table."""
    if path[0] == "backbone":
        return "/".join(path[:2])
    if path[0] == "language_backbone":
        return "language_backbone/" + ("embeddings" if path[1] == "embeddings" else "encoder")
    if path[1].startswith("dyhead_tower_"):
        return "head/tower/" + _TOWER_PARTS.get(path[2], "dyconv")
    return "head/predictors"


def count(name: str) -> dict[str, int]:
    flat = traverse_util.flatten_dict(glip_abstract_params(PRESETS[name]()))
    parts: dict[str, int] = {}
    for path, leaf in flat.items():
        parts[component(path)] = parts.get(component(path), 0) + int(np.prod(leaf.shape))
    return parts


def main(names: list[str]) -> None:
    for name in names or ["glip_t", "glip_t_a", "glip_l", "glip_tiny"]:
        parts = count(name)
        total = sum(parts.values())
        print(f"{name}: {total:,} parameters")
        for part, n in sorted(parts.items()):
            print(f"  {part:32s} {n:>13,}")
        if name in PUBLISHED:
            ref = PUBLISHED[name]
            print(f"  published {ref:,}: difference {total - ref:+,} ({100 * (total - ref) / ref:+.3f}%)")


if __name__ == "__main__":
    main(sys.argv[1:])
