"""Box utilities in jnp: areas, IoU, GIoU, clipping, format conversions and a
static-shape multi-label NMS.

Boxes are `xyxy` in input-image pixels (x = column, y = row). Functions with a
`legacy` flag follow the reference detector's "+1" pixel convention when it is
True: a box [x1, y1, x2, y2] covers x2 - x1 + 1 columns. All functions broadcast
over leading dimensions and work under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_boxes(boxes: Array, name: str) -> None:
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"{name} must have a last dimension of 4 (x1, y1, x2, y2); got shape {boxes.shape}.")


def box_area(boxes: Array, legacy: bool = True) -> Array:
    """Area of xyxy boxes, (..., 4) -> (...); with `legacy` widths are x2 - x1 + 1."""
    _check_boxes(boxes, "boxes")
    one = 1.0 if legacy else 0.0
    return (boxes[..., 2] - boxes[..., 0] + one) * (boxes[..., 3] - boxes[..., 1] + one)


def iou(a: Array, b: Array, legacy: bool = True) -> Array:
    """IoU of broadcast pairs of boxes (..., 4) x (..., 4) -> (...).

    With `legacy` (the reference's boxlist_iou and NMS kernel) the intersection is
    max(min(x2) - max(x1) + 1, 0) wide and the areas use +1 widths.
    """
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    one = 1.0 if legacy else 0.0
    w = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]) + one, 0.0)
    h = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]) + one, 0.0)
    inter = w * h
    return inter / (box_area(a, legacy) + box_area(b, legacy) - inter)


def pairwise_iou(a: Array, b: Array, legacy: bool = True) -> Array:
    """IoU matrix of (N, 4) and (M, 4) boxes -> (N, M)."""
    return iou(a[:, None, :], b[None, :, :], legacy)


def generalized_iou(a: Array, b: Array, eps: float = 1e-7) -> Array:
    """GIoU of broadcast pairs of boxes (..., 4) x (..., 4) -> (...), areas without +1.

    `eps` is added to the union and to the enclosing area, as in the reference
    GIoU loss. Boxes must have x2 >= x1 and y2 >= y1.
    """
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    iw = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    union = box_area(a, False) + box_area(b, False) - inter + eps
    enclosing = (jnp.maximum(a[..., 2], b[..., 2]) - jnp.minimum(a[..., 0], b[..., 0])) * (
        jnp.maximum(a[..., 3], b[..., 3]) - jnp.minimum(a[..., 1], b[..., 1])
    ) + eps
    return inter / union - (enclosing - union) / enclosing


def clip_boxes(boxes: Array, height: Array | float, width: Array | float) -> Array:
    """Clips xyxy boxes to [0, width - 1] x [0, height - 1] (legacy pixel grid).

    `height` and `width` broadcast against boxes[..., 0] (e.g. shape (B, 1) for
    (B, K, 4) boxes). Empty boxes are kept.
    """
    _check_boxes(boxes, "boxes")
    xmax = jnp.asarray(width, boxes.dtype) - 1
    ymax = jnp.asarray(height, boxes.dtype) - 1
    x1 = jnp.clip(boxes[..., 0], 0, xmax)
    y1 = jnp.clip(boxes[..., 1], 0, ymax)
    x2 = jnp.clip(boxes[..., 2], 0, xmax)
    y2 = jnp.clip(boxes[..., 3], 0, ymax)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def xywh_to_xyxy(boxes: Array, legacy: bool = True) -> Array:
    """[x, y, w, h] -> [x1, y1, x2, y2]; with `legacy` x2 = x + w - 1 (COCO loading)."""
    _check_boxes(boxes, "boxes")
    one = 1.0 if legacy else 0.0
    x, y, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([x, y, x + w - one, y + h - one], axis=-1)


def xyxy_to_xywh(boxes: Array, legacy: bool = True) -> Array:
    """[x1, y1, x2, y2] -> [x, y, w, h]; with `legacy` w = x2 - x1 + 1."""
    _check_boxes(boxes, "boxes")
    one = 1.0 if legacy else 0.0
    x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([x1, y1, x2 - x1 + one, y2 - y1 + one], axis=-1)


def xyxy_to_cxcywh(boxes: Array) -> Array:
    """[x1, y1, x2, y2] -> [cx, cy, w, h] (continuous coordinates, no +1)."""
    _check_boxes(boxes, "boxes")
    x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes: Array) -> Array:
    """[cx, cy, w, h] -> [x1, y1, x2, y2] (continuous coordinates, no +1)."""
    _check_boxes(boxes, "boxes")
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def multilabel_nms(
    boxes: Array,
    scores: Array,
    labels: Array,
    valid: Array,
    iou_threshold: float,
    max_output: int | None = None,
) -> tuple[Array, Array]:
    """Greedy class-wise NMS with static shapes, as the reference's CUDA `ml_nms`.

    Boxes (K, 4) are visited in order of descending score (a stable sort, so equal
    scores keep their input order). A box is dropped when an already kept box of
    the same label has legacy (+1) IoU strictly greater than `iou_threshold`,
    computed in float32; IoU exactly at the threshold is kept. Entries with
    `valid` False are ignored.

    Returns (indices, mask), both of length `max_output` (default K): the input
    indices of the kept boxes in descending score order, padded with 0 where mask
    is False. Unlike the reference (which returns the kept indices in ascending
    index order), the output is ordered by score; the kept set is the same. The
    loop runs once per valid box.
    """
    _check_boxes(boxes, "boxes")
    if boxes.ndim != 2 or not scores.shape == labels.shape == valid.shape == boxes.shape[:1]:
        raise ValueError(
            "multilabel_nms expects boxes (K, 4) and scores, labels, valid of shape (K,); got "
            f"{boxes.shape}, {scores.shape}, {labels.shape}, {valid.shape}."
        )
    num = boxes.shape[0]
    max_output = num if max_output is None else max_output
    boxes = boxes.astype(jnp.float32)
    scores = scores.astype(jnp.float32)
    valid = valid.astype(bool)

    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    sorted_boxes = boxes[order]
    sorted_labels = labels[order]
    num_valid = valid.sum()

    def body(state: tuple[Array, Array]) -> tuple[Array, Array]:
        i, suppressed = state
        keep_i = ~suppressed[i]
        overlaps = iou(sorted_boxes[i], sorted_boxes) > iou_threshold
        later = jnp.arange(num) > i
        same = sorted_labels == sorted_labels[i]
        return i + 1, suppressed | (keep_i & later & same & overlaps)

    _, suppressed = jax.lax.while_loop(
        lambda state: state[0] < num_valid, body, (jnp.int32(0), jnp.zeros((num,), bool))
    )
    kept = ~suppressed & (jnp.arange(num) < num_valid)
    # Kept positions first (they stay in score order), then the rest.
    pos = jnp.argsort(~kept, stable=True)
    if max_output > num:
        pos = jnp.concatenate([pos, jnp.zeros((max_output - num,), pos.dtype)])
    pos = pos[:max_output]
    mask = jnp.arange(max_output) < kept.sum()
    return jnp.where(mask, order[pos], 0), mask
