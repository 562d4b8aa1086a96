"""Box utilities against numpy formulas, and multi-label NMS against a numpy
greedy reference (float32 IoU with +1 widths, strict > threshold, per label)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glipjax import boxes as B


def random_boxes(rng, n, scale=100.0, max_size=60.0):
    xy = rng.uniform(0, scale, (n, 2))
    wh = rng.uniform(1, max_size, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def np_iou(a, b, one):
    w = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + one, 0)
    h = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + one, 0)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0] + one) * (x[..., 3] - x[..., 1] + one)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def np_nms(boxes, scores, labels, valid, thr):
    """Greedy NMS written from the kernel's description, float32 throughout."""
    boxes = boxes.astype(np.float32)
    one = np.float32(1)
    idx = [i for i in np.argsort(-scores, kind="stable") if valid[i]]
    kept = []
    for i in idx:
        ok = True
        for j in kept:
            if labels[i] != labels[j]:
                continue
            a, b = boxes[i], boxes[j]
            w = max(min(a[2], b[2]) - max(a[0], b[0]) + one, np.float32(0))
            h = max(min(a[3], b[3]) - max(a[1], b[1]) + one, np.float32(0))
            inter = np.float32(w * h)
            sa = (a[2] - a[0] + one) * (a[3] - a[1] + one)
            sb = (b[2] - b[0] + one) * (b[3] - b[1] + one)
            if np.float32(inter / (sa + sb - inter)) > np.float32(thr):
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


@pytest.fixture(scope="module")
def nms_fn():
    return jax.jit(B.multilabel_nms, static_argnames=("max_output",))


def test_iou_matches_numpy_both_conventions():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 30), random_boxes(rng, 20)
    for legacy, one in ((True, 1.0), (False, 0.0)):
        got = np.asarray(B.pairwise_iou(jnp.asarray(a), jnp.asarray(b), legacy=legacy))
        want = np_iou(a[:, None].astype(np.float64), b[None].astype(np.float64), one)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_iou_hand_values():
    a = jnp.array([0.0, 0.0, 9.0, 9.0])
    # +1 convention: 10x10 boxes overlapping in 5 columns -> 50 / 150.
    assert float(B.iou(a, jnp.array([5.0, 0.0, 14.0, 9.0]))) == pytest.approx(1 / 3, abs=1e-7)
    # Without +1: 9x9 boxes, overlap 4x9 -> 36 / 126.
    assert float(B.iou(a, jnp.array([5.0, 0.0, 14.0, 9.0]), legacy=False)) == pytest.approx(36 / 126, abs=1e-7)
    # Single-pixel boxes: area 1 each with +1, touching pixels do not overlap.
    assert float(B.iou(jnp.zeros(4), jnp.zeros(4))) == 1.0
    assert float(B.iou(jnp.zeros(4), jnp.array([1.0, 0.0, 1.0, 0.0]))) == 0.0
    assert float(B.box_area(a)) == 100.0 and float(B.box_area(a, legacy=False)) == 81.0


