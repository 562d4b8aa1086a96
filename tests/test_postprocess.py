"""Post-processing against the official GLIP detections of the golden cases.

Detections are compared as sets sorted by score (no ties in the golden data):
boxes within 0.01 px, scores within 1e-4, identical labels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glipjax.models import postprocess as pp

LEVELS = ("p3", "p4", "p5", "p6", "p7")
GOLDEN_THRESH = 0.011629


def head_outputs(data):
    """Per-level inputs in the channels-last layout the post-processor takes."""
    return (
        [data[f"dot_product_logits_{lv}"] for lv in LEVELS],
        [data[f"bbox_reg_{lv}"].transpose(0, 2, 3, 1) for lv in LEVELS],
        [data[f"centerness_{lv}"].transpose(0, 2, 3, 1) for lv in LEVELS],
        [data[f"anchors_{lv}"] for lv in LEVELS],
    )


def map_from_tokens(tokens, num_tokens):
    out = np.zeros((len(tokens), num_tokens), np.float32)
    for row, toks in enumerate(tokens):
        out[row, toks[toks >= 0]] = 1
    return out


@pytest.fixture(scope="module")
def run():
    def fn(logits, reg, ctr, anchors, pmap, pmask, sizes, max_detections):
        return pp.postprocess(
            logits, reg, ctr, anchors, pmap, pmask, sizes, pre_nms_thresh=GOLDEN_THRESH, max_detections=max_detections
        )

    return jax.jit(fn, static_argnums=7)


def assert_matches(det, index, boxes, scores, labels):
    valid = np.asarray(det.valid[index])
    n = int(valid.sum())
    assert n == len(scores) and valid[:n].all()
    order = np.argsort(-scores, kind="stable")
    np.testing.assert_allclose(np.asarray(det.scores[index, :n]), scores[order], atol=1e-4)
    np.testing.assert_allclose(np.asarray(det.boxes[index, :n]), boxes[order], atol=0.01)
    np.testing.assert_array_equal(np.asarray(det.labels[index, :n]), labels[order])
    assert (np.asarray(det.scores[index, n:]) == 0).all() and (np.asarray(det.labels[index, n:]) == 0).all()


def test_matches_golden_detections(golden_files, run):
    for path in golden_files:
        data = np.load(path)
        height, width = data["image"].shape[2:]
        sizes = jnp.array([[height, width]])
        num_tokens = data["positive_map"].shape[1]
        from_tokens = map_from_tokens(data["positive_map_tokens"], num_tokens)
        np.testing.assert_array_equal(from_tokens > 0, data["positive_map"] > 0)
        phrases = np.ones(len(from_tokens), bool)
        for pmap in (from_tokens, data["positive_map"]):
            det = run(*head_outputs(data), jnp.asarray(pmap), phrases, sizes, 100)
            assert_matches(det, 0, data["det_boxes"], data["det_scores"], data["det_labels"])


def test_batch_phrase_mask_and_detection_limit(golden_files, run):
    """Two images in one batch: the second with phrase 4 masked out (its
    detections vanish, the others stay), and a limit of 10 detections."""
    path = golden_files[0]
    data = np.load(path)
    height, width = data["image"].shape[2:]
    logits, reg, ctr, anchors = head_outputs(data)
    twice = lambda xs: [np.concatenate([x, x]) for x in xs]  # noqa: E731
    pmap = map_from_tokens(data["positive_map_tokens"], data["positive_map"].shape[1])
    pmask = np.array([[True] * 4, [True, True, True, False]])
    sizes = jnp.array([[height, width]] * 2)
    det = run(twice(logits), twice(reg), twice(ctr), anchors, jnp.asarray(pmap), pmask, sizes, 100)
    boxes, scores, labels = data["det_boxes"], data["det_scores"], data["det_labels"]
    assert_matches(det, 0, boxes, scores, labels)
    keep = labels != 4  # class-wise NMS: other labels are unaffected by label 4
    assert_matches(det, 1, boxes[keep], scores[keep], labels[keep])

    top = run(logits, reg, ctr, anchors, jnp.asarray(pmap), pmask[:1], sizes[:1], 10)
    best = np.argsort(-scores)[:10]
    assert top.valid.shape == (1, 10) and bool(top.valid.all())
    assert_matches(top, 0, boxes[best], scores[best], labels[best])


def test_rejects_mismatched_inputs(golden_files):
    data = np.load(golden_files[0])
    logits, reg, ctr, anchors = head_outputs(data)
    pmap, pmask, sizes = data["positive_map"], np.ones(4, bool), jnp.array([[224, 320]])
    with pytest.raises(ValueError, match="same number"):
        pp.postprocess(logits, reg[:4], ctr, anchors, pmap, pmask, sizes)
    with pytest.raises(ValueError, match="Level of size"):
        pp.postprocess(logits, reg, ctr, anchors[::-1], pmap, pmask, sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        pp.postprocess(logits, reg, ctr, anchors, pmap, pmask, jnp.array([224, 320]))


def test_phrase_probabilities():
    probs = jnp.array([[0.2, 0.4, 0.6, 0.8]])
    pmap = jnp.array([[0, 0.5, 0.5, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    got = pp.phrase_probabilities(probs, pmap, jnp.array([True, False, True]))
    np.testing.assert_allclose(got, [[0.5, 0.0, 0.0]], rtol=1e-6)
