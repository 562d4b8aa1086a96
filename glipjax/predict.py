"""Prediction: python -m glipjax.predict --checkpoint DIR --image a.jpg [b.jpg ...]
                  (--prompt "person. bicycle" | --classes classes.txt) --out DIR

Detects the named classes in each image with a trained model (a training workdir) or
an export (python -m glipjax.export). --prompt is a class list, names separated by
"." ("person. bicycle. traffic light"); --classes is a text file with one class name
per line. Each class is one phrase of the prompt; a list longer than the model's text
length is split into chunks, one forward pass each (glipjax.inference).

Writes <out>/predictions.json:
  {"checkpoint", "step", "engine" ("params" or "exported"), "classes", "min_score",
   "images": [{"file", "width", "height",
               "detections": [{"box": [x0, y0, x1, y1], "phrase", "score"}, ...]}]}
with boxes as pixel edges of the original image (x1 - x0 is the width; best first,
score >= --min-score, at most --max-detections), and <out>/<image stem>.png with the
boxes drawn. Images are read
with PIL (EXIF orientation applied) and prepared like the evaluation transform
(glipjax.preprocess). With an export whose serialized function fits the prompt's
shapes, that function runs; otherwise the params run through the model. No
TensorFlow is imported. Bad input (a missing or unreadable image, an empty prompt, a
directory that is not a run or export, a checkpoint of another model config) stops
with one "error: ..." line and exit status 2.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the command may re-execute itself once (glipjax/allocator.py)
    from glipjax import allocator

    allocator.use_huge_pages()

import argparse
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image

from glipjax import draw, paths, preprocess, runs, sharding
from glipjax.data.tokenizer import load_tokenizer
from glipjax.inference import (ImageDetections, Forward, build_prompt_chunks, detect_chunked, make_forward,
                               whole_forward)

DEFAULT_MIN_SCORE = 0.3
EXPORT_FILE = runs.EXPORT_FILE


class PredictError(ValueError):
    """Input that predict cannot use (the message says which)."""


def parse_prompt(prompt: str) -> list[str]:
    """Class names of a "person. bicycle. car" prompt (empty names dropped)."""
    names = [name.strip() for name in prompt.split(".")]
    names = [name for name in names if name]
    if not names:
        raise PredictError(f"the prompt {prompt!r} names no class; write class names separated by '.'")
    return names


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names of a file with one name per line (blank lines skipped)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise PredictError(f"class file not found: {file}")
    names = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    if not names:
        raise PredictError(f"the class file {file} names no class")
    return names


def check_images(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """The image paths, after checking that each exists and PIL recognises it."""
    files = [pathlib.Path(p) for p in paths]
    if not files:
        raise PredictError("no images given")
    for file in files:
        if not file.is_file():
            raise PredictError(f"image not found: {file}")
        try:
            with Image.open(file):
                pass
        except OSError as e:
            raise PredictError(f"cannot read image {file}: {e}") from e
    return files


def _exported_forward(run: runs.Run, directory: pathlib.Path) -> tuple[Forward, dict] | None:
    """The export's serialized function and its shapes, when `directory` is an export
    whose function takes this run's canvas and text length."""
    info_file = directory / EXPORT_FILE
    if not info_file.is_file():
        return None
    shapes = json.loads(info_file.read_text())["inference"]
    if (shapes["height"], shapes["width"]) != tuple(run.config.data.canvas) or \
            shapes["text_len"] != run.glip_config.max_text_len:
        return None
    exported = jax.export.deserialize(bytearray((directory / shapes["file"]).read_bytes()))
    return whole_forward(exported.call), shapes


class Predictor:
    """Detections of a fixed class list, image by image (compiled once)."""

    def __init__(self, run: runs.Run, names: Sequence[str], directory: pathlib.Path, max_detections: int):
        self.run, self.names, self.max_detections = run, list(names), max_detections
        config = run.config
        self.canvas = tuple(config.data.canvas)
        text_len = run.glip_config.max_text_len
        tokenizer = load_tokenizer(config.data.tokenizer or None)
        exported = _exported_forward(run, directory)
        if exported is not None:
            self.forward, shapes = exported
            self.engine, self.batch, num_phrases = "exported", shapes["batch"], shapes["phrases"]
        else:
            self.forward = make_forward(run.model)
            self.engine, self.batch, num_phrases = "params", 1, None
        try:
            self.chunks = build_prompt_chunks(self.names, list(range(1, len(names) + 1)), tokenizer, text_len,
                                              num_phrases=num_phrases)
        except ValueError as e:
            raise PredictError(str(e)) from e

    def __call__(self, images: Sequence[np.ndarray]) -> list[ImageDetections]:
        """Per RGB uint8 image: boxes (D, 4) as pixel edges of that image (the model's
        boxes name their last pixel; x1 - x0 is the width here), scores (D,) and class
        indices into `names` (D,), best first."""
        prepared = [preprocess.prepare(image, self.run.config.data.eval_short_side,
                                       self.run.config.data.eval_max_size, self.canvas) for image in images]
        results = []
        for start in range(0, len(prepared), self.batch):
            group = prepared[start : start + self.batch]
            pad = self.batch - len(group)
            inputs = np.stack([x for x, _ in group] + [np.zeros_like(group[0][0])] * pad)
            sizes = np.asarray([s for _, s in group] + [group[-1][1]] * pad, np.int32)
            results += detect_chunked(self.forward, self.run.params, inputs, sizes, self.chunks,
                                      self.max_detections)[: len(group)]
        out = []
        for image, (_, (rh, rw)), (boxes, scores, ids) in zip(images, prepared, results):
            oh, ow = image.shape[:2]
            scale = np.asarray([ow / rw, oh / rh, ow / rw, oh / rh], np.float32)
            edges = boxes.astype(np.float32) + np.asarray([0, 0, 1, 1], np.float32)  # last pixel -> far edge
            out.append((edges * scale, scores.astype(np.float32), ids - 1))
        return out


