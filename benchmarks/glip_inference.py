"""GLIP inference on the CPU (random weights): images/s from a prepared image to merged
detections, with a short prompt and with the 1203 LVIS classes (chunked), plus the
first call's time (it compiles) and peak host memory.

  python benchmarks/glip_inference.py [--model glip_t] [--height 800] [--width 1333] [--images 1]
                                      [--prompts short,lvis] [--text-len 256]

Each image is a random 800x1333 picture prepared as predict does (resize, normalise,
pad to 800x1344); the model is the preset with random weights (GLIP-T: Swin-T and a
random BERT-base). The LVIS class names are read from the copy that
tensorflow-datasets ships (datasets/lvis/classes.txt, found without importing
TensorFlow); without that package, 1203 two-word names from the BERT vocabulary stand
in, and the output says so. As in predict, the image is encoded once and each chunk's
text once; the fusion head runs once per chunk.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import resource
import time

import jax
import numpy as np
from flax.core import meta

from glipjax import preprocess
from glipjax.data.tokenizer import load_tokenizer
from glipjax.inference import build_prompt_chunks, detect_chunked, make_forward
from glipjax.models.glip import GLIP, PRESETS, SIZE_DIVISIBILITY

SHORT_PROMPT = ["person", "bicycle", "car", "dog"]
LVIS_CLASSES = 1203


def lvis_names(tokenizer) -> tuple[list[str], str]:
    """The 1203 LVIS class names and where they came from."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is not None and spec.submodule_search_locations:
        file = pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "lvis" / "classes.txt"
        if file.is_file():
            names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
            if len(names) == LVIS_CLASSES:
                return names, f"LVIS v1 names from {file.name} of tensorflow-datasets"
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3)
    names = [f"{words[7 * i % len(words)]} {words[(13 * i + 5) % len(words)]}" for i in range(LVIS_CLASSES)]
    return names, "LVIS names unavailable (tensorflow-datasets not installed): 1203 two-word vocabulary names"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def peak_rss() -> str:
    return gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="glip_t", choices=sorted(PRESETS))
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--images", type=int, default=1, help="images timed per prompt (after one warm-up pass)")
    parser.add_argument("--prompts", default="short,lvis", help="comma-separated: short, lvis")
    args = parser.parse_args()

    config = PRESETS[args.model]()
    model = GLIP(config)
    text_len = config.max_text_len
    canvas = tuple(-(-s // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in (args.height, args.width))
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.images)]
    t = time.perf_counter()
    prepared = [preprocess.prepare(p, min(args.height, args.width), max(args.height, args.width), canvas)
                for p in pictures]
    prepare_s = (time.perf_counter() - t) / len(pictures)
    print(f"{args.model}, random weights: canvas {canvas[0]}x{canvas[1]}, text {text_len} tokens, "
          f"devices {jax.devices()}; preparing an image takes {prepare_s:.2f} s")

    t = time.perf_counter()
    params = meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32),
                                            np.ones((1, text_len), np.int32), np.ones((1, text_len), np.int32)))
    params = params["params"]
    print(f"init: {sum(x.size for x in jax.tree.leaves(params)):,} parameters in {time.perf_counter() - t:.1f} s")

    tokenizer = load_tokenizer(None)
    forward = make_forward(model)
    max_detections = config.postprocess.max_detections
    for prompt in args.prompts.split(","):
        if prompt == "short":
            names, source = SHORT_PROMPT, f"'{'. '.join(SHORT_PROMPT)}'"
        elif prompt == "lvis":
            names, source = lvis_names(tokenizer)
        else:
            raise SystemExit(f"unknown prompt {prompt!r}; choose short or lvis")
        chunks = build_prompt_chunks(names, range(1, len(names) + 1), tokenizer, text_len)
        print(f"{prompt}: {len(names)} classes ({source}) in {len(chunks)} chunk(s) of up to "
              f"{chunks[0].positive_map.shape[0]} phrases")
        image, size = prepared[0]
        t = time.perf_counter()
        detect_chunked(forward, params, image[None], np.asarray([size], np.int32), chunks[:1], max_detections)
        print(f"  first call (compiles the image, text and head parts) {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        found = 0
        for image, size in prepared:
            ((boxes, _, _),) = detect_chunked(forward, params, image[None], np.asarray([size], np.int32), chunks,
                                              max_detections)
            found += len(boxes)
        seconds = (time.perf_counter() - t) / len(prepared)
        print(f"  {1 / seconds:.4f} images/s ({seconds:.1f} s per image, {seconds / len(chunks):.1f} s per chunk, "
              f"{len(prepared)} image(s)), {found / len(prepared):.0f} detections per image; peak RSS {peak_rss()}")


if __name__ == "__main__":
    main()
