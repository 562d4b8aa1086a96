"""GLIP detection losses (ATSS head with dot-product token logits), in float32.

Normalisation follows the reference's data-parallel training, where each of
`num_devices` workers divides its local sums by cross-device averages:
  token focal loss / max(total positives / num_devices, 1)
  centerness BCE   / max(total positives / num_devices, 1)
  GIoU (weighted by the centerness targets) / (total centerness-target sum / num_devices)
and the gradients are then averaged over the workers. Two ways to call it:

* Global view (default, `axis_name=None`): the inputs hold the whole global batch
  (e.g. under jit with sharded arrays). The result is the reference's per-worker
  loss averaged over the `num_devices` workers, i.e. each global sum above is also
  divided by `num_devices`, so its gradient is what the reference's averaged
  gradients are. With num_devices=1 this is exactly the single-GPU reference.
* Per-device view (`axis_name` set, inside shard_map/pmap): the inputs are one
  worker's shard; totals are psum-ed over `axis_name`, `num_devices` is that axis'
  size, and the result is that worker's reference loss (average it over the axis).

Positives are anchors with an assigned GT. With no positive anywhere the GIoU and
centerness losses are 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glipjax import boxes as box_ops
from glipjax.models.atss import AtssTargets, BoxCoder

Array = jax.Array


def bce_with_logits(logits: Array, targets: Array) -> Array:
    """Element-wise numerically stable binary cross-entropy with logits."""
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def sigmoid_focal_loss(logits: Array, targets: Array, alpha: float = 0.25, gamma: float = 2.0) -> Array:
    """Element-wise binary focal loss: alpha_t (1 - p_t)^gamma BCE(logits, targets).

    `targets` may be soft; alpha < 0 disables the alpha weighting.
    """
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    p = jax.nn.sigmoid(logits)
    ce = bce_with_logits(logits, targets)
    loss = ce
    if gamma:  # x ** 0 has a NaN gradient at x = 0 (a saturated sigmoid)
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def token_focal_loss_sum(
    logits: Array, targets: Array, text_mask: Array, alpha: float = 0.25, gamma: float = 2.0
) -> Array:
    """Focal loss of token logits (B, A, L) against targets (B, A, L), summed over
    the tokens where text_mask (B, L) is nonzero."""
    if logits.shape != targets.shape or text_mask.shape != (logits.shape[0], logits.shape[-1]):
        raise ValueError(
            f"Expected logits and targets (B, A, L) with text_mask (B, L); got {logits.shape}, "
            f"{targets.shape}, {text_mask.shape}."
        )
    loss = sigmoid_focal_loss(logits, targets, alpha, gamma)
    return jnp.sum(jnp.where((text_mask > 0)[:, None, :], loss, 0.0))


def giou_loss(pred_boxes: Array, target_boxes: Array) -> Array:
    """Element-wise 1 - GIoU (..., 4) x (..., 4) -> (...), with the predicted
    boxes' x2, y2 raised to at least x1, y1 (no +1 in areas, eps 1e-7)."""
    pred_boxes = jnp.asarray(pred_boxes, jnp.float32)
    pred_boxes = jnp.concatenate(
        [pred_boxes[..., :2], jnp.maximum(pred_boxes[..., :2], pred_boxes[..., 2:])], axis=-1
    )
    return 1.0 - box_ops.generalized_iou(pred_boxes, jnp.asarray(target_boxes, jnp.float32))


def glip_losses(
    token_logits: Array,
    box_regression: Array,
    centerness_logits: Array,
    anchors: Array,
    targets: AtssTargets,
    text_mask: Array,
    *,
    num_devices: int | None = None,
    axis_name: str | None = None,
    token_weight: float = 1.0,
    giou_weight: float = 2.0,
    centerness_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    box_coder: BoxCoder = BoxCoder(),
) -> dict[str, Array]:
    """Token focal, GIoU and centerness losses of the ATSS head.

    Args:
      token_logits: (B, A, L) dot-product logits, anchors of all levels concatenated.
      box_regression: (B, A, 4) deltas (dx, dy, dw, dh).
      centerness_logits: (B, A) or (B, A, 1).
      anchors: (A, 4) anchors (shared by the batch).
      targets: from `glipjax.models.atss.atss_assign`.
      text_mask: (B, L) attention mask of the caption.
      num_devices: data-parallel workers whose normalisation is reproduced (global
        view only; default 1). Must be None when `axis_name` is given.
      axis_name: mapped axis to psum totals over (per-device view).

    Returns a dict with the weighted losses "token", "giou", "centerness", their sum
    "total", and "num_positives" (total over devices).
    """
    if axis_name is not None and num_devices is not None:
        raise ValueError("Give num_devices (global view) or axis_name (per-device view), not both.")
    b, a, _ = token_logits.shape
    if box_regression.shape != (b, a, 4) or anchors.shape != (a, 4):
        raise ValueError(
            f"box_regression must be (B, A, 4) = {(b, a, 4)} and anchors (A, 4); got "
            f"{box_regression.shape} and {anchors.shape}."
        )
    centerness_logits = jnp.asarray(centerness_logits, jnp.float32).reshape(b, a)

    positive = targets.matched >= 0
    positive_f = positive.astype(jnp.float32)
    local_pos = positive_f.sum()

    pred = box_coder.decode(box_regression, anchors)
    target_boxes = box_coder.decode(targets.regression, anchors)
    giou_sum = jnp.sum(giou_loss(pred, target_boxes) * targets.centerness * positive_f)
    ctr_sum = jnp.sum(bce_with_logits(centerness_logits, targets.centerness) * positive_f)
    token_sum = token_focal_loss_sum(token_logits, targets.tokens, text_mask, focal_alpha, focal_gamma)
    ctr_target_sum = jnp.sum(targets.centerness * positive_f)

    if axis_name is None:
        workers = 1.0 if num_devices is None else float(num_devices)
        total_pos, total_ctr_target, scale = local_pos, ctr_target_sum, 1.0 / workers
    else:
        workers = jax.lax.psum(1.0, axis_name)
        total_pos = jax.lax.psum(local_pos, axis_name)
        total_ctr_target = jax.lax.psum(ctr_target_sum, axis_name)
        scale = 1.0

    pos_norm = jnp.maximum(total_pos / workers, 1.0)
    ctr_norm = total_ctr_target / workers
    safe_ctr_norm = jnp.where(ctr_norm > 0, ctr_norm, 1.0)
    losses = {
        "token": token_weight * scale * token_sum / pos_norm,
        "giou": giou_weight * scale * jnp.where(ctr_norm > 0, giou_sum / safe_ctr_norm, 0.0),
        "centerness": centerness_weight * scale * ctr_sum / pos_norm,
    }
    losses["total"] = losses["token"] + losses["giou"] + losses["centerness"]
    losses["num_positives"] = total_pos
    return losses
