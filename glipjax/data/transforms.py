"""Box-aware image transforms in TensorFlow (usable inside tf.data.Dataset.map).

Boxes are absolute pixel xyxy in the reference's "+1" convention: a box covers the
pixel columns x1..x2 and rows y1..y2 inclusive, so its width is x2 - x1 + 1 and it
lies within [0, W-1] x [0, H-1].

Training (reference section 2): the short side is drawn from `short_sides` and the
long side capped at `max_size` (the reference's size rule, integer truncation
included); boxes scale by new/old size per axis; horizontal flip with probability
`flip_prob` maps x1' = W - 1 - x2, x2' = W - 1 - x1. Evaluation uses the fixed
`eval_short_side`/`eval_max_size` and no flip. When the resized image does not fit
the fixed canvas (e.g. a portrait image on an 800x1344 canvas) it is scaled down
further, keeping its aspect ratio, until it fits. Pixels become BGR float32,
(x - mean) / std with the reference mean/std, and are zero-padded (after
normalisation, as the reference pads its image list) at the bottom and right to the
canvas.

Boxes are clipped to the resized image; a box with x2 <= x1 or y2 <= y1 afterwards
is dropped (the reference's remove-empty rule), together with its per-box rows.
Randomness is stateless: every draw takes a (2,) int seed, so one seed gives one
result whatever the order or parallelism of the pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from glipjax.models.glip import PIXEL_MEAN_BGR, PIXEL_STD_BGR, SIZE_DIVISIBILITY


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Sizes of the resize, flip and padding steps (pixels)."""

    canvas: tuple[int, int] = (800, 1344)  # (height, width), multiples of 32
    short_sides: tuple[int, ...] = (480, 560, 640, 720, 800)
    max_size: int = 1333
    eval_short_side: int = 800
    eval_max_size: int = 1333
    flip_prob: float = 0.5
    max_boxes: int = 100

    def __post_init__(self):
        if len(self.canvas) != 2 or any(c <= 0 or c % SIZE_DIVISIBILITY for c in self.canvas):
            raise ValueError(f"canvas must be (height, width), multiples of {SIZE_DIVISIBILITY}; got {self.canvas}.")
        if not self.short_sides or min(self.short_sides) < 1:
            raise ValueError(f"short_sides must be non-empty positive sizes, got {self.short_sides}.")
        if self.max_size < max(self.short_sides) or self.eval_max_size < self.eval_short_side:
            raise ValueError("max sizes must be at least the short sides they cap.")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}.")
        if self.max_boxes < 1:
            raise ValueError(f"max_boxes must be at least 1, got {self.max_boxes}.")


def resized_size(
    height: tf.Tensor, width: tf.Tensor, short_side: tf.Tensor, max_size: int, canvas: Sequence[int]
) -> tuple[tf.Tensor, tf.Tensor]:
    """The (height, width) after resizing: the reference's rule (short side to
    `short_side` unless the long side would pass `max_size`; the other side truncated
    to an integer), then shrunk with its aspect ratio if it exceeds `canvas`."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    size = tf.cast(short_side, tf.float64)
    lo, hi = tf.minimum(h, w), tf.maximum(h, w)
    size = tf.where(hi / lo * size > max_size, tf.round(max_size * lo / hi), size)
    keep = ((w <= h) & tf.equal(w, size)) | ((h <= w) & tf.equal(h, size))
    oh = tf.where(keep, h, tf.where(w < h, tf.floor(size * h / w), size))
    ow = tf.where(keep, w, tf.where(w < h, size, tf.floor(size * w / h)))
    ch, cw, one = (tf.constant(v, tf.float64) for v in (canvas[0], canvas[1], 1.0))
    fit = tf.minimum(one, tf.minimum(ch / oh, cw / ow))
    oh = tf.where(fit < one, tf.minimum(ch, tf.floor(oh * fit)), oh)
    ow = tf.where(fit < one, tf.minimum(cw, tf.floor(ow * fit)), ow)
    return tf.cast(oh, tf.int32), tf.cast(ow, tf.int32)


def resize(image: tf.Tensor, boxes: tf.Tensor, size: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Bilinear resize of a uint8 image to `size` = (height, width), as float32 0..255
    (antialiased when shrinking; enlarging needs no antialiasing, and skipping it is
    about 3x faster), with boxes scaled by new/old size per axis."""
    old = tf.cast(tf.shape(image)[:2], tf.float32)
    target = tf.stack(size)
    shrink = tf.reduce_any(target < tf.shape(image)[:2])
    out = tf.cond(
        shrink,
        lambda: tf.image.resize(image, target, method="bilinear", antialias=True),
        lambda: tf.image.resize(image, target, method="bilinear", antialias=False),
    )
    ratio_h = tf.cast(size[0], tf.float32) / old[0]
    ratio_w = tf.cast(size[1], tf.float32) / old[1]
    return out, boxes * tf.stack([ratio_w, ratio_h, ratio_w, ratio_h])


