"""LVIS fixed AP: the per-class and per-image caps, the federated rules and the
frequency groups on hand-worked cases, and agreement with faster-coco-eval's
LVIS-style evaluation (an independent implementation of LVISEval) on random data.

Tolerances: hand-worked figures are fractions of the 101 recall points, compared to
1e-12 (float rounding of the means); the cross-check is exact to 1e-12."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster

from glipjax.eval.lvis import METRICS, LvisEvaluator, top_per_class

TOL = 1e-12


def _lvis(images, annotations, frequencies=("r", "c", "f")):
    """A tiny LVIS dict: images (id, neg ids, not-exhaustive ids), annotations (image,
    category, xyxy box in +1 convention), one category per frequency."""
    return {
        "images": [{"id": i, "width": 100, "height": 100, "neg_category_ids": list(neg),
                    "not_exhaustive_category_ids": list(nex)} for i, neg, nex in images],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c,
                         "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1], "area": (x2 - x1 + 1) * (y2 - y1 + 1)}
                        for k, (i, c, (x1, y1, x2, y2)) in enumerate(annotations)],
        "categories": [{"id": k + 1, "name": f"cat{k + 1}", "frequency": f} for k, f in enumerate(frequencies)],
    }


BOX_A, BOX_B, BOX_C = (10, 10, 39, 39), (50, 50, 89, 79), (5, 60, 34, 94)
FAR = (70, 0, 99, 19)  # overlaps none of the boxes above


def _result(gt, detections, **kwargs):
    ev = LvisEvaluator(gt, **kwargs)
    for image_id, boxes, scores, labels in detections:
        ev.add_image(image_id, np.asarray(boxes, float).reshape(-1, 4), scores, labels)
    return ev.result()


def test_perfect_detections_and_frequency_groups():
    gt = _lvis([(1, [], []), (2, [], [])], [(1, 1, BOX_A), (1, 2, BOX_B), (2, 3, BOX_C), (2, 2, BOX_A)])
    result = _result(gt, [(1, [BOX_A, BOX_B], [0.9, 0.8], [1, 2]), (2, [BOX_C, BOX_A], [0.7, 0.6], [3, 2])])
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert result[key] == pytest.approx(1.0, abs=TOL), key
    assert result["num_images"] == 2 and result["num_detections"] == 4


def test_frequency_groups_average_their_own_categories():
    # cat1 (rare): found; cat2 (common): 1 of 2 found (recall 1/2, precision 1: 51 of
    # 101 recall points); cat3 (frequent): only a false positive.
    gt = _lvis([(1, [3], []), (2, [], [])], [(1, 1, BOX_A), (1, 2, BOX_B), (2, 2, BOX_A), (2, 3, BOX_C)])
    result = _result(gt, [(1, [BOX_A, BOX_B, BOX_C], [0.9, 0.8, 0.7], [1, 2, 3]), (2, [], [], [])])
    assert result["APr"] == pytest.approx(1.0, abs=TOL)
    assert result["APc"] == pytest.approx(51 / 101, abs=TOL)
    assert result["APf"] == 0.0
    assert result["AP"] == pytest.approx((1 + 51 / 101 + 0) / 3, abs=TOL)


def test_federated_rules():
    # Image 1 has cat1; cat2 is verified absent (negative); cat3 is unknown there.
    gt = _lvis([(1, [2], []), (2, [], [])], [(1, 1, BOX_A), (2, 2, BOX_B), (2, 3, BOX_C)])
    hit_a = (1, [BOX_A], [0.5], [1])
    hits_2 = (2, [BOX_B, BOX_C], [0.5, 0.5], [2, 3])
    base = _result(gt, [hit_a, hits_2])
    assert base["AP"] == pytest.approx(1.0, abs=TOL)
    # A confident cat3 box on image 1 (cat3 neither annotated nor negative there): not counted.
    unknown = _result(gt, [(1, [BOX_A, FAR], [0.5, 0.9], [1, 3]), hits_2])
    assert unknown["AP"] == pytest.approx(1.0, abs=TOL) and unknown["num_detections"] == 3
    # The same box as cat2 (negative on image 1): a false positive ranked above cat2's hit.
    negative = _result(gt, [(1, [BOX_A, FAR], [0.5, 0.9], [1, 2]), hits_2])
    assert negative["APc"] == pytest.approx(0.5, abs=TOL)  # precision 1/2 at recall 1
    assert negative["AP"] == pytest.approx((1 + 0.5 + 1) / 3, abs=TOL)


def test_not_exhaustive_categories_ignore_unmatched_detections():
    # cat1 on image 1 is not exhaustively annotated: its unmatched box is ignored;
    # on image 2 (exhaustive) the same pattern costs precision.
    annotations = [(1, 1, BOX_A), (2, 1, BOX_A)]
    dets = [(1, [BOX_A, FAR], [0.5, 0.9], [1, 1]), (2, [BOX_A], [0.4], [1])]
    lenient = _result(_lvis([(1, [], [1]), (2, [], [])], annotations), dets)
    strict = _result(_lvis([(1, [], []), (2, [], [])], annotations), dets)
    assert lenient["APr"] == pytest.approx(1.0, abs=TOL)
    # Strict: ranked FP, TP, TP -> precision 1/2 at recall 1/2 and 2/3 at recall 1,
    # interpolated to 2/3 at every recall point.
    assert strict["APr"] == pytest.approx(2 / 3, abs=TOL)


def test_caps_per_class_and_per_image():
    # Three images with one cat1 box each, found with scores 0.9, 0.8, 0.7.
    images = [(i, [], []) for i in (1, 2, 3)]
    gt = _lvis(images, [(i, 1, BOX_A) for i in (1, 2, 3)])
    dets = [(i, [BOX_A], [s], [1]) for i, s in zip((1, 2, 3), (0.9, 0.8, 0.7))]
    assert _result(gt, dets)["APr"] == pytest.approx(1.0, abs=TOL)
    # At most 2 detections of cat1 over the set: recall 2/3 (67 of 101 recall points).
    capped = _result(gt, dets, top_per_class=2)
    assert capped["APr"] == pytest.approx(67 / 101, abs=TOL) and capped["num_detections"] == 2
    # One detection per image: the better-scoring far box pushes out the hit.
    gt1 = _lvis([(1, [], [])], [(1, 1, BOX_A)])
    per_image = _result(gt1, [(1, [BOX_A, FAR], [0.5, 0.9], [1, 1])], max_per_image=1)
    assert per_image["APr"] == 0.0 and per_image["num_detections"] == 1


def test_top_per_class_keeps_best_scores_per_label():
    labels = np.array([3, 1, 3, 1, 3, 2])
    scores = np.array([0.1, 0.5, 0.9, 0.7, 0.9, 0.2])
    np.testing.assert_array_equal(top_per_class(labels, scores, 2), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(top_per_class(labels, scores, 1), [2, 3, 5])  # tie: first position wins
    assert top_per_class(labels[:0], scores[:0], 5).size == 0


def test_undefined_figures_and_bad_input():
    gt = _lvis([(1, [], []), (2, [], [])], [(1, 1, BOX_A)])
    result = _result(gt, [(1, [], [], [])])
    assert result["AP"] == 0.0 and math.isnan(result["APc"]) and math.isnan(result["APf"])
    ev = LvisEvaluator(gt)
    with pytest.raises(ValueError, match="not in the LVIS ground truth"):
        ev.add_image(7, [BOX_A], [0.5], [1])
    with pytest.raises(ValueError, match="unknown category"):
        ev.add_image(1, [BOX_A], [0.5], [9])
    ev.add_image(1, [BOX_A], [0.5], [1])
    with pytest.raises(ValueError, match="twice"):
        ev.add_image(1, [BOX_A], [0.5], [1])
    with pytest.raises(ValueError, match="frequency"):
        LvisEvaluator(dict(gt, categories=[{"id": 1, "name": "x"}]))
    with pytest.raises(ValueError, match="no images"):
        LvisEvaluator(gt).result()


def _random_case(seed):
    rng = np.random.default_rng(seed)
    cats = [{"id": i, "name": f"c{i}", "frequency": "rcf"[i % 3]} for i in range(1, 10)]
    images, anns, dets = [], [], []
    for image_id in range(1, 13):
        pos = rng.choice(np.arange(1, 10), rng.integers(1, 4), replace=False)
        neg = rng.choice([c for c in range(1, 10) if c not in pos], 2, replace=False)
        images.append({"id": image_id, "width": 200, "height": 160, "neg_category_ids": neg.tolist(),
                       "not_exhaustive_category_ids": [int(c) for c in pos if rng.random() < 0.4]})
        mine = []
        for c in pos:
            for _ in range(rng.integers(1, 4)):
                x, y = rng.uniform(0, 120, 2)
                w, h = rng.uniform(4, 70, 2)
                mine.append((x, y, w, h, int(c)))
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c),
                             "bbox": [x, y, w, h], "area": w * h * 0.8})  # a mask's area, below the box's
        boxes = []
        for _ in range(rng.integers(3, 25)):
            if rng.random() < 0.6:  # a noisy copy of a box, sometimes with the wrong class
                x, y, w, h, c = mine[rng.integers(len(mine))]
                x, y = max(x + rng.normal(0, 4), 0), max(y + rng.normal(0, 4), 0)
                c = c if rng.random() < 0.8 else int(rng.integers(1, 10))
            else:
                x, y = rng.uniform(0, 150, 2)
                w, h = rng.uniform(4, 50, 2)
                c = int(rng.integers(1, 10))
            boxes.append((x, y, x + w - 1, y + h - 1, c))
        b = np.array(boxes)
        dets.append((image_id, b[:, :4], rng.uniform(0, 1, len(b)), b[:, 4].astype(int)))
    return {"images": images, "annotations": anns, "categories": cats}, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_faster_coco_eval_lvis_style(seed):
    gt, dets = _random_case(seed)
    ours = _result(gt, dets)
    results = [{"image_id": i, "category_id": int(c), "score": float(s),
                "bbox": [b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1]}
               for i, boxes, scores, labels in dets for b, s, c in zip(boxes, scores, labels)]
    coco = FasterCOCO(copy.deepcopy(dict(gt, annotations=[dict(a, iscrowd=0) for a in gt["annotations"]])))
    reference = COCOeval_faster(coco, coco.loadRes(results), iouType="bbox", lvis_style=True,
                                print_function=lambda *a: None)
    reference.params.maxDets = [10_000]  # fixed AP: no per-image limit
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    stats = reference.stats_as_dict
    names = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
             "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf"}
    assert set(names) == set(METRICS)
    for ours_name, theirs in names.items():
        expected = float("nan") if stats[theirs] < 0 else stats[theirs]
        assert ours[ours_name] == pytest.approx(expected, abs=TOL, nan_ok=True), ours_name
    assert 0.0 < ours["AP"] < 1.0 and ours["num_detections"] < sum(len(d[1]) for d in dets)
