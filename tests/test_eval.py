"""Evaluation: COCO box AP against pycocotools run directly, the +1 box convention,
the swapped-colour control prompt, chunked prompts, and the shapes evaluation end to
end on a randomly initialised tiny GLIP."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax.core import meta
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs.demo import get_config
from glipjax.data import shapes
from glipjax.data.pipeline import transform_config
from glipjax.data.builders.shapes import build_shapes, load_split
from glipjax.data.prompts import class_prompt, positive_map
from glipjax.data.tokenizer import encode, load_tokenizer
from glipjax.eval.coco import STAT_NAMES, CocoBoxEvaluator, xyxy_to_xywh
from glipjax.eval.shapes import (
    COLOR_SWAP, AttributeTally, _eval_examples, build_prompt_chunks, detect_chunked, evaluate_shapes,
    make_forward, picture_detections, prompt_names,
)
from glipjax.models.bert import BertConfig
from glipjax.models.glip import GLIP, detect, glip_tiny

CATS = [(1, "cat"), (2, "dog"), (5, "bird")]


def _single(gt_box, det_box, score=0.9):
    ev = CocoBoxEvaluator(CATS)
    ev.add_image(1, [gt_box], [1], [det_box], [score], [1])
    return ev.result()


def _random_evaluator(seed=0):
    rng = np.random.default_rng(seed)
    ev = CocoBoxEvaluator(CATS)
    for image_id in range(10, 16):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 150, (n, 2))
        wh = rng.uniform(3, 120, (n, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        labels = rng.choice([1, 2, 5], n)
        det = gt + rng.normal(0, 6, gt.shape)  # noisy copies plus random false positives
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2])
        extra = np.concatenate([xy[:1] + 30, xy[:1] + 60], 1).repeat(2, 0)
        det_boxes = np.concatenate([det, extra])
        det_labels = np.concatenate([labels, rng.choice([1, 2, 5], 2)])
        ev.add_image(image_id, gt, labels, det_boxes, rng.uniform(0, 1, len(det_boxes)), det_labels,
                     height=300, width=300)
    return ev


def test_ap_agrees_exactly_with_pycocotools_on_the_same_json(tmp_path):
    ev = _random_evaluator()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ev.ground_truth_json()))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        cocoeval = COCOeval(gt, gt.loadRes(json.loads(json.dumps(ev.detections))), "bbox")
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    ours = ev.result(per_category=True)
    for name, value in zip(STAT_NAMES, cocoeval.stats):
        expected = float("nan") if value < 0 else float(value)
        assert ours[name] == expected or (math.isnan(ours[name]) and math.isnan(expected)), name
    assert 0.0 < ours["AP"] < 1.0  # a non-trivial case
    precision = cocoeval.eval["precision"][:, :, :, 0, -1]
    for k, (_, name) in enumerate(CATS):
        p = precision[:, :, k]
        assert ours[f"AP/{name}"] == float(p[p > -1].mean())


def test_perfect_detections_give_ap_one():
    ev = CocoBoxEvaluator(CATS)
    ev.add_image(1, [[0, 0, 49, 49], [60, 60, 99, 79]], [1, 2], [[0, 0, 49, 49], [60, 60, 99, 79]], [0.9, 0.8], [1, 2])
    ev.add_image(2, [[5, 5, 20, 30]], [5], [[5, 5, 20, 30]], [0.3], [5])
    result = ev.result()
    for key in ("AP", "AP50", "AP75"):  # means over thresholds: float rounding only
        assert result[key] == pytest.approx(1.0, abs=1e-12), key


def test_shifted_box_iou_threshold():
    # 20x20 boxes (+1 convention). Shift by 10: IoU 200/600 = 0.33 < 0.5.
    assert _single([0, 0, 19, 19], [10, 0, 29, 19])["AP50"] == 0.0
    # Shift by 5: IoU 300/500 = 0.6, a hit at 0.5 but not at 0.75.
    shifted = _single([0, 0, 19, 19], [5, 0, 24, 19])
    assert shifted["AP50"] == pytest.approx(1.0, abs=1e-12) and shifted["AP75"] == 0.0


def test_plus_one_conversion():
    np.testing.assert_array_equal(xyxy_to_xywh([[10, 20, 29, 59], [3, 3, 3, 3]]), [[10, 20, 20, 40], [3, 3, 1, 1]])
    # xyxy (0, 0, 32, 32) covers 33x33 = 1089 px > 32**2: medium only (32x32 would also count as small).
    result = _single([0, 0, 32, 32], [0, 0, 32, 32])
    assert result["APm"] == pytest.approx(1.0, abs=1e-12) and math.isnan(result["APs"]) and math.isnan(result["APl"])
    ev = CocoBoxEvaluator(CATS)
    ev.add_image(1, [[0, 0, 32, 32]], [1], [], [], [])
    assert ev.ground_truth_json()["annotations"][0]["area"] == 33.0 * 33.0


def test_no_detections_and_bad_input():
    ev = CocoBoxEvaluator(CATS)
    ev.add_image(1, [[0, 0, 9, 9]], [2], np.zeros((0, 4)), [], [])
    assert ev.result()["AP"] == 0.0
    with pytest.raises(ValueError, match="unknown category"):
        ev.add_image(2, [[0, 0, 9, 9]], [3], [], [], [])
    with pytest.raises(ValueError, match="twice"):
        ev.add_image(1, [], [], [], [], [])
    with pytest.raises(ValueError, match="rows"):
        ev.add_image(4, [[0, 0, 9, 9]], [1, 2], [], [], [])


def test_swapped_colour_prompt_is_a_derangement_keeping_shapes():
    assert sorted(COLOR_SWAP) == sorted(COLOR_SWAP.values()) == sorted(shapes.COLORS)
    swapped = prompt_names(shapes.CATEGORIES, "swapped_colors")
    assert len(set(swapped)) == len(shapes.CATEGORIES)
    for category, name in zip(shapes.CATEGORIES, swapped):
        color, shape = name.split(" ")
        assert shape == category.shape and color != category.color and color in shapes.COLORS
    assert prompt_names(shapes.BASE_CATEGORIES, "true") == [c.name for c in shapes.BASE_CATEGORIES]
    with pytest.raises(ValueError, match="prompt_mode"):
        prompt_names(shapes.CATEGORIES, "shuffled")


def test_attribute_tally_counts_found_objects_and_their_best_detection():
    red_circle, red_square, blue_circle = (shapes.CATEGORY_BY_NAME[n] for n in ("red circle", "red square",
                                                                                 "blue circle"))
    tally = AttributeTally()
    gt = np.array([[0, 0, 9, 9], [20, 20, 39, 39], [60, 60, 69, 69]], np.float32)
    labels = np.array([red_circle.id, red_square.id, blue_circle.id])
    boxes = np.array([
        [0, 0, 9, 9], [0, 0, 9, 10],  # object 0: the best (0.9) is a red square, the other right
        [22, 22, 39, 39],  # object 1: IoU 0.81, a blue circle
        [64, 64, 73, 73],  # object 2: IoU 36/164, not found
    ], np.float32)
    tally.add_image(gt, labels, boxes, np.array([0.9, 0.5, 0.7, 0.99]),
                    np.array([red_square.id, red_circle.id, blue_circle.id, blue_circle.id]))
    tally.add_image(gt[:1], labels[:1], np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, np.int64))
    assert tally.result() == {"found": 2 / 4, "color_right": 1 / 2, "shape_right": 0 / 2}
    assert all(np.isnan(v) for v in AttributeTally().result().values())


def test_picture_keeps_the_best_of_overlapping_boxes_whatever_their_class():
    boxes = np.array([
        [0, 0, 10, 10], [0, 0, 10, 11],  # one place, two readings: IoU 10/11
        [1, 1, 6, 6],  # inside both, IoU 25/110 with the kept one: kept
        [30, 30, 40, 40],  # elsewhere, but below the score threshold
    ], np.float32)
    scores = np.array([0.4, 0.6, 0.5, 0.2])
    assert picture_detections(boxes, scores, 0.3).tolist() == [1, 2]
    assert picture_detections(boxes, scores, 0.3, iou_threshold=0.95).tolist() == [0, 1, 2]
    assert picture_detections(boxes, scores, 0.7).tolist() == []


# ---------------------------------------------------------------- tiny GLIP end to end

BATCH = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = get_config("tiny")
    data_dir = tmp_path_factory.mktemp("tfds")
    build_shapes(cfg.data.shapes, data_dir)
    text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=cfg.data.max_text_len)
    base = glip_tiny(text)
    config = dataclasses.replace(base, head=dataclasses.replace(base.head, fusion_embed_dim=64, fusion_heads=4),
                                 max_text_len=cfg.data.max_text_len)
    model = GLIP(config)
    length = cfg.data.max_text_len
    args = (jax.random.PRNGKey(0), np.zeros((1, *cfg.data.canvas, 3), np.float32),
            np.ones((1, length), np.int32), np.ones((1, length), np.int32))
    params = meta.unbox(jax.jit(model.init)(*args)["params"])

    return cfg, data_dir, model, params


def test_evaluate_shapes_end_to_end(setup):
    cfg, data_dir, model, params = setup
    novel = evaluate_shapes(model, params, cfg, data_dir, "novel", max_images=BATCH,
                            batch_size=BATCH, progress=False)
    assert novel["num_images"] == BATCH and novel["num_chunks"] >= 2  # 36 classes exceed 64 tokens
    for key in ("AP", "AP50", "novel_AP", "novel_AP50", "found"):
        assert np.isfinite(novel[key]) and 0.0 <= novel[key] <= 1.0, key
    # Three images in a batch of four: the padded batch reuses the compiled shape.
    swapped = evaluate_shapes(model, params, cfg, data_dir, "validation", "swapped_colors",
                              max_images=3, batch_size=BATCH, progress=False)
    assert swapped["num_images"] == 3 and "novel_AP" not in swapped
    assert np.isfinite(swapped["AP50"]) and 0.0 <= swapped["AP50"] <= 1.0
    forward = make_forward(model)
    assert [f._cache_size() for f in (forward.images, forward.text, forward.detect)] == [1, 1, 1]


def _images(cfg, data_dir):
    ds = load_split(cfg.data.shapes, data_dir, "validation", max_records=BATCH)
    examples = list(tfds.as_numpy(_eval_examples(ds, transform_config(cfg.data))))
    return np.stack([e["image"] for e in examples]), np.stack([e["image_size"] for e in examples]).astype(np.int32)


def test_chunked_prompts(setup):
    cfg, data_dir, model, params = setup
    config = model.config
    forward = make_forward(model)
    images, sizes = _images(cfg, data_dir)
    tokenizer = load_tokenizer(None)
    length, phrases = config.max_text_len, len(shapes.CATEGORIES)
    categories = shapes.CATEGORIES[:7]
    names, ids = [c.name for c in categories], np.array([c.id for c in categories])

    # The prompt fits: one chunk, equal to a single pass encoded by hand.
    (chunk,) = build_prompt_chunks(names, ids, tokenizer, length, num_phrases=phrases)
    merged = detect_chunked(forward, params, images, sizes, [chunk], 100)
    caption, spans = class_prompt(names)
    input_ids, mask, encoding = encode(tokenizer, caption, length)
    pmap = np.zeros((phrases, length), np.float32)
    pmap[: len(names)] = positive_map(encoding, [[s] for s in spans], length)[0]
    pmask = np.arange(phrases) < len(names)
    # ... by the whole model, the text repeated per image (the split forward encodes it once).
    whole = jax.jit(lambda p, x, *rest: detect(config, model.apply({"params": p}, x, *rest[:2]), *rest[2:],
                                               x.shape[1:3]))
    direct = jax.device_get(whole(params, images, np.tile(input_ids, (BATCH, 1)), np.tile(mask, (BATCH, 1)),
                                  pmap, pmask, sizes))
    for b, (boxes, scores, labels) in enumerate(merged):
        valid = direct.valid[b]
        assert valid.sum() == len(scores)
        np.testing.assert_allclose(boxes, direct.boxes[b][valid], atol=1e-3, rtol=0)
        np.testing.assert_allclose(scores, direct.scores[b][valid], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(labels, ids[direct.labels[b][valid] - 1])

    # A small budget splits the prompt; each chunk fits it and the merge keeps the best boxes of all.
    chunks = build_prompt_chunks(names, ids, tokenizer, length, budget=12, num_phrases=phrases)
    assert len(chunks) > 1
    assert np.concatenate([c.category_ids[c.phrase_mask] for c in chunks]).tolist() == ids.tolist()
    assert all(c.attention_mask.sum() <= 12 for c in chunks)
    top = 5
    merged = detect_chunked(forward, params, images, sizes, chunks, top)
    singles = [detect_chunked(forward, params, images, sizes, [c], 100) for c in chunks]
    for b, (boxes, scores, labels) in enumerate(merged):
        all_scores = np.concatenate([s[b][1] for s in singles])
        assert len(scores) == min(top, len(all_scores))
        np.testing.assert_array_equal(scores, np.sort(all_scores)[::-1][:top])
        assert set(labels.tolist()) <= set(ids.tolist())
