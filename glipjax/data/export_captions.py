"""A shapes split as image-caption pairs (PNG files plus an image-text JSONL), the
input of `python -m glipjax.pseudo_label`:

    python -m glipjax.data.export_captions --config configs/demo.py --split captions --out runs/captions

writes <out>/images/<split>_<index>.png and <out>/captions.jsonl with one
{"image": "images/...", "caption": ..., "image_id": ...} per record, captions only
(no boxes). The records are those of the config's data.shapes settings, the same the
TFDS builder makes for that split.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Mapping, Sequence

from etils import epath
from PIL import Image

from glipjax import paths
from glipjax.config import parse_command_line
from glipjax.data import shapes
from glipjax.data.builders.shapes import shapes_config

CAPTIONS_FILE = "captions.jsonl"
IMAGES_DIR = "images"


def write_image_text(cfg_shapes: Mapping[str, Any], split: str, out: str | epath.Path) -> epath.Path:
    """Writes the split's images and captions under `out`; returns the JSONL path."""
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; choose one of {shapes.SPLITS}")
    config = shapes_config(cfg_shapes)
    count = config.split_counts()[split]
    out = paths.as_path(out)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        sample = shapes.generate(config.seed, split, index, image_size=config.image_size,
                                 max_objects=config.max_objects)
        name = f"{IMAGES_DIR}/{split}_{index:06d}.png"
        with (out / name).open("wb") as f:
            Image.fromarray(sample.image).save(f, format="PNG")
        lines.append(json.dumps({"image": name, "caption": sample.caption, "image_id": sample.image_id}))
    path = out / CAPTIONS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> epath.Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="captions", help=f"one of {', '.join(shapes.SPLITS)}")
    parser.add_argument("--out", required=True, help="output folder")
    args, config = parse_command_line(parser, argv)
    if args.split not in shapes.SPLITS:
        parser.error(f"--split {args.split!r}: choose one of {', '.join(shapes.SPLITS)}")
    path = write_image_text(config.data.shapes, args.split, args.out)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
