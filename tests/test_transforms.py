"""Box-aware transforms: boxes follow a drawn rectangle through resize, flip and
padding; the reference size rule; degenerate boxes dropped; stateless seeds."""

import numpy as np
import pytest
import tensorflow as tf

from glipjax.data import transforms
from glipjax.models.glip import PIXEL_MEAN_BGR, PIXEL_STD_BGR

CFG = transforms.TransformConfig(canvas=(128, 160), short_sides=(64, 80, 96), max_size=150,
                                 eval_short_side=96, eval_max_size=150, max_boxes=4)
# A located rectangle edge may move by up to 1.5 px: bilinear antialiased resampling
# blurs each edge over about one output pixel (measured max 0.67 px over 41 draws).
EDGE_TOL = 1.5


def _picture(height=60, width=90, box=(20, 10, 49, 29)):
    """Grey image with a white rectangle covering pixel columns x1..x2, rows y1..y2."""
    image = np.full((height, width, 3), 60, np.uint8)
    x1, y1, x2, y2 = box
    image[y1 : y2 + 1, x1 : x2 + 1] = 250
    return image, np.asarray([box], np.float32)


def _locate(image: np.ndarray, size) -> np.ndarray:
    """The +1-convention box of the bright pixels inside the unpadded image."""
    h, w = size
    rgb = transforms.denormalize(image)[:h, :w]
    ys, xs = np.nonzero(rgb.mean(-1) > 155)
    return np.asarray([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def _run(image, boxes, seed, training, per_box=None):
    per_box = per_box or {}
    out = transforms.transform(tf.constant(image), tf.constant(boxes), per_box, tf.constant(seed, tf.int64),
                               CFG, training=training)
    return {k: v.numpy() for k, v in out.items()}


def test_reference_size_rule():
    cases = [  # (h, w, short, max) -> reference get_size result (h, w)
        ((480, 640, 800, 1333), (800, 1066)),
        ((640, 480, 800, 1333), (1066, 800)),
        ((300, 1000, 800, 1333), (400, 1333)),  # long side capped: size = round(1333 * 300 / 1000)
        ((800, 1000, 800, 1333), (800, 1000)),  # short side already right: unchanged
    ]
    for (h, w, short, max_size), expected in cases:
        got = transforms.resized_size(tf.constant(h), tf.constant(w), tf.constant(short), max_size, (2048, 2048))
        assert (int(got[0]), int(got[1])) == expected
    # Too large for the canvas: shrunk with the aspect ratio kept.
    got = transforms.resized_size(tf.constant(640), tf.constant(480), tf.constant(800), 1333, (800, 1344))
    assert (int(got[0]), int(got[1])) == (800, 600)


def test_eval_resize_and_pad_follow_the_rectangle():
    image, boxes = _picture()
    out = _run(image, boxes, [0, 0], training=False)
    assert out["image"].shape == (128, 160, 3) and out["image"].dtype == np.float32
    assert tuple(out["image_size"]) == (96, 144)  # short side 96; 96 * 90 / 60 = 144 <= 150
    assert out["box_mask"].tolist() == [True, False, False, False]
    np.testing.assert_allclose(out["boxes"][0], np.asarray([20, 10, 49, 29]) * 1.6, rtol=1e-6)
    np.testing.assert_allclose(out["boxes"][0], _locate(out["image"], out["image_size"]), atol=EDGE_TOL)
    assert np.all(out["image"][96:] == 0) and np.all(out["image"][:, 144:] == 0), "zero padding"


def test_flip_follows_the_rectangle_and_normalises_bgr():
    image, boxes = _picture()
    flips = 0
    for k in range(12):
        out = _run(image, boxes, [7, k], training=True)
        h, w = out["image_size"]
        assert min(h, w) in CFG.short_sides and max(h, w) <= CFG.max_size
        located = _locate(out["image"], (h, w))
        np.testing.assert_allclose(out["boxes"][0], located, atol=EDGE_TOL)
        flips += bool(out["boxes"][0][[0, 2]].mean() > (w - 1) / 2)  # centre moved right
    assert 2 <= flips <= 10, "about half of the seeds flip"
    # Unscaled flip: x1' = W - 1 - x2 exactly.
    flipped_image, flipped = transforms.hflip(tf.constant(image), tf.constant(boxes))
    assert flipped.numpy().tolist() == [[90 - 1 - 49, 10, 90 - 1 - 20, 29]]
    assert np.array_equal(flipped_image.numpy(), image[:, ::-1])
    pixel = transforms.normalize(tf.constant([[[10, 20, 30]]], tf.uint8)).numpy()[0, 0]
    expected = (np.asarray([30, 20, 10]) - np.asarray(PIXEL_MEAN_BGR)) / np.asarray(PIXEL_STD_BGR)
    np.testing.assert_allclose(pixel, expected, rtol=1e-6)


def test_same_seed_same_output_and_seeds_differ():
    image, boxes = _picture()
    a = _run(image, boxes, [3, 5], training=True)
    b = _run(image, boxes, [3, 5], training=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    sizes = {tuple(_run(image, boxes, [3, k], training=True)["image_size"]) for k in range(10)}
    assert len(sizes) > 1, "different seeds draw different scales"


def test_degenerate_and_excess_boxes_are_dropped_with_their_rows():
    image, _ = _picture()
    boxes = np.asarray([
        [20, 10, 49, 29],      # kept
        [95, 10, 120, 20],     # entirely right of the image: degenerate after clipping
        [30, 5, 30, 40],       # zero width
        [0, 0, 10, 10], [40, 40, 50, 50], [5, 5, 60, 50], [1, 1, 2, 2],  # 5 valid: one over max_boxes
    ], np.float32)
    rows = np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    out = _run(image, boxes, [0, 1], training=False, per_box={"positive_map": rows})
    assert out["dropped_degenerate"] == 2 and out["dropped_max_boxes"] == 1
    assert out["box_mask"].all()
    assert out["positive_map"][:, 0].tolist() == [0, 3, 4, 5], "rows follow their boxes"
    assert np.all(out["boxes"][:, 2] > out["boxes"][:, 0])
    empty = _run(image, np.zeros((0, 4), np.float32), [0, 1], training=True)
    assert not empty["box_mask"].any() and np.all(empty["boxes"] == 0)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="multiples of 32"):
        transforms.TransformConfig(canvas=(100, 128))
    with pytest.raises(ValueError, match="flip_prob"):
        transforms.TransformConfig(canvas=(128, 128), short_sides=(64,), max_size=128, flip_prob=2.0)
