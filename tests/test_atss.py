"""Anchors against the official golden anchors, the box coder on hand-worked
values, and ATSS assignment against a small numpy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glipjax.models import atss

LEVELS = ("p3", "p4", "p5", "p6", "p7")


def test_anchors_match_golden(golden_files):
    for path in golden_files:
        data = np.load(path)
        height, width = data["image"].shape[2:]
        sizes = atss.feature_sizes(height, width)
        assert sizes == [data[f"fpn_{lv}"].shape[2:] for lv in LEVELS], path.name
        for lv, got in zip(LEVELS, atss.generate_anchors(sizes)):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, data[f"anchors_{lv}"], err_msg=f"{path.name} {lv}")


def test_anchor_hand_values():
    p3, p4 = atss.generate_anchors([(2, 3), (1, 2)], strides=(8, 16), anchor_sizes=(64, 128))
    np.testing.assert_array_equal(p3[0], [-28, -28, 35, 35])
    np.testing.assert_array_equal(p3[4], [-20, -20, 43, 43])  # row 1, column 1 (row-major)
    np.testing.assert_array_equal(p4[1], [-40, -56, 87, 71])
    with pytest.raises(ValueError, match="one stride and one anchor size per level"):
        atss.generate_anchors([(2, 3)], strides=(8, 16), anchor_sizes=(64, 128))


def test_box_coder_hand_values_and_round_trip():
    coder = atss.BoxCoder()
    anchor = jnp.array([0.0, 0.0, 9.0, 9.0])  # w = 10, +1 centre 5
    # Shift by 5 px: dx = 10 * 5 / 10; double size about the same +1 centre: dw = 5 log 2.
    np.testing.assert_allclose(coder.encode(jnp.array([5.0, 0.0, 14.0, 9.0]), anchor), [5, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(
        coder.encode(jnp.array([-5.0, -5.0, 14.0, 14.0]), anchor), [0, 0, 5 * math.log(2), 5 * math.log(2)], atol=1e-6
    )
    np.testing.assert_allclose(coder.decode(jnp.array([5.0, 0.0, 0.0, 0.0]), anchor), [5, 0, 14, 9], atol=1e-5)
    # dw is clamped at log(1000/16): width 10 -> 625, centre 5 -> [-307.5, 316.5].
    clamped = coder.decode(jnp.array([0.0, 0.0, 100.0, 0.0]), anchor)
    np.testing.assert_allclose(clamped, [-307.5, 0, 316.5, 9], rtol=1e-5)
    rng = np.random.default_rng(0)
    anchors = jnp.asarray(atss.generate_anchors([(4, 5)], (8,), (64,))[0])
    xy = rng.uniform(-10, 40, (20, 2))
    gt = jnp.asarray(np.concatenate([xy, xy + rng.uniform(2, 80, (20, 2))], 1), jnp.float32)
    np.testing.assert_allclose(coder.decode(coder.encode(gt, anchors), anchors), gt, atol=2e-4)


# ---------------------------------------------------------------- ATSS reference


def np_atss(anchors, level_sizes, gts, tokens, top_k=9):
    """Loop-based ATSS (one image, only real GTs) in float64."""
    a = anchors.astype(np.float64)
    num_tokens = tokens.shape[1]
    acx, acy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
    best_iou = np.full(len(a), -np.inf)
    matched = np.full(len(a), -1)
    for g, box in enumerate(gts.astype(np.float64)):
        gcx, gcy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        dist = np.sqrt((acx - gcx) ** 2 + (acy - gcy) ** 2)
        cand, start = [], 0
        for n in level_sizes:
            order = np.argsort(dist[start : start + n], kind="stable")[: min(top_k, n)]
            cand += list(order + start)
            start += n
        cand = np.array(cand)
        ious = np.array([iou_legacy(a[i], box) for i in cand])
        thr = ious.mean() + ious.std(ddof=1)
        for i, v in zip(cand, ious):
            inside = min(acx[i] - box[0], acy[i] - box[1], box[2] - acx[i], box[3] - acy[i]) > 0.01
            if v >= thr and inside and v > best_iou[i]:
                best_iou[i], matched[i] = v, g
    tok = np.zeros((len(a), num_tokens))
    tok[:, -1] = 1
    reg = np.zeros((len(a), 4))
    ctr = np.zeros(len(a))
    for i in np.nonzero(matched >= 0)[0]:
        box = gts[matched[i]].astype(np.float64)
        tok[i] = tokens[matched[i]] > 0
        aw, ah = a[i, 2] - a[i, 0] + 1, a[i, 3] - a[i, 1] + 1
        gw, gh = box[2] - box[0] + 1, box[3] - box[1] + 1
        reg[i] = [
            10 * ((box[0] + gw / 2) - (a[i, 0] + aw / 2)) / aw,
            10 * ((box[1] + gh / 2) - (a[i, 1] + ah / 2)) / ah,
            5 * np.log(gw / aw),
            5 * np.log(gh / ah),
        ]
        l, r, t, b = acx[i] - box[0], box[2] - acx[i], acy[i] - box[1], box[3] - acy[i]
        ctr[i] = np.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))
    return matched, reg, ctr, tok


def iou_legacy(a, b):
    w = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0)
    inter = w * h
    return inter / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter)


# Two levels on a 64 x 64 image: 8x8 anchors of side 16 (stride 8), 4x4 of side 32.
SMALL_SIZES = [(8, 8), (4, 4)]
SMALL_ANCHORS = np.concatenate(atss.generate_anchors(SMALL_SIZES, (8, 16), (16, 32)))
SMALL_LEVELS = (64, 16)
MAX_GT, NUM_TOKENS = 4, 6


@pytest.fixture(scope="module")
def assign_small():
    return jax.jit(lambda boxes, mask, tokens: atss.atss_assign(SMALL_ANCHORS, SMALL_LEVELS, boxes, mask, tokens))


def run_case(assign, gts, tokens):
    boxes = np.zeros((1, MAX_GT, 4), np.float32)
    tok = np.zeros((1, MAX_GT, NUM_TOKENS), np.float32)
    boxes[0, : len(gts)] = gts
    tok[0, : len(gts)] = tokens
    mask = (np.arange(MAX_GT) < len(gts))[None]
    out = jax.tree.map(lambda x: np.asarray(x)[0], assign(boxes, mask, tok))
    want = np_atss(SMALL_ANCHORS, SMALL_LEVELS, np.asarray(gts, np.float32), np.asarray(tokens, np.float32))
    np.testing.assert_array_equal(out.matched, want[0])
    np.testing.assert_allclose(out.regression, want[1], atol=1e-5)
    np.testing.assert_allclose(out.centerness, want[2], atol=1e-5)
    np.testing.assert_array_equal(out.tokens, want[3])
    return out


def cell(level, y, x):
    """Flat anchor index of location (y, x) on small level 0 or 1."""
    return (0 if level == 0 else 64) + y * SMALL_SIZES[level][1] + x


def test_atss_centre_between_anchors(assign_small):
    # GT centre (15.5, 15.5) lies exactly between the stride-8 centres 11.5 and 19.5:
    # the four surrounding side-16 anchors tie on distance and IoU (144 / 368) and
    # are the positives.
    out = run_case(assign_small, [[8.0, 8.0, 23.0, 23.0]], [[0, 0.5, 0.5, 0, 0, 0]])
    assert sorted(np.nonzero(out.matched == 0)[0]) == sorted(cell(0, y, x) for y in (1, 2) for x in (1, 2))
    np.testing.assert_array_equal(out.tokens[cell(0, 1, 1)], [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out.tokens[0], [0, 0, 0, 0, 0, 1])  # no object: last token
    assert (out.regression[out.matched < 0] == 0).all() and (out.centerness[out.matched < 0] == 0).all()


def test_atss_two_gts(assign_small):
    gts = [[2.0, 2.0, 21.0, 17.0], [30.0, 26.0, 61.0, 57.0]]
    out = run_case(assign_small, gts, [[1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]])
    assert (out.matched == 0).any() and (out.matched == 1).any()
    # The large GT is matched on the coarse level, by the anchor centred at (39.5, 39.5).
    assert out.matched[cell(1, 2, 2)] == 1


def test_atss_tie_goes_to_highest_iou(assign_small):
    # Alone, each GT claims the anchor at level-0 (1, 1), [4, 4, 19, 19] (IoU 0.444
    # and 0.941). Together it goes to the higher IoU, whatever the GT order.
    gts = [[4.0, 4.0, 27.0, 27.0], [4.0, 4.0, 20.0, 19.0]]
    rows = [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]]
    anchor = cell(0, 1, 1)
    for gt, row in zip(gts, rows):
        assert run_case(assign_small, [gt], [row]).matched[anchor] == 0
    both = run_case(assign_small, gts, rows)
    assert both.matched[anchor] == 1 and (both.matched == 0).sum() == 3
    np.testing.assert_array_equal(both.tokens[anchor], rows[1])
    assert run_case(assign_small, gts[::-1], rows[::-1]).matched[anchor] == 0
    # Identical GTs tie exactly: the lower GT index wins.
    same = run_case(assign_small, [gts[1], gts[1]], rows)
    assert (same.matched <= 0).all() and same.matched[anchor] == 0


def test_atss_padding_and_empty(assign_small):
    out = run_case(assign_small, np.zeros((0, 4)), np.zeros((0, NUM_TOKENS)))
    assert (out.matched == -1).all() and (out.tokens[:, -1] == 1).all() and out.tokens[:, :-1].sum() == 0
    # Garbage in padded rows is ignored.
    boxes = np.full((1, MAX_GT, 4), 7.0, np.float32)
    boxes[0, 0] = [8.0, 8.0, 23.0, 23.0]
    tok = np.ones((1, MAX_GT, NUM_TOKENS), np.float32)
    got = assign_small(boxes, np.array([[True, False, False, False]]), tok)
    assert set(np.unique(np.asarray(got.matched))) == {-1, 0}


def test_atss_random_pyramid_batch():
    """Full five-level pyramid (levels with fewer than 9 anchors included), batch of 2."""
    sizes = atss.feature_sizes(96, 160)
    anchors = np.concatenate(atss.generate_anchors(sizes))
    levels = tuple(h * w for h, w in sizes)
    assert levels[-1] < 9
    rng = np.random.default_rng(3)
    gts = np.zeros((2, 5, 4), np.float32)
    for b in range(2):
        xy = rng.uniform(0, 120, (5, 2))
        gts[b] = np.concatenate([xy, xy + rng.uniform(8, 90, (5, 2))], 1)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    tokens = (rng.uniform(size=(2, 5, 7)) > 0.6).astype(np.float32)
    out = jax.jit(lambda g, m, t: atss.atss_assign(anchors, levels, g, m, t))(gts, mask, tokens)
    for b in range(2):
        n = mask[b].sum()
        want = np_atss(anchors, levels, gts[b, :n], tokens[b, :n])
        np.testing.assert_array_equal(np.asarray(out.matched[b]), want[0])
        np.testing.assert_allclose(np.asarray(out.regression[b]), want[1], atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.centerness[b]), want[2], atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), want[3])
    assert (np.asarray(out.matched) >= 0).sum() > 10


def test_atss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="sum\\(level_sizes\\)"):
        atss.atss_assign(SMALL_ANCHORS, (64, 15), np.zeros((1, 2, 4)), np.ones((1, 2), bool), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="gt_mask must be"):
        atss.atss_assign(SMALL_ANCHORS, SMALL_LEVELS, np.zeros((1, 2, 4)), np.ones((1, 3), bool), np.zeros((1, 2, 3)))