def test_generalized_iou_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 50).astype(np.float64), random_boxes(rng, 50).astype(np.float64)
    iw = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0)
    ih = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a) + area(b) - inter + 1e-7
    enc = (np.maximum(a[:, 2], b[:, 2]) - np.minimum(a[:, 0], b[:, 0])) * (
        np.maximum(a[:, 3], b[:, 3]) - np.minimum(a[:, 1], b[:, 1])
    ) + 1e-7
    want = inter / union - (enc - union) / enc
    got = np.asarray(B.generalized_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert float(B.generalized_iou(jnp.array([0.0, 0, 2, 2]), jnp.array([0.0, 0, 2, 2]))) == pytest.approx(1.0)
    # Disjoint unit squares two apart: IoU 0, enclosing 3 x 1, union 2 -> -1/3.
    assert float(B.generalized_iou(jnp.array([0.0, 0, 1, 1]), jnp.array([2.0, 0, 3, 1]))) == pytest.approx(-1 / 3)


def test_clip_and_conversions():
    boxes = jnp.array([[[-5.0, -3.0, 400.0, 50.0]], [[10.0, 300.0, 20.0, 310.0]]])
    clipped = B.clip_boxes(boxes, jnp.array([[224.0], [256.0]]), jnp.array([[320.0], [384.0]]))
    np.testing.assert_array_equal(clipped, [[[0, 0, 319, 50]], [[10, 255, 20, 255]]])
    xywh = jnp.array([[10.0, 20.0, 5.0, 8.0]])
    np.testing.assert_array_equal(B.xywh_to_xyxy(xywh), [[10, 20, 14, 27]])
    np.testing.assert_array_equal(B.xywh_to_xyxy(xywh, legacy=False), [[10, 20, 15, 28]])
    np.testing.assert_array_equal(B.xyxy_to_xywh(B.xywh_to_xyxy(xywh)), xywh)
    np.testing.assert_array_equal(B.xyxy_to_cxcywh(jnp.array([[0.0, 2.0, 4.0, 10.0]])), [[2, 6, 4, 8]])
    np.testing.assert_array_equal(B.cxcywh_to_xyxy(jnp.array([[2.0, 6.0, 4.0, 8.0]])), [[0, 2, 4, 10]])
    with pytest.raises(ValueError, match="last dimension of 4"):
        B.box_area(jnp.zeros((3, 5)))


@pytest.mark.parametrize("seed", range(12))
def test_nms_matches_numpy_reference(nms_fn, seed):
    rng = np.random.default_rng(seed)
    k = 64
    n = int(rng.integers(1, k + 1))
    boxes = random_boxes(rng, k, scale=30.0, max_size=40.0)
    scores = rng.permutation(k).astype(np.float32) / k + rng.uniform(0, 1e-3, k).astype(np.float32)
    labels = rng.integers(1, int(rng.integers(1, 5)) + 1, k).astype(np.int32)
    valid = np.arange(k) < n
    thr = float(rng.uniform(0.3, 0.7))
    idx, mask = nms_fn(boxes, scores, labels, valid, thr)
    want = np_nms(boxes, scores, labels, valid, thr)
    got = np.asarray(idx)[np.asarray(mask)]
    assert list(got) == want  # same set, both in descending score order
    assert not np.asarray(mask)[len(want):].any()


def test_nms_edge_cases(nms_fn):
    a = [0.0, 0.0, 9.0, 9.0]
    half = [0.0, 0.0, 9.0, 4.0]  # +1 IoU with `a` is exactly 50 / 100
    boxes = np.array([a, half], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    same = np.array([1, 1], np.int32)
    ok = np.array([True, True])
    idx, mask = nms_fn(boxes, scores, same, ok, 0.5)
    assert list(np.asarray(idx)[np.asarray(mask)]) == [0, 1]  # IoU == threshold is kept
    idx, mask = nms_fn(boxes, scores, same, ok, 0.4999)
    assert list(np.asarray(idx)[np.asarray(mask)]) == [0]
    # No suppression across labels, even for identical boxes.
    idx, mask = nms_fn(np.array([a, a], np.float32), scores, np.array([1, 2], np.int32), ok, 0.5)
    assert sorted(np.asarray(idx)[np.asarray(mask)]) == [0, 1]
    # +1 widths: 1/3 with +1 (suppressed at 0.3), 0.286 without.
    shifted = np.array([a, [5.0, 0.0, 14.0, 9.0]], np.float32)
    idx, mask = nms_fn(shifted, scores, same, ok, 0.3)
    assert list(np.asarray(idx)[np.asarray(mask)]) == [0]
    # Invalid entries are ignored; output is in score order; padding to max_output.
    boxes3 = np.array([a, [50.0, 50.0, 60.0, 60.0], [100.0, 0.0, 120.0, 10.0]], np.float32)
    idx, mask = nms_fn(boxes3, np.array([0.1, 0.5, 0.9], np.float32), np.ones(3, np.int32),
                       np.array([True, True, False]), 0.5, max_output=5)
    assert idx.shape == (5,) and list(np.asarray(mask)) == [True, True, False, False, False]
    assert list(np.asarray(idx)[:2]) == [1, 0]
    idx, mask = nms_fn(boxes3, np.array([0.1, 0.5, 0.9], np.float32), np.ones(3, np.int32),
                       np.ones(3, bool), 0.5, max_output=2)
    assert list(np.asarray(idx)) == [2, 1] and np.asarray(mask).all()
    with pytest.raises(ValueError, match="multilabel_nms expects"):
        B.multilabel_nms(boxes3, np.ones(2, np.float32), np.ones(3, np.int32), np.ones(3, bool), 0.5)
