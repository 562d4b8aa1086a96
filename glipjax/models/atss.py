"""Anchors, the box coder and ATSS target assignment (static shapes, jittable).

Anchors follow the reference's legacy "+1" pixel convention: one square anchor
per feature-map location, of side `size` centred at (x*s + (s-1)/2, y*s + (s-1)/2),
i.e. [c - (size-1)/2, c + (size-1)/2]; stride 8 with size 64 starts at
[-28, -28, 35, 35]. Locations are row-major (index = y*w + x) and levels are
concatenated from fine to coarse, so per-level tensors flattened the same way line
up with the anchors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glipjax import boxes as box_ops

Array = jax.Array

STRIDES = (8, 16, 32, 64, 128)
ANCHOR_SIZES = (64, 128, 256, 512, 1024)


def feature_sizes(height: int, width: int, strides: Sequence[int] = STRIDES) -> list[tuple[int, int]]:
    """(h, w) of each pyramid level for a height x width input: ceil(size / stride)."""
    return [(-(-height // s), -(-width // s)) for s in strides]


def generate_anchors(
    sizes_hw: Sequence[tuple[int, int]],
    strides: Sequence[int] = STRIDES,
    anchor_sizes: Sequence[float] = ANCHOR_SIZES,
) -> list[np.ndarray]:
    """Anchors per level, each (h*w, 4) float32 xyxy, for static feature sizes.

    Returned as numpy constants: they depend only on the static shapes.
    """
    if not len(sizes_hw) == len(strides) == len(anchor_sizes):
        raise ValueError(
            f"Need one stride and one anchor size per level: {len(sizes_hw)} levels, "
            f"{len(strides)} strides, {len(anchor_sizes)} sizes."
        )
    anchors = []
    for (h, w), stride, size in zip(sizes_hw, strides, anchor_sizes):
        centre = (stride - 1) / 2
        half = (size - 1) / 2
        base = np.array([centre - half, centre - half, centre + half, centre + half], np.float32)
        sx = np.arange(w, dtype=np.float32) * stride
        sy = np.arange(h, dtype=np.float32) * stride
        yy, xx = np.meshgrid(sy, sx, indexing="ij")
        shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 4)
        anchors.append(shifts + base)
    return anchors


@dataclasses.dataclass(frozen=True)
class BoxCoder:
    """Anchor-relative box deltas (dx, dy, dw, dh) with legacy +1 widths.

    encode: w = x2 - x1 + 1, centre = x1 + w/2 for both boxes;
    dx = wx (gt_cx - a_cx) / a_w, dw = ww log(gt_w / a_w) (same for y, h).
    decode: deltas divided by the weights, dw and dh clamped at `clip`, then
    x1 = cx - w/2 and x2 = cx + w/2 - 1 (the same as cx' -/+ (w - 1)/2 about the
    +1 centre). Everything broadcasts over leading dimensions, in float32.
    """

    weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    clip: float = math.log(1000.0 / 16)

    def encode(self, gt_boxes: Array, anchors: Array) -> Array:
        """Deltas that take `anchors` to `gt_boxes` (both (..., 4) xyxy)."""
        gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
        anchors = jnp.asarray(anchors, jnp.float32)
        aw = anchors[..., 2] - anchors[..., 0] + 1
        ah = anchors[..., 3] - anchors[..., 1] + 1
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        gw = gt_boxes[..., 2] - gt_boxes[..., 0] + 1
        gh = gt_boxes[..., 3] - gt_boxes[..., 1] + 1
        gx = gt_boxes[..., 0] + 0.5 * gw
        gy = gt_boxes[..., 1] + 0.5 * gh
        wx, wy, ww, wh = self.weights
        return jnp.stack(
            [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * jnp.log(gw / aw), wh * jnp.log(gh / ah)], axis=-1
        )

    def decode(self, deltas: Array, anchors: Array) -> Array:
        """Boxes (..., 4) xyxy from deltas (..., 4) relative to `anchors`."""
        deltas = jnp.asarray(deltas, jnp.float32)
        anchors = jnp.asarray(anchors, jnp.float32)
        aw = anchors[..., 2] - anchors[..., 0] + 1
        ah = anchors[..., 3] - anchors[..., 1] + 1
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        wx, wy, ww, wh = self.weights
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = jnp.minimum(deltas[..., 2] / ww, self.clip)
        dh = jnp.minimum(deltas[..., 3] / wh, self.clip)
        cx = dx * aw + ax
        cy = dy * ah + ay
        w = jnp.exp(dw) * aw
        h = jnp.exp(dh) * ah
        return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1], axis=-1)


def centerness_from_boxes(gt_boxes: Array, anchors: Array) -> Array:
    """sqrt(min(l, r)/max(l, r) * min(t, b)/max(t, b)) of the anchor centre
    ((x1 + x2)/2) inside `gt_boxes`, both (..., 4)."""
    cx = (anchors[..., 0] + anchors[..., 2]) / 2
    cy = (anchors[..., 1] + anchors[..., 3]) / 2
    l, r = cx - gt_boxes[..., 0], gt_boxes[..., 2] - cx
    t, b = cy - gt_boxes[..., 1], gt_boxes[..., 3] - cy
    ratio = (jnp.minimum(l, r) / jnp.maximum(l, r)) * (jnp.minimum(t, b) / jnp.maximum(t, b))
    return jnp.sqrt(ratio)


class AtssTargets(NamedTuple):
    """Per-anchor training targets; A = anchors of all levels, L = text tokens."""

    matched: Array  # (B, A) int32: index of the assigned GT, -1 when unassigned
    regression: Array  # (B, A, 4) float32: encoded deltas of the GT (0 when unassigned)
    centerness: Array  # (B, A) float32: centerness target (0 when unassigned)
    tokens: Array  # (B, A, L) float32: the GT's binarised positive-map row; no-object row otherwise


def atss_assign(
    anchors: Array,
    level_sizes: Sequence[int],
    gt_boxes: Array,
    gt_mask: Array,
    gt_positive_map: Array,
    *,
    top_k: int = 9,
    box_coder: BoxCoder = BoxCoder(),
) -> AtssTargets:
    """ATSS assignment for a batch of images with padded ground truth.

    Args:
      anchors: (A, 4) anchors of all levels concatenated (shared by the batch).
      level_sizes: static number of anchors of each level, summing to A.
      gt_boxes: (B, G, 4) xyxy GT boxes, padded to G.
      gt_mask: (B, G) True for real boxes.
      gt_positive_map: (B, G, L) token map of each box (0/1 or normalised; it is
        binarised with > 0).
      top_k: candidates per level and GT (anchors nearest to the GT centre).

    Per GT, the candidates are the `top_k` anchors of each level whose centres are
    nearest to the GT centre (lower anchor index first on equal distance). The IoU
    threshold is mean + unbiased std of the candidates' legacy IoUs; a candidate is
    positive when its IoU >= threshold and its centre is inside the GT by more than
    0.01 px on every side. An anchor positive for several GTs takes the one with the
    highest IoU (the lowest GT index on ties). Unassigned anchors get the token row
    with a single 1 at the last position L - 1 (the reference's "no object"
    target, which counts in the loss only when the text mask covers L - 1).
    """
    anchors = jnp.asarray(anchors, jnp.float32)
    level_sizes = tuple(int(n) for n in level_sizes)
    if anchors.ndim != 2 or anchors.shape[-1] != 4 or sum(level_sizes) != anchors.shape[0]:
        raise ValueError(f"anchors must be (A, 4) with A = sum(level_sizes) = {sum(level_sizes)}; got {anchors.shape}.")
    if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be (B, G, 4); got {gt_boxes.shape}.")
    if gt_positive_map.ndim != 3 or not gt_mask.shape == gt_positive_map.shape[:2] == gt_boxes.shape[:2]:
        raise ValueError(
            f"gt_mask must be (B, G) and gt_positive_map (B, G, L) for gt_boxes {gt_boxes.shape}; "
            f"got {gt_mask.shape} and {gt_positive_map.shape}."
        )
    if top_k < 2:
        raise ValueError(f"top_k must be >= 2 (the threshold uses an unbiased std); got {top_k}.")

    def one(boxes: Array, mask: Array, token_map: Array) -> AtssTargets:
        return _assign_one(anchors, level_sizes, boxes, mask, token_map, top_k, box_coder)

    return jax.vmap(one)(jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(gt_mask, bool), gt_positive_map)


def _assign_one(
    anchors: Array,
    level_sizes: tuple[int, ...],
    gt_boxes: Array,
    gt_mask: Array,
    token_map: Array,
    top_k: int,
    box_coder: BoxCoder,
) -> AtssTargets:
    num_anchors = anchors.shape[0]
    num_gt = gt_boxes.shape[0]
    ious = box_ops.pairwise_iou(gt_boxes, anchors)  # (G, A)

    acx = (anchors[:, 0] + anchors[:, 2]) / 2
    acy = (anchors[:, 1] + anchors[:, 3]) / 2
    gcx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
    gcy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    dist = jnp.sqrt((acx[None] - gcx[:, None]) ** 2 + (acy[None] - gcy[:, None]) ** 2)  # (G, A)

    candidates = []
    start = 0
    for n in level_sizes:
        k = min(top_k, n)
        _, idx = jax.lax.top_k(-dist[:, start : start + n], k)
        candidates.append(idx + start)
        start += n
    cand = jnp.concatenate(candidates, axis=1)  # (G, C)

    cand_iou = jnp.take_along_axis(ious, cand, axis=1)
    threshold = cand_iou.mean(axis=1) + cand_iou.std(axis=1, ddof=1)
    cx, cy = acx[cand], acy[cand]
    inside = jnp.minimum(
        jnp.minimum(cx - gt_boxes[:, 0:1], cy - gt_boxes[:, 1:2]),
        jnp.minimum(gt_boxes[:, 2:3] - cx, gt_boxes[:, 3:4] - cy),
    ) > 0.01
    positive = (cand_iou >= threshold[:, None]) & inside & gt_mask[:, None]

    # Candidates of one GT are distinct anchors, so the scatter has no collisions.
    rows = jnp.broadcast_to(jnp.arange(num_gt)[:, None], cand.shape)
    claimed = jnp.full((num_gt, num_anchors), -jnp.inf, jnp.float32)
    claimed = claimed.at[rows, cand].set(jnp.where(positive, cand_iou, -jnp.inf))
    best = jnp.argmax(claimed, axis=0)
    assigned = jnp.max(claimed, axis=0) > -jnp.inf
    matched = jnp.where(assigned, best, -1).astype(jnp.int32)

    matched_boxes = jnp.where(assigned[:, None], gt_boxes[best], anchors)
    regression = jnp.where(assigned[:, None], box_coder.encode(matched_boxes, anchors), 0.0)
    # As the reference: centerness of the anchor centre in the decoded target box.
    centerness = centerness_from_boxes(box_coder.decode(regression, anchors), anchors)
    centerness = jnp.where(assigned, centerness, 0.0)

    no_object = jnp.zeros((token_map.shape[-1],), jnp.float32).at[-1].set(1.0)
    rows_tokens = (token_map > 0).astype(jnp.float32)[best]
    tokens = jnp.where(assigned[:, None], rows_tokens, no_object)
    return AtssTargets(matched, regression, centerness, tokens)
