"""Builds the configured dataset if needed, summarises it and draws samples.

  python -m glipjax.data.inspect --config configs/demo.py --workdir runs/demo \\
      [--split train] [--num 16] [--mix-batches 50] [--config.data.shapes.seed=3]

Prints the split sizes, objects per image, category counts and timings, and writes
WORKDIR/samples.png: a grid of records with their boxes labelled by category and
their captions beneath. A relative c.data.data_dir is taken under the workdir.

When the config has a mix (c.data.sources) it also runs the input pipeline
(glipjax.data.pipeline) for --mix-batches batches and prints each source's size,
the measured mix proportions against the configured weights and the drop counts by
reason (the builders' and the pipeline's), and writes WORKDIR/batch.png: the first
batch, de-normalised, with each box labelled by the prompt words its positive-map
row binds it to and the prompt beneath.
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

from glipjax import draw, paths
from glipjax.config import parse_command_line
from glipjax.data import pipeline, shapes, tokenizer, transforms
from glipjax.data.builders import shapes as shapes_builder

_CELL_PIXELS = 256  # samples are enlarged to about this size so labels stay legible


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
    data_dir = paths.data_dir(cfg, workdir)

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


def bound_words(tok, input_ids: np.ndarray, row: np.ndarray) -> str:
    """The prompt words a positive-map row binds its box to (word pieces merged)."""
    pieces = tok.convert_ids_to_tokens([int(t) for t in input_ids[np.flatnonzero(row > 0)]])
    return tok.convert_tokens_to_string(pieces) if pieces else "?"


def inspect_mix(
    cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, num_batches: int = 50, cols: int = 4
) -> pathlib.Path:
    """Runs the input pipeline of `cfg` for `num_batches` batches, prints source sizes,
    measured mix proportions and drop counts, draws the first batch into
    workdir/batch.png and returns that path."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}.")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    loader = pipeline.DataLoader(cfg, paths.data_dir(cfg, workdir), process_index=0, process_count=1)
    try:
        batches = [loader.next_host_batch() for _ in range(num_batches)]
    finally:
        loader.close()
    elapsed = time.perf_counter() - start
    weights = np.asarray([s.weight for s in loader.sources], np.float64)
    sources = np.concatenate([b["source"] for b in batches])
    print(f"mix: {len(loader.sources)} sources, {len(sources)} samples in {num_batches} batches ({elapsed:.1f} s)")
    for i, s in enumerate(loader.sources):
        measured = float(np.mean(sources == i))
        print(
            f"  {s.name}: {s.kind}, prompt {s.prompt}, {s.size} records, "
            f"weight {weights[i] / weights.sum():.3f}, measured {measured:.3f}"
        )
    for name, counts in loader.drop_report().items():
        text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
        print(f"  drops {name}: {text}")

    tok = tokenizer.load_tokenizer(cfg.data.tokenizer or None)
    batch = batches[0]
    scale = max(1, round(_CELL_PIXELS / max(cfg.data.canvas)))
    images, captions = [], []
    for k in range(len(batch["images"])):
        h, w = batch["image_sizes"][k]
        image = transforms.denormalize(batch["images"][k, :h, :w])
        mask = batch["gt_mask"][k]
        labels = [bound_words(tok, batch["input_ids"][k], row) for row in batch["positive_map"][k][mask]]
        images.append(draw.draw_boxes(image, batch["gt_boxes"][k][mask], labels, scale=scale))
        prompt = tok.decode(batch["input_ids"][k][batch["attention_mask"][k] > 0], skip_special_tokens=True)
        captions.append(f"[{loader.sources[batch['source'][k]].name}] {prompt}")
    path = workdir / "batch.png"
    draw.image_grid(images, captions, cols).save(path)
    print(f"wrote {path} (the first batch of the mix)")
    return path


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(prog="python -m glipjax.data.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="output directory (samples.png, relative data_dir)")
    parser.add_argument("--split", default="train", choices=shapes.SPLITS, help="split to summarise and draw")
    parser.add_argument("--num", type=int, default=16, help="number of samples to draw")
    parser.add_argument("--cols", type=int, default=4, help="samples per row of the grid")
    parser.add_argument(
        "--mix-batches", type=int, default=20, help="pipeline batches to measure the mix over (0: skip)")
    args, cfg = parse_command_line(parser, argv)
    if args.num < 1 or args.cols < 1 or args.mix_batches < 0:
        parser.error("--num and --cols must be at least 1, --mix-batches at least 0")
    path = inspect_dataset(cfg, args.workdir, split=args.split, num=args.num, cols=args.cols)
    if "sources" in cfg.data and args.mix_batches:
        inspect_mix(cfg, args.workdir, num_batches=args.mix_batches, cols=args.cols)
    return path


if __name__ == "__main__":
    main()
