"""AP on the shapes dataset: held-out images, novel colour-shape pairs, and the
swapped-colour control, and how often the best detection on an object names its
colour and its shape.

Every image is scored against the full class prompt of its split's categories
(validation and train: the 30 base pairs; novel: all 36 pairs, so a novel pair is
found only through the words of the prompt). A prompt longer than the text length
is split into chunks; each batch of images is encoded once, each chunk's text once,
the head runs per chunk, and the per-image detections of the chunks are merged
(glipjax.inference).

prompt_mode "swapped_colors" names each class with another colour (COLOR_SWAP, a
fixed derangement) while detections still count for the true category, so a model
that reads the colour words falls far below its "true" figure.

Beside AP, AttributeTally says where the errors are: the share of objects found (some
detection at IoU >= 0.5) and, of those, how often the best-scoring such detection has
the object's colour and its shape.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from glipjax import draw, paths
from glipjax.data import shapes, transforms
from glipjax.data.pipeline import transform_config
from glipjax.data.builders.pseudo_labels import nms_keep
from glipjax.data.builders.shapes import load_split
from glipjax.data.tokenizer import load_tokenizer
from glipjax.eval.coco import CocoBoxEvaluator
from glipjax.eval.flickr import box_iou
from glipjax.inference import build_prompt_chunks, detect_chunked, make_forward
from glipjax.models.glip import GLIP

PROMPT_MODES = ("true", "swapped_colors")
# Each colour -> the next one in shapes.COLORS (cyclic), so no colour maps to itself.
_COLOR_NAMES = tuple(shapes.COLORS)
COLOR_SWAP: dict[str, str] = {c: _COLOR_NAMES[(i + 1) % len(_COLOR_NAMES)] for i, c in enumerate(_COLOR_NAMES)}


def split_categories(split: str) -> tuple[shapes.Category, ...]:
    """The categories a split is scored on: all 36 pairs for "novel", else the base pairs."""
    if split not in shapes.SPLITS_WITH_BOXES:
        raise ValueError(f"split {split!r} has no boxes to score; choose one of {shapes.SPLITS_WITH_BOXES}")
    return shapes.CATEGORIES if split == "novel" else shapes.BASE_CATEGORIES


def prompt_names(categories: Sequence[shapes.Category], prompt_mode: str) -> list[str]:
    """The class names written into the prompt: true names, or colours swapped by COLOR_SWAP."""
    if prompt_mode == "true":
        return [c.name for c in categories]
    if prompt_mode == "swapped_colors":
        return [f"{COLOR_SWAP[c.color]} {c.shape}" for c in categories]
    raise ValueError(f"Unknown prompt_mode {prompt_mode!r}; choose one of {PROMPT_MODES}")


class AttributeTally:
    """Counts, over ground-truth objects, whether some detection overlaps the object at
    IoU >= iou_threshold ("found") and whether the best-scoring one names the object's
    colour and its shape. Boxes are xyxy in the +1 pixel convention."""

    def __init__(self, iou_threshold: float = 0.5):
        self.iou_threshold = iou_threshold
        self.objects = self.found = self.color_right = self.shape_right = 0

    def add_image(self, gt_boxes: np.ndarray, gt_labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                  labels: np.ndarray) -> None:
        self.objects += len(gt_boxes)
        for gt_label, hit in zip(gt_labels, box_iou(gt_boxes, boxes) >= self.iou_threshold):
            if not hit.any():
                continue
            truth = shapes.CATEGORY_BY_ID[int(gt_label)]
            best = shapes.CATEGORY_BY_ID[int(labels[hit][np.argmax(scores[hit])])]
            self.found += 1
            self.color_right += best.color == truth.color
            self.shape_right += best.shape == truth.shape

    def result(self) -> dict[str, float]:
        """found: found objects / objects; color_right, shape_right: / found objects (NaN if none)."""
        def share(count: int, total: int) -> float:
            return count / total if total else float("nan")

        return {"found": share(self.found, self.objects), "color_right": share(self.color_right, self.found),
                "shape_right": share(self.shape_right, self.found)}


def picture_detections(boxes: np.ndarray, scores: np.ndarray, min_score: float,
                       iou_threshold: float = 0.5) -> np.ndarray:
    """Indices of the detections to draw: score >= min_score, then class-agnostic NMS,
    so overlapping boxes of other classes give way to the best-scoring one and each
    object shows the model's best reading of it."""
    shown = np.flatnonzero(scores >= min_score)
    return shown[nms_keep(boxes[shown], scores[shown], iou_threshold)]


def _eval_examples(ds: tf.data.Dataset, tcfg: transforms.TransformConfig) -> tf.data.Dataset:
    """Records -> eval-transformed image, its size before and after resizing, and the
    ground truth in +1-convention xyxy."""

    def prepare(record):
        image = record["image"]
        out = transforms.transform(image, tf.zeros([0, 4]), {}, tf.zeros([2], tf.int64), tcfg, training=False)
        x0, y0, x1, y1 = tf.unstack(tf.reshape(record["objects"]["bbox"], [-1, 4]), axis=-1)
        return {
            "image": out["image"],
            "image_size": out["image_size"],
            "original_size": tf.shape(image)[:2],
            "image_id": record["image_id"],
            "gt_boxes": tf.stack([x0, y0, x1 - 1.0, y1 - 1.0], axis=-1),  # pixel-edge -> +1 convention
            "gt_labels": record["objects"]["category_id"],
        }

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


