"""Flickr30k entities Recall@K on hand-worked cases: ranking by score, the any-box and
merged-box protocols, the IoU threshold in the +1 box convention, phrase grouping,
and counts that add up across hosts. Recalls are exact fractions (compared with ==)."""

from __future__ import annotations

import numpy as np
import pytest

from glipjax.eval.flickr import FlickrRecallEvaluator, box_iou, group_phrases, union_box

LEFT, RIGHT = [0, 0, 19, 19], [40, 0, 59, 19]  # two 20x20 boxes, 20 px apart
BOTH = [0, 0, 59, 19]  # their union box
FAR = [100, 100, 119, 119]


def test_iou_plus_one_convention():
    # 20x20 boxes shifted by 5: 15x20 = 300 overlap, union 500 -> 0.6; by 10: 200 / 600.
    np.testing.assert_allclose(box_iou([LEFT], [[5, 0, 24, 19], [10, 0, 29, 19], FAR]), [[0.6, 1 / 3, 0.0]])
    assert box_iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 1.0  # a one-pixel box
    np.testing.assert_array_equal(union_box([LEFT, RIGHT]), [BOTH])


def test_rank_decides_recall_at_k():
    ev = FlickrRecallEvaluator()
    # The hit is the 3rd best of 12 predictions: a miss at 1, a hit at 5 and 10.
    scores = np.linspace(0.9, 0.1, 12)
    boxes = np.tile(FAR, (12, 1))
    boxes[2] = LEFT
    order = np.random.default_rng(0).permutation(12)  # input order does not matter, scores do
    ev.add_phrase([LEFT], boxes[order], scores[order])
    # The hit ranks 7th: a hit at 10 only.
    boxes = np.tile(FAR, (12, 1))
    boxes[6] = RIGHT
    ev.add_phrase([RIGHT], boxes, scores)
    # No predictions at all: a miss everywhere.
    ev.add_phrase([LEFT], np.zeros((0, 4)), [])
    # The best box is a hit.
    ev.add_phrase([LEFT], [LEFT, FAR], [0.8, 0.3])
    result = ev.result()
    assert result["num_phrases"] == 4
    assert (result["any_box/R@1"], result["any_box/R@5"], result["any_box/R@10"]) == (1 / 4, 2 / 4, 3 / 4)


def test_any_box_versus_merged_box():
    # A phrase with two boxes ("two dogs"). Predicting one of them is an any-box hit
    # but has IoU 400/1200 with the union box: a merged-box miss. Predicting the union
    # is a merged-box hit but IoU 400/1200 with each single box: an any-box miss.
    ev = FlickrRecallEvaluator(ks=(1,))
    hits = ev.phrase_hits([LEFT, RIGHT], [RIGHT], [0.9])
    np.testing.assert_array_equal(hits, [[True], [False]])
    hits = ev.phrase_hits([LEFT, RIGHT], [BOTH], [0.9])
    np.testing.assert_array_equal(hits, [[False], [True]])
    # With one ground-truth box both protocols agree.
    np.testing.assert_array_equal(ev.phrase_hits([LEFT], [[2, 0, 21, 19]], [0.5]), [[True], [True]])


def test_iou_threshold_is_inclusive():
    # IoU exactly 0.5: 20x20 vs 20x10 inside it (200 / 400).
    ev = FlickrRecallEvaluator(ks=(1,))
    assert ev.phrase_hits([LEFT], [[0, 0, 19, 9]], [1.0])[0, 0]
    assert not ev.phrase_hits([LEFT], [[0, 0, 19, 8]], [1.0])[0, 0]  # 180 / 400


def test_counts_from_hosts_add_up():
    whole, first, second = FlickrRecallEvaluator(), FlickrRecallEvaluator(), FlickrRecallEvaluator()
    cases = [([LEFT], [LEFT], [0.5]), ([LEFT, RIGHT], [FAR, BOTH], [0.9, 0.2]), ([RIGHT], [FAR], [0.1])]
    for i, case in enumerate(cases):
        whole.add_phrase(*case)
        (first if i % 2 else second).add_phrase(*case)
    merged = FlickrRecallEvaluator()
    merged.add_counts(first.counts)
    merged.add_counts(second.counts)
    assert merged.result() == whole.result()
    assert whole.result()["merged_box/R@1"] == 1 / 3 and whole.result()["merged_box/R@5"] == 2 / 3
    with pytest.raises(ValueError, match="shape"):
        merged.add_counts(np.zeros(3))


def test_group_phrases_by_identical_spans():
    spans = [np.array([[2, 9]]), np.array([[30, 41]]), np.array([[2, 9]]), np.zeros((0, 2)),
             np.array([[11, 15], [4, 10]]), np.array([[4, 10], [11, 15]])]
    groups = group_phrases(spans)
    assert [boxes for _, boxes in groups] == [[0, 2], [1], [4, 5]]
    np.testing.assert_array_equal(groups[2][0], [[4, 10], [11, 15]])


def test_bad_input():
    ev = FlickrRecallEvaluator()
    with pytest.raises(ValueError, match="no phrases"):
        ev.result()
    with pytest.raises(ValueError, match="ground-truth box"):
        ev.add_phrase(np.zeros((0, 4)), [LEFT], [0.5])
    with pytest.raises(ValueError, match="scores"):
        ev.add_phrase([LEFT], [LEFT, RIGHT], [0.5])
    with pytest.raises(ValueError, match="positive"):
        FlickrRecallEvaluator(ks=(0, 5))
