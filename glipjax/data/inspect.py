"""Builds the configured dataset if needed, summarises it and draws samples.

  python -m glipjax.data.inspect --config configs/demo.py --workdir runs/demo \\
      [--split train] [--num 16] [--config.data.shapes.seed=3]

Prints the split sizes, objects per image, category counts and timings, and writes
WORKDIR/samples.png: a grid of records with their boxes labelled by category and
their captions beneath. A relative c.data.data_dir is taken under the workdir.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import time
from typing import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from glipjax import draw
from glipjax.config import parse_command_line
from glipjax.data import shapes
from glipjax.data.builders import shapes as shapes_builder

_CELL_PIXELS = 256  # samples are enlarged to about this size so labels stay legible


def resolve_data_dir(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """c.data.data_dir, taken under `workdir` when relative."""
    data_dir = pathlib.Path(cfg.data.data_dir).expanduser()
    return data_dir if data_dir.is_absolute() else pathlib.Path(workdir) / data_dir


def inspect_dataset(
    cfg: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    split: str = "train",
    num: int = 16,
    cols: int = 4,
) -> pathlib.Path:
    """Builds (if needed) and summarises the dataset of `cfg`, draws `num` records of
    `split` into workdir/samples.png and returns that path."""
    if cfg.data.name != "shapes":
        raise ValueError(f"glipjax.data.inspect knows the dataset 'shapes', not {cfg.data.name!r}.")
    if split not in shapes.SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {shapes.SPLITS}.")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(cfg, workdir)

    start = time.perf_counter()
    builder = shapes_builder.shapes_builder(cfg.data.shapes, data_dir)
    existed = builder.is_prepared()
    shapes_builder.prepare(builder)
    built = time.perf_counter() - start
    print(f"dataset: {builder.data_path} ({'found' if existed else f'built in {built:.1f} s'})")
    sizes = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in shapes.SPLITS)
    print(f"split sizes: {sizes}")

    start = time.perf_counter()
    records = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    per_image: collections.Counter[int] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    caption_chars = []
    for record in tfds.as_numpy(records):
        names = [n.decode() for n in record["objects"]["category_name"]]
        per_image[len(names)] += 1
        categories.update(names)
        caption_chars.append(len(record["caption"]))
    histogram = " ".join(f"{k}:{per_image[k]}" for k in sorted(per_image))
    boxes = sum(categories.values())
    print(
        f"{split}: {sum(per_image.values())} images, {boxes} boxes, objects per image {histogram}, "
        f"caption length mean {np.mean(caption_chars):.0f} chars"
    )
    if categories:
        counts = ", ".join(f"{name} {n}" for name, n in categories.most_common())
        print(f"category counts ({len(categories)} of {len(shapes.CATEGORIES)}): {counts}")

    images, captions = [], []
    image_size = cfg.data.shapes.image_size
    scale = max(1, round(_CELL_PIXELS / image_size))
    for record in tfds.as_numpy(builder.as_dataset(split=split).take(num)):
        objects = record["objects"]
        labels = [n.decode() for n in objects["category_name"]]
        images.append(draw.draw_boxes(record["image"], objects["bbox"], labels, scale=scale))
        captions.append(record["caption"].decode())
    path = workdir / "samples.png"
    draw.image_grid(images, captions, cols).save(path)
    print(f"wrote {path} ({len(images)} samples of {split}) in {time.perf_counter() - start:.1f} s")
    return path


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(prog="python -m glipjax.data.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="output directory (samples.png, relative data_dir)")
    parser.add_argument("--split", default="train", choices=shapes.SPLITS, help="split to summarise and draw")
    parser.add_argument("--num", type=int, default=16, help="number of samples to draw")
    parser.add_argument("--cols", type=int, default=4, help="samples per row of the grid")
    args, cfg = parse_command_line(parser, argv)
    if args.num < 1 or args.cols < 1:
        parser.error("--num and --cols must be at least 1")
    return inspect_dataset(cfg, args.workdir, split=args.split, num=args.num, cols=args.cols)


if __name__ == "__main__":
    main()
