"""Losses against numpy versions of the reference formulas, including its
cross-device normalisation (world size 1 and 2). Tolerance: rtol 1e-5 against
float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glipjax import losses
from glipjax.models import atss

SIZES = [(8, 8), (4, 4)]
ANCHORS = np.concatenate(atss.generate_anchors(SIZES, (8, 16), (16, 32)))
LEVELS = (64, 16)
NUM_TOKENS = 6
ASSIGN = jax.jit(lambda boxes, mask, token_map: atss.atss_assign(ANCHORS, LEVELS, boxes, mask, token_map))


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_focal(x, t, alpha=0.25, gamma=2.0):
    p = np_sigmoid(x)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma


def np_decode(d, a):
    w, h = a[:, 2] - a[:, 0] + 1, a[:, 3] - a[:, 1] + 1
    cx, cy = a[:, 0] + 0.5 * w, a[:, 1] + 0.5 * h
    dw, dh = np.minimum(d[:, 2] / 5, np.log(1000 / 16)), np.minimum(d[:, 3] / 5, np.log(1000 / 16))
    px, py = d[:, 0] / 10 * w + cx, d[:, 1] / 10 * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    return np.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw - 1, py + 0.5 * ph - 1], 1)


def np_giou_loss(pred, target):
    x1, y1 = pred[:, 0], pred[:, 1]
    x2, y2 = np.maximum(x1, pred[:, 2]), np.maximum(y1, pred[:, 3])
    tx1, ty1, tx2, ty2 = target.T
    inter = np.where(
        (np.minimum(y2, ty2) > np.maximum(y1, ty1)) & (np.minimum(x2, tx2) > np.maximum(x1, tx1)),
        (np.minimum(x2, tx2) - np.maximum(x1, tx1)) * (np.minimum(y2, ty2) - np.maximum(y1, ty1)),
        0.0,
    )
    enc = (np.maximum(x2, tx2) - np.minimum(x1, tx1)) * (np.maximum(y2, ty2) - np.minimum(y1, ty1)) + 1e-7
    union = (x2 - x1) * (y2 - y1) + (tx2 - tx1) * (ty2 - ty1) - inter + 1e-7
    return 1 - (inter / union - (enc - union) / enc)


def np_device_losses(shards, world):
    """The reference's per-worker losses; `shards` holds each worker's inputs."""
    total_pos = sum((s["matched"] >= 0).sum() for s in shards)
    total_ctr = sum(s["ctr_t"][s["matched"] >= 0].sum() for s in shards)
    pos_avg = max(total_pos / world, 1.0)
    out = []
    for s in shards:
        pos = s["matched"] >= 0
        token = (np_focal(s["logits"], s["tokens"]) * (s["text_mask"][:, None, :] > 0)).sum() / pos_avg
        anchors = np.broadcast_to(ANCHORS, s["reg"].shape).reshape(-1, 4).astype(np.float64)
        pred = np_decode(s["reg"].reshape(-1, 4), anchors)[pos.reshape(-1)]
        tgt = np_decode(s["reg_t"].reshape(-1, 4), anchors)[pos.reshape(-1)]
        w = s["ctr_t"][pos]
        giou = (np_giou_loss(pred, tgt) * w).sum() / (total_ctr / world) if pos.any() else 0.0
        x, t = s["ctr"][pos], w
        ctr = (np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))).sum() / pos_avg
        out.append({"token": token, "giou": 2.0 * giou, "centerness": ctr})
    return out


def make_inputs(seed, gts_per_image, last_token_valid=False):
    rng = np.random.default_rng(seed)
    b, g = len(gts_per_image), 3
    boxes = np.zeros((b, g, 4), np.float32)
    mask = np.zeros((b, g), bool)
    for i, gts in enumerate(gts_per_image):
        boxes[i, : len(gts)] = np.reshape(gts, (-1, 4))
        mask[i, : len(gts)] = True
    token_map = np.zeros((b, g, NUM_TOKENS), np.float32)
    token_map[:, :, 1] = 0.5
    token_map[:, :, 2] = 0.5
    token_map[:, 1, 1:3] = [0, 1]
    targets = ASSIGN(boxes, mask, token_map)
    num_anchors = ANCHORS.shape[0]
    text_mask = np.zeros((b, NUM_TOKENS), np.int32)
    text_mask[:, :4] = 1
    if last_token_valid:
        text_mask[:, -1] = 1
    return dict(
        logits=rng.normal(0, 2, (b, num_anchors, NUM_TOKENS)).astype(np.float32),
        reg=rng.normal(0, 1, (b, num_anchors, 4)).astype(np.float32),
        ctr=rng.normal(0, 1, (b, num_anchors)).astype(np.float32),
        text_mask=text_mask,
        targets=jax.tree.map(np.asarray, targets),
    )


def as_shards(inputs):
    t = inputs["targets"]
    b = inputs["logits"].shape[0]
    return [
        dict(
            logits=inputs["logits"][i : i + 1].astype(np.float64),
            reg=inputs["reg"][i : i + 1].astype(np.float64),
            ctr=inputs["ctr"][i : i + 1].astype(np.float64),
            text_mask=inputs["text_mask"][i : i + 1],
            matched=t.matched[i : i + 1],
            reg_t=t.regression[i : i + 1].astype(np.float64),
            ctr_t=t.centerness[i : i + 1].astype(np.float64),
            tokens=t.tokens[i : i + 1].astype(np.float64),
        )
        for i in range(b)
    ]


def merge(shards):
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


@pytest.fixture(scope="module")
def loss_fn():
    def fn(logits, reg, ctr, targets, text_mask, num_devices):
        return losses.glip_losses(logits, reg, ctr, ANCHORS, targets, text_mask, num_devices=num_devices)

    return jax.jit(fn, static_argnums=5)


GTS = [
    [[8.0, 8.0, 23.0, 23.0], [30.0, 26.0, 61.0, 57.0]],
    [[2.0, 30.0, 40.0, 50.0]],
]


def call(loss_fn, inputs, num_devices=None):
    return loss_fn(inputs["logits"], inputs["reg"], inputs["ctr"], inputs["targets"], inputs["text_mask"], num_devices)


def check(got, want):
    for key in ("token", "giou", "centerness"):
        np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(float(got["total"]), sum(want[k] for k in ("token", "giou", "centerness")), rtol=1e-5)


def test_elementwise_focal_and_giou():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (50,)).astype(np.float32)
    t = rng.uniform(0, 1, (50,)).astype(np.float32)
    t[:20] = np.round(t[:20])
    np.testing.assert_allclose(losses.sigmoid_focal_loss(x, t), np_focal(x.astype(np.float64), t), rtol=1e-5, atol=1e-7)
    # gamma 0 is the alpha-weighted BCE, with a finite gradient where the sigmoid saturates.
    saturated = np.array([40.0, -40.0, 0.5], np.float32)
    bce = np.logaddexp(0, saturated) - saturated * np.array([1, 0, 1])
    np.testing.assert_allclose(losses.sigmoid_focal_loss(saturated, np.array([1.0, 0.0, 1.0]), -1, 0.0), bce,
                               rtol=1e-6, atol=1e-12)
    grad = jax.grad(lambda z: losses.sigmoid_focal_loss(z, np.array([1.0, 0.0, 1.0]), 0.25, 0.0).sum())(saturated)
    assert np.isfinite(np.asarray(grad)).all()
    pred = rng.uniform(0, 50, (40, 4)).astype(np.float32)  # about half have x2 < x1 or y2 < y1
    tgt = np.sort(rng.uniform(0, 50, (40, 2, 2)), axis=1).transpose(0, 2, 1).reshape(40, 4).astype(np.float32)
    np.testing.assert_allclose(losses.giou_loss(pred, tgt), np_giou_loss(pred.astype(np.float64), tgt), atol=1e-5)


def test_single_device_matches_reference(loss_fn):
    inputs = make_inputs(0, GTS)
    shards = as_shards(inputs)
    got = call(loss_fn, inputs)
    want = np_device_losses([merge(shards)], world=1)[0]
    check(got, want)
    assert float(got["num_positives"]) == (inputs["targets"].matched >= 0).sum() > 4


def test_global_view_averages_reference_workers(loss_fn):
    for gts in (GTS, [[[4.0, 4.0, 19.0, 19.0]], []]):
        inputs = make_inputs(1, gts)
        per_worker = np_device_losses(as_shards(inputs), world=2)
        want = {k: np.mean([w[k] for w in per_worker]) for k in per_worker[0]}
        check(call(loss_fn, inputs, num_devices=2), want)
    # The worker average equals the one-worker loss unless positives / workers < 1,
    # as here: one positive anchor in the batch.
    assert int((inputs["targets"].matched >= 0).sum()) == 1
    single = np_device_losses([merge(as_shards(inputs))], world=1)[0]
    np.testing.assert_allclose(want["token"], single["token"] / 2, rtol=1e-12)
    check(call(loss_fn, inputs), single)


def test_per_device_view_with_axis_name():
    inputs = make_inputs(2, GTS)
    per_worker = np_device_losses(as_shards(inputs), world=2)

    def fn(logits, reg, ctr, targets, text_mask):
        return losses.glip_losses(logits, reg, ctr, ANCHORS, targets, text_mask, axis_name="devices")

    split = lambda x: x.reshape((2, 1) + x.shape[1:])  # noqa: E731
    args = [split(inputs[k]) for k in ("logits", "reg", "ctr")]
    got = jax.jit(jax.vmap(fn, axis_name="devices"))(
        *args, jax.tree.map(split, inputs["targets"]), split(inputs["text_mask"])
    )
    for d in range(2):
        check({k: v[d] for k, v in got.items()}, per_worker[d])
    with pytest.raises(ValueError, match="not both"):
        losses.glip_losses(*args, ANCHORS, inputs["targets"], inputs["text_mask"], num_devices=2, axis_name="x")


def test_no_object_token_counts_only_when_unmasked(loss_fn):
    masked = make_inputs(3, GTS)
    unmasked = make_inputs(3, GTS, last_token_valid=True)
    got_masked, got_unmasked = call(loss_fn, masked), call(loss_fn, unmasked)
    check(got_unmasked, np_device_losses([merge(as_shards(unmasked))], world=1)[0])
    # Every unassigned anchor adds a positive-target term at the last token.
    assert float(got_unmasked["token"]) > float(got_masked["token"]) + 1.0


def test_no_positives_gives_zero_box_losses_and_finite_grads(loss_fn):
    inputs = make_inputs(4, [[], []])
    got = call(loss_fn, inputs)
    assert float(got["giou"]) == 0.0 and float(got["centerness"]) == 0.0 and float(got["num_positives"]) == 0
    check(got, np_device_losses([merge(as_shards(inputs))], world=1)[0])

    def total(logits, reg, ctr, gts):
        return losses.glip_losses(logits, reg, ctr, ANCHORS, gts, inputs["text_mask"])["total"]

    grad_fn = jax.jit(jax.grad(total, argnums=(0, 1, 2)))
    for case in (inputs, make_inputs(5, GTS)):
        grads = grad_fn(
            jnp.asarray(case["logits"]), jnp.asarray(case["reg"]) * 30, jnp.asarray(case["ctr"]), case["targets"]
        )
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
