"""Demo: the tiny GLIP on the bundled, locally generated "shapes" dataset.

Run (build the dataset and draw a grid of samples):
  python -m glipjax.data.inspect --config configs/demo.py --workdir runs/demo

Variants: `configs/demo.py` (default size) and `configs/demo.py:tiny` (a few dozen
small images, for tests). Any field can be overridden: --config.data.shapes.seed=3
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/demo.py; choose one of {VARIANTS}.")
    tiny = variant == "tiny"

    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes"
    # Where TFDS writes built datasets; relative paths are under the workdir.
    c.data.data_dir = "tfds"
    c.data.shapes = ml_collections.ConfigDict()
    c.data.shapes.seed = 0
    c.data.shapes.image_size = 96 if tiny else 128
    c.data.shapes.num_train = 48 if tiny else 4000
    c.data.shapes.num_validation = 16 if tiny else 400
    c.data.shapes.num_captions = 16 if tiny else 1000
    c.data.shapes.num_novel = 16 if tiny else 400
    c.data.shapes.max_objects = 6
    return c
