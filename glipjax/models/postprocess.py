"""Inference post-processing of the ATSS grounding head, with static shapes.

Per image and level: the class probability of (location, phrase) is the mean of
the sigmoids of the phrase's token logits; (location, phrase) pairs whose
probability exceeds `pre_nms_thresh` are candidates, of which the top
`pre_nms_top_n` by probability * sigmoid(centerness) are kept. Their boxes are
decoded, clipped to [0, W-1] x [0, H-1] and scored sqrt(probability *
sigmoid(centerness)). Then class-wise NMS over all levels and the best
`max_detections` by score, as the reference ATSS post-processor.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from glipjax import boxes as box_ops
from glipjax.models.atss import BoxCoder

Array = jax.Array


class Detections(NamedTuple):
    """Fixed-size detections, sorted by descending score; D = max_detections."""

    boxes: Array  # (B, D, 4) float32 xyxy in input pixels
    scores: Array  # (B, D) float32
    labels: Array  # (B, D) int32: phrase index + 1
    valid: Array  # (B, D) bool


def phrase_probabilities(token_probs: Array, positive_map: Array, phrase_mask: Array) -> Array:
    """Mean token probability of each phrase: (N, L) x (P, L) -> (N, P).

    `positive_map` rows may be 0/1 or normalised: the tokens with a positive entry
    are averaged with equal weight. Masked or empty phrases get 0.
    """
    tokens = (positive_map > 0).astype(jnp.float32)
    count = tokens.sum(-1)
    total = jnp.einsum("nl,pl->np", token_probs, tokens, precision=jax.lax.Precision.HIGHEST)
    ok = phrase_mask.astype(bool) & (count > 0)
    return jnp.where(ok, total / jnp.maximum(count, 1.0), 0.0)


def postprocess(
    token_logits: Sequence[Array],
    box_regression: Sequence[Array],
    centerness: Sequence[Array],
    anchors: Sequence[Array],
    positive_map: Array,
    phrase_mask: Array,
    image_sizes: Array,
    *,
    pre_nms_thresh: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_thresh: float = 0.6,
    max_detections: int = 100,
    min_size: float = 0.0,
    box_coder: BoxCoder = BoxCoder(),
) -> Detections:
    """Detections from the per-level head outputs.

    Args:
      token_logits: per level (B, h*w, L) dot-product logits (row-major locations).
      box_regression: per level (B, h, w, 4) deltas (dx, dy, dw, dh).
      centerness: per level (B, h, w, 1) logits.
      anchors: per level (h*w, 4) anchors.
      positive_map: (P, L) or (B, P, L) phrase-to-token map (0/1 or normalised).
      phrase_mask: (P,) or (B, P), True for real phrases.
      image_sizes: (B, 2) (height, width) of each image in pixels, for clipping.

    When more than `max_detections` boxes survive NMS the highest-scoring ones are
    kept (the reference keeps every score >= the max_detections-th largest, which
    can keep more on exact ties). `min_size` drops boxes whose +1 width or height
    is below it.
    """
    num_levels = len(token_logits)
    if not num_levels or not len(box_regression) == len(centerness) == len(anchors) == num_levels:
        raise ValueError(
            f"Need the same number (> 0) of levels for every input; got {len(token_logits)} token logits, "
            f"{len(box_regression)} box regressions, {len(centerness)} centerness maps, {len(anchors)} anchor sets."
        )
    batch = token_logits[0].shape[0]
    if positive_map.ndim == 2:
        positive_map = jnp.broadcast_to(positive_map, (batch,) + positive_map.shape)
    if phrase_mask.ndim == 1:
        phrase_mask = jnp.broadcast_to(phrase_mask, (batch,) + phrase_mask.shape)
    if positive_map.shape[0] != batch or phrase_mask.shape != positive_map.shape[:2]:
        raise ValueError(
            f"positive_map (B, P, L) and phrase_mask (B, P) do not match batch {batch}: "
            f"{positive_map.shape}, {phrase_mask.shape}."
        )
    if image_sizes.shape != (batch, 2):
        raise ValueError(f"image_sizes must be (B, 2) = {(batch, 2)}; got {image_sizes.shape}.")
    num_tokens = positive_map.shape[-1]

    level_boxes, level_scores, level_labels, level_valid = [], [], [], []
    for logits, reg, ctr, anc in zip(token_logits, box_regression, centerness, anchors):
        b, h, w, _ = reg.shape
        if logits.shape != (batch, h * w, num_tokens) or ctr.shape != (batch, h, w, 1) or anc.shape != (h * w, 4):
            raise ValueError(
                f"Level of size {h}x{w}: expected token logits {(batch, h * w, num_tokens)}, centerness "
                f"{(batch, h, w, 1)}, anchors {(h * w, 4)}; got {logits.shape}, {ctr.shape}, {anc.shape}."
            )
        out = jax.vmap(
            lambda lg, rg, ct, pm, mk: _select_level(
                lg, rg, ct, anc, pm, mk, pre_nms_thresh, pre_nms_top_n, box_coder
            )
        )(
            jnp.asarray(logits, jnp.float32),
            jnp.asarray(reg, jnp.float32).reshape(b, h * w, 4),
            jnp.asarray(ctr, jnp.float32).reshape(b, h * w),
            positive_map,
            phrase_mask,
        )
        for acc, value in zip((level_boxes, level_scores, level_labels, level_valid), out):
            acc.append(value)

    boxes = jnp.concatenate(level_boxes, axis=1)
    scores = jnp.concatenate(level_scores, axis=1)
    labels = jnp.concatenate(level_labels, axis=1)
    valid = jnp.concatenate(level_valid, axis=1)

    sizes = jnp.asarray(image_sizes, jnp.float32)
    boxes = box_ops.clip_boxes(boxes, sizes[:, 0:1], sizes[:, 1:2])
    valid &= (boxes[..., 2] - boxes[..., 0] + 1 >= min_size) & (boxes[..., 3] - boxes[..., 1] + 1 >= min_size)

    def nms(bx: Array, sc: Array, lb: Array, vd: Array) -> tuple[Array, Array]:
        return box_ops.multilabel_nms(bx, sc, lb, vd, nms_thresh, max_detections)

    keep, keep_valid = jax.vmap(nms)(boxes, scores, labels, valid)
    out_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1)
    out_scores = jnp.take_along_axis(scores, keep, axis=1)
    out_labels = jnp.take_along_axis(labels, keep, axis=1)
    return Detections(
        boxes=jnp.where(keep_valid[..., None], out_boxes, 0.0),
        scores=jnp.where(keep_valid, out_scores, 0.0),
        labels=jnp.where(keep_valid, out_labels + 1, 0),
        valid=keep_valid,
    )


def _select_level(
    logits: Array,
    regression: Array,
    centerness: Array,
    anchors: Array,
    positive_map: Array,
    phrase_mask: Array,
    pre_nms_thresh: float,
    pre_nms_top_n: int,
    box_coder: BoxCoder,
) -> tuple[Array, Array, Array, Array]:
    """Top candidates of one level of one image: boxes (K, 4), scores, phrase
    indices and validity, K = min(pre_nms_top_n, h*w*P)."""
    prob = phrase_probabilities(jax.nn.sigmoid(logits), positive_map, phrase_mask)  # (N, P)
    num_phrases = prob.shape[1]
    ranked = prob * jax.nn.sigmoid(centerness)[:, None]
    candidate = prob > pre_nms_thresh
    k = min(pre_nms_top_n, ranked.size)
    values, flat = jax.lax.top_k(jnp.where(candidate, ranked, -1.0).reshape(-1), k)
    valid = candidate.reshape(-1)[flat]
    loc = flat // num_phrases
    boxes = box_coder.decode(regression[loc], anchors[loc])
    scores = jnp.where(valid, jnp.sqrt(jnp.maximum(values, 0.0)), 0.0)
    return boxes, scores, (flat % num_phrases).astype(jnp.int32), valid