def hflip(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirrors the image left-right; x1' = W - 1 - x2 and x2' = W - 1 - x1."""
    width = tf.cast(tf.shape(image)[1], boxes.dtype)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    return image[:, ::-1], tf.stack([width - 1.0 - x2, y1, width - 1.0 - x1, y2], axis=-1)


def clip_and_keep(boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Clips boxes to [0, W-1] x [0, H-1]; returns them and the mask of boxes that
    are not degenerate (x2 > x1 and y2 > y1)."""
    w1 = tf.cast(width, boxes.dtype) - 1.0
    h1 = tf.cast(height, boxes.dtype) - 1.0
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    boxes = tf.stack(
        [tf.clip_by_value(x1, 0.0, w1), tf.clip_by_value(y1, 0.0, h1),
         tf.clip_by_value(x2, 0.0, w1), tf.clip_by_value(y2, 0.0, h1)], axis=-1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, keep


_INV_STD = 1.0 / np.asarray(PIXEL_STD_BGR, np.float64)
_SCALE = _INV_STD.astype(np.float32)
_SHIFT = (-np.asarray(PIXEL_MEAN_BGR, np.float64) * _INV_STD).astype(np.float32)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """RGB 0..255 (any dtype) -> BGR float32 with the reference mean/std."""
    return _normalize_bgr(tf.cast(image, tf.float32)[..., ::-1])


def _normalize_bgr(bgr: tf.Tensor) -> tf.Tensor:
    """(bgr - mean) / std as one multiply-add over the float32 BGR image."""
    return bgr * _SCALE + _SHIFT


def denormalize(image: np.ndarray) -> np.ndarray:
    """Inverse of `normalize` for numpy arrays: BGR normalised -> RGB uint8."""
    bgr = np.asarray(image, np.float32) * np.asarray(PIXEL_STD_BGR, np.float32) + np.asarray(PIXEL_MEAN_BGR, np.float32)
    return np.clip(np.round(bgr[..., ::-1]), 0, 255).astype(np.uint8)


def pad_rows(values: tf.Tensor, count: int) -> tf.Tensor:
    """Zero-pads (or truncates) the leading axis of `values` to `count` rows."""
    values = values[:count]
    pad = count - tf.shape(values)[0]
    paddings = tf.concat([[[0, pad]], tf.zeros([tf.rank(values) - 1, 2], tf.int32)], axis=0)
    out = tf.pad(values, paddings)
    return tf.ensure_shape(out, [count] + values.shape[1:].as_list())


def transform(
    image: tf.Tensor,
    boxes: tf.Tensor,
    per_box: Mapping[str, tf.Tensor],
    seed: tf.Tensor,
    config: TransformConfig,
    *,
    training: bool,
) -> dict[str, tf.Tensor]:
    """Resizes (multi-scale when training), flips (training), normalises and pads one
    example. `image` is uint8 (H, W, 3) RGB, `boxes` float32 (N, 4), `per_box` holds
    tensors with N leading rows that follow their boxes (e.g. positive-map rows) and
    `seed` a (2,) integer seed.

    Returns image (canvas_h, canvas_w, 3) float32, image_size (2,) int32 (height,
    width before padding), boxes (max_boxes, 4), box_mask (max_boxes,) bool, each
    `per_box` entry padded to max_boxes rows, and the counts of boxes dropped as
    degenerate ("dropped_degenerate") and beyond max_boxes ("dropped_max_boxes").
    """
    boxes = tf.ensure_shape(tf.cast(boxes, tf.float32), [None, 4])
    shape = tf.shape(image)
    seed = tf.cast(seed, tf.int64)
    if training:
        size_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        pick = tf.random.stateless_uniform([], size_seed, 0, len(config.short_sides), tf.int32)
        short_side = tf.gather(tf.constant(config.short_sides, tf.int32), pick)
        size = resized_size(shape[0], shape[1], short_side, config.max_size, config.canvas)
    else:
        size = resized_size(shape[0], shape[1], config.eval_short_side, config.eval_max_size, config.canvas)
    image, boxes = resize(image[..., ::-1], boxes, size)  # BGR: reversing uint8 channels is cheap
    if training:
        flip = tf.random.stateless_uniform([], flip_seed) < config.flip_prob
        image, boxes = tf.cond(flip, lambda: hflip(image, boxes), lambda: (image, boxes))
    boxes, keep = clip_and_keep(boxes, size[0], size[1])
    boxes = tf.boolean_mask(boxes, keep)
    kept = {k: tf.boolean_mask(v, keep) for k, v in per_box.items()}
    num_kept = tf.shape(boxes)[0]

    image = _normalize_bgr(image)
    image = tf.image.pad_to_bounding_box(image, 0, 0, config.canvas[0], config.canvas[1])
    out = {
        "image": tf.ensure_shape(image, [config.canvas[0], config.canvas[1], 3]),
        "image_size": tf.stack(size),
        "boxes": pad_rows(boxes, config.max_boxes),
        "box_mask": tf.range(config.max_boxes) < num_kept,
        "dropped_degenerate": tf.reduce_sum(tf.cast(~keep, tf.int32)),
        "dropped_max_boxes": tf.maximum(num_kept - config.max_boxes, 0),
    }
    for key, value in kept.items():
        out[key] = pad_rows(value, config.max_boxes)
    return out
