"""Input-pipeline throughput: images per second per host core at 800x1333 from JPEG
files through the whole pipeline (COCO-format builder, detection prompt with
negatives, tokenizer and positive map, multi-scale resize, flip, normalisation,
padding to 800x1344, batching).

  python benchmarks/data_throughput.py [--images 64] [--batches 30] [--workdir DIR]

Writes --images synthetic 640x480 JPEGs (COCO's usual size; smooth noise with filled
rectangles as objects) and a COCO json with 80 classes, builds them with the coco
builder, then times --batches batches of 8 after a warm-up and prints the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

from glipjax.config import load_config
from glipjax.data import pipeline

NUM_CLASSES = 80
IMAGE_HW = (480, 640)


def write_coco(root: pathlib.Path, num_images: int, seed: int = 0) -> pathlib.Path:
    """JPEG files and a COCO json under `root`; returns the json path."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    h, w = IMAGE_HW
    images, annotations = [], []
    for i in range(num_images):
        coarse = rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
        pixels = pixels.copy()
        for _ in range(int(rng.integers(1, 12))):
            bw, bh = int(rng.integers(16, w // 2)), int(rng.integers(16, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y : y + bh, x : x + bw] = rng.integers(0, 255, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "bbox": [x, y, bw, bh],
                                "category_id": int(rng.integers(1, NUM_CLASSES + 1)), "area": bw * bh, "iscrowd": 0})
        name = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(images_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    categories = [{"id": c, "name": f"class {c}"} for c in range(1, NUM_CLASSES + 1)]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def config(annotations: pathlib.Path, images: pathlib.Path, batch_size: int) -> ml_collections.ConfigDict:
    """configs/demo.py with the GLIP-T input sizes and one COCO-format source."""
    cfg = load_config("configs/demo.py").unlock()
    cfg.data.sources = ml_collections.ConfigDict(
        {"coco": dict(kind="coco", weight=1.0, prompt="detection", annotations=str(annotations), images=str(images))})
    cfg.data.update(dict(
        batch_size=batch_size, canvas=(800, 1344), short_sides=(480, 560, 640, 720, 800), max_size=1333,
        eval_short_side=800, eval_max_size=1333, max_boxes=100, max_text_len=256, shuffle_buffer=64))
    return cfg


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="where to write the JPEGs and the built dataset")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="data_throughput_"))
    annotations = write_coco(root / "coco", args.images)
    cfg = config(annotations, root / "coco" / "images", args.batch_size)
    loader = pipeline.DataLoader(cfg, root / "tfds", process_index=0, process_count=1)
    for _ in range(3):  # warm-up: tracing, thread pools, autotuning
        loader.next_host_batch()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for _ in range(args.batches):
        batch = loader.next_host_batch()
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    loader.close()
    cores = len(os.sched_getaffinity(0))
    images = args.batches * args.batch_size
    print(f"batch images {batch['images'].shape} {batch['images'].dtype}, input_ids {batch['input_ids'].shape}")
    rate = images / elapsed
    print(f"wall clock: {rate:.1f} images/s on {cores} cores = {rate / cores:.1f} images/s per core")
    # Robust to other load on the machine: images per second of CPU time this process used.
    print(f"CPU time: {images / cpu:.1f} images per core-second ({cpu:.1f} CPU s for {images} images; "
          f"640x480 JPEG -> short side 480..800, long side <= 1333, canvas 800x1344)")


if __name__ == "__main__":
    main()