def _batches(examples, batch_size: int):
    """Lists of at most batch_size examples."""
    batch = []
    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_shapes(
    model: GLIP,
    params: Any,
    cfg: ml_collections.ConfigDict,
    data_dir: str | os.PathLike,
    split: str,
    prompt_mode: str = "true",
    max_images: int | None = None,
    *,
    batch_size: int | None = None,
    prompt_budget: int | None = None,
    progress: bool = True,
    picture: str | os.PathLike | None = None,
    picture_images: int = 12,
    picture_min_score: float = 0.3,
) -> dict[str, Any]:
    """AP of a GLIP model on a shapes split (built under data_dir if needed).

    Equal models reuse one compiled forward (inference.make_forward). cfg is the
    demo config (its data.shapes, sizes and tokenizer are read); texts are the
    model's max_text_len tokens and prompt chunks fit prompt_budget tokens (default:
    the same). Batches of batch_size images (default cfg.data.batch_size; the last
    one padded) keep one compiled shape. Progress lines go to stderr.

    Returns AP and AP50 over the split's categories, novel_AP and novel_AP50 on the
    novel pairs (novel split only), found, color_right and shape_right (AttributeTally),
    num_images, num_chunks, split and prompt_mode.
    With `picture`, the first picture_images images are drawn to that PNG with their
    detections scoring at least picture_min_score (picture_detections).
    """
    categories = split_categories(split)
    names = prompt_names(categories, prompt_mode)
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    batch_size = int(batch_size or cfg.data.batch_size)
    config_glip = model.config
    text_len = config_glip.max_text_len
    tokenizer = load_tokenizer(cfg.data.tokenizer or None)
    # Phrases padded to all 36 categories: every split and mode shares one compiled shape.
    chunks = build_prompt_chunks(names, [c.id for c in categories], tokenizer, text_len, prompt_budget,
                                 num_phrases=len(shapes.CATEGORIES))
    forward = make_forward(model)
    max_detections = config_glip.postprocess.max_detections

    ds = load_split(cfg.data.shapes, data_dir, split, max_records=max_images)
    total = int(ds.cardinality())
    examples = tfds.as_numpy(_eval_examples(ds, transform_config(cfg.data)))
    evaluator = CocoBoxEvaluator([(c.id, c.name) for c in shapes.CATEGORIES])
    tally = AttributeTally()
    names_by_id = {c.id: name for c, name in zip(categories, names)}
    drawn: list[Any] = []
    start = last_report = time.monotonic()
    done = 0
    for batch in _batches(examples, batch_size):
        count = len(batch)
        images = np.stack([e["image"] for e in batch])
        sizes = np.stack([e["image_size"] for e in batch]).astype(np.int32)
        if count < batch_size:  # pad to the compiled batch size
            images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:], images.dtype)])
            sizes = np.concatenate([sizes, np.repeat(sizes[-1:], batch_size - count, axis=0)])
        results = detect_chunked(forward, params, images, sizes, chunks, max_detections)
        for example, image, (boxes, scores, labels) in zip(batch, images, results):
            if picture is not None and len(drawn) < picture_images:
                (h, w), shown = example["image_size"], picture_detections(boxes, scores, picture_min_score)
                drawn.append(draw.draw_boxes(
                    transforms.denormalize(image)[:h, :w], boxes[shown],
                    [names_by_id[int(label)] for label in labels[shown]], scores[shown]))
            (rh, rw), (oh, ow) = example["image_size"], example["original_size"]
            scale = np.asarray([ow / rw, oh / rh, ow / rw, oh / rh])
            original = boxes * scale
            evaluator.add_image(
                example["image_id"], example["gt_boxes"], example["gt_labels"],
                original, scores, labels, height=oh, width=ow,
            )
            tally.add_image(example["gt_boxes"], example["gt_labels"], original, scores, labels)
        done += count
        now = time.monotonic()
        if progress and (now - last_report > 10.0 or done == total):
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if total > 0 else float("nan")
            print(f"eval shapes/{split} ({prompt_mode}): {done}/{total} images, {rate:.1f} images/s, "
                  f"ETA {eta:.0f}s", file=sys.stderr, flush=True)
            last_report = now
    if done == 0:
        raise ValueError(f"shapes split {split!r} gave no images to evaluate")
    if picture is not None:
        caption = f"{split}, prompt {prompt_mode}, score >= {picture_min_score}, class-agnostic NMS"
        captions = [caption] * len(drawn)
        with paths.as_path(picture).open("wb") as f:
            draw.image_grid(drawn, captions, cols=min(4, len(drawn))).save(f, format="PNG")

    report: dict[str, Any] = {"split": split, "prompt_mode": prompt_mode, "num_images": done,
                              "num_chunks": len(chunks)}
    overall = evaluator.result([c.id for c in categories])
    report.update(AP=overall["AP"], AP50=overall["AP50"])
    if split == "novel":
        novel = evaluator.result([c.id for c in shapes.NOVEL_CATEGORIES])
        report.update(novel_AP=novel["AP"], novel_AP50=novel["AP50"])
    report.update(tally.result())
    return report
