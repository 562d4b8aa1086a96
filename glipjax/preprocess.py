"""Model input from an image file, in numpy and PIL (no TensorFlow).

The same maths as the evaluation transform of the data pipeline
(glipjax.data.transforms): the short side goes to `short_side` unless the long side
would pass `max_size` (the reference's rule, integer truncation included), the result
is shrunk further with its aspect ratio if it exceeds the canvas, the resize is
bilinear with half-pixel centres (antialiased, i.e. a widened triangle filter, when
shrinking), pixels become BGR (x - mean) / std and are zero-padded at the bottom and
right to the canvas.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from glipjax.models.glip import PIXEL_MEAN_BGR, PIXEL_STD_BGR, SIZE_DIVISIBILITY


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3), turned upright by its EXIF orientation.
    Raises OSError (PIL's UnidentifiedImageError included) for files PIL cannot decode."""
    with Image.open(path) as image:
        image.load()
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def resized_size(height: int, width: int, short_side: int, max_size: int, canvas: Sequence[int]) -> tuple[int, int]:
    """(height, width) after resizing; glipjax.data.transforms.resized_size in numpy."""
    h, w, size = float(height), float(width), float(short_side)
    lo, hi = min(h, w), max(h, w)
    if hi / lo * size > max_size:
        size = float(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        oh, ow = h, w
    elif w < h:
        oh, ow = math.floor(size * h / w), size
    else:
        oh, ow = size, math.floor(size * w / h)
    fit = min(1.0, canvas[0] / oh, canvas[1] / ow)
    if fit < 1.0:
        oh, ow = min(canvas[0], math.floor(oh * fit)), min(canvas[1], math.floor(ow * fit))
    return int(oh), int(ow)


def _weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) bilinear weights with half-pixel centres; when shrinking the
    triangle is widened by in/out (antialiasing), as tf.image.resize(antialias=True)."""
    inv_scale = in_size / out_size
    width = max(inv_scale, 1.0)
    centres = (np.arange(out_size) + 0.5) * inv_scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(in_size)[None, :]) / width)
    return weights / weights.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (size[0], size[1], C) on the 0..255 scale."""
    rows = _weights(image.shape[0], size[0]).astype(np.float32)
    cols = _weights(image.shape[1], size[1]).astype(np.float32)
    out = np.tensordot(rows, image.astype(np.float32), axes=(1, 0))
    return np.einsum("wx,hxc->hwc", cols, out, optimize=True)


def normalize(rgb: np.ndarray) -> np.ndarray:
    """RGB 0..255 -> BGR float32 (x - mean) / std."""
    bgr = np.asarray(rgb, np.float32)[..., ::-1]
    return (bgr - np.asarray(PIXEL_MEAN_BGR, np.float32)) / np.asarray(PIXEL_STD_BGR, np.float32)


def prepare(image: np.ndarray, short_side: int, max_size: int, canvas: Sequence[int]) -> tuple[np.ndarray, tuple[int, int]]:
    """An RGB uint8 image as model input: (canvas_h, canvas_w, 3) float32 and the
    (height, width) of the resized image inside it."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if len(canvas) != 2 or any(c <= 0 or c % SIZE_DIVISIBILITY for c in canvas):
        raise ValueError(f"canvas must be (height, width), multiples of {SIZE_DIVISIBILITY}; got {tuple(canvas)}")
    size = resized_size(image.shape[0], image.shape[1], short_side, max_size, canvas)
    out = np.zeros((canvas[0], canvas[1], 3), np.float32)
    out[: size[0], : size[1]] = normalize(resize(image, size))
    return out, size