def _png_names(files: Sequence[pathlib.Path]) -> list[str]:
    """<stem>.png per image, with _2, _3 ... where stems repeat."""
    names, seen = [], {}
    for file in files:
        count = seen[file.stem] = seen.get(file.stem, 0) + 1
        names.append(f"{file.stem}.png" if count == 1 else f"{file.stem}_{count}.png")
    return names


def predict(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], names: Sequence[str],
            out: str | os.PathLike, *, min_score: float = DEFAULT_MIN_SCORE, max_detections: int | None = None,
            ema: bool = False, step: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs the model of `checkpoint` on `images` for the classes `names`; writes
    <out>/predictions.json and a PNG per image, and returns the JSON's content."""
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise PredictError("the class list is empty or has an empty name")
    if not 0.0 <= min_score <= 1.0:
        raise PredictError(f"--min-score must lie in [0, 1], got {min_score}")
    files = check_images(images)
    directory = pathlib.Path(checkpoint)
    mesh = sharding.make_mesh({"data": 1}, jax.local_devices()[:1])
    run = runs.load_run(directory, ema=ema, step=step, mesh=mesh)
    max_detections = max_detections or run.glip_config.postprocess.max_detections
    if max_detections < 1:
        raise PredictError(f"--max-detections must be at least 1, got {max_detections}")
    predictor = Predictor(run, names, directory, max_detections)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"checkpoint": str(directory), "step": run.step, "engine": predictor.engine,
                              "classes": list(names), "min_score": min_score, "images": []}
    start = time.monotonic()
    for k, (file, png) in enumerate(zip(files, _png_names(files))):
        try:
            image = preprocess.read_image(file)
        except OSError as e:
            raise PredictError(f"cannot read image {file}: {e}") from e
        ((boxes, scores, ids),) = predictor([image])
        shown = scores >= min_score
        boxes, scores, ids = boxes[shown], scores[shown], ids[shown]
        phrases = [names[i] for i in ids]
        report["images"].append({
            "file": str(file), "width": int(image.shape[1]), "height": int(image.shape[0]),
            "detections": [{"box": [float(v) for v in box], "phrase": phrase, "score": float(s)}
                           for box, phrase, s in zip(boxes, phrases, scores)],
        })
        draw.draw_boxes(image, boxes, phrases, scores).save(out / png)
        if progress:
            elapsed = time.monotonic() - start
            eta = elapsed / (k + 1) * (len(files) - k - 1)
            print(f"{k + 1}/{len(files)} {file.name}: {len(scores)} detections, "
                  f"{elapsed / (k + 1):.2f} s/image, ETA {eta:.0f} s", file=sys.stderr, flush=True)
    (out / "predictions.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training workdir or an export directory")
    parser.add_argument("--image", nargs="+", required=True, help="image files (any format PIL reads)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help='class names separated by ".", e.g. "person. bicycle"')
    prompt.add_argument("--classes", help="a text file with one class name per line (any number)")
    parser.add_argument("--out", required=True, help="predictions.json and the PNGs go here")
    parser.add_argument("--min-score", type=float, default=DEFAULT_MIN_SCORE,
                        help=f"report and draw detections scoring at least this (default {DEFAULT_MIN_SCORE})")
    parser.add_argument("--max-detections", type=int, default=0,
                        help="at most this many per image before --min-score (default: the model's, 100)")
    parser.add_argument("--ema", action="store_true", help="use the EMA params of a training workdir")
    parser.add_argument("--step", type=int, help="checkpoint step of a training workdir (default: the latest)")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on metadata it does not need
    paths.enable_compilation_cache()
    try:
        names = parse_prompt(args.prompt) if args.prompt is not None else read_classes(args.classes)
        predict(args.checkpoint, args.image, names, args.out, min_score=args.min_score,
                max_detections=args.max_detections or None, ema=args.ema, step=args.step)
    except (PredictError, runs.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
