"""Prediction: chunked class prompts against single passes, the numpy preprocessing
against the TensorFlow evaluation transform, the command end to end in a process
that cannot import TensorFlow, and its one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from conftest import TRAIN_STEPS, child_env
from glipjax import preprocess, sharding
from glipjax.data import transforms
from glipjax.data.prompts import class_prompt, clean_name, positive_map
from glipjax.data.tokenizer import NUM_SPECIAL_TOKENS, count_tokens, encode, load_tokenizer
from glipjax.inference import build_prompt_chunks, detect_chunked, make_forward, max_phrases
from glipjax.models.glip import detect
from glipjax.predict import main
from glipjax.runs import load_run

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange ring", "cyan box"]
PHRASES = 8  # phrase slots of every chunk below: one compiled forward
BOX_TOL = 1e-3  # px; the split forward and the whole model agree to float rounding


def _picture(path, size, seed):
    """A drawing of a few filled shapes on a grey background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (128, 128, 128))
    pen = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
        w, h = rng.integers(10, 40, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)([x, y, x + w, y + h], fill=colour)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def setup(detecting_run, tmp_path_factory):
    run = load_run(detecting_run, mesh=sharding.make_mesh({"data": 1}, jax.local_devices()[:1]))
    folder = tmp_path_factory.mktemp("images")
    files = [_picture(folder / "wide.jpg", (130, 70), 0), _picture(folder / "tall.png", (60, 110), 1)]
    data = run.config.data
    prepared = [preprocess.prepare(preprocess.read_image(f), data.eval_short_side, data.eval_max_size, data.canvas)
                for f in files]
    images = np.stack([x for x, _ in prepared])
    sizes = np.asarray([s for _, s in prepared], np.int32)
    return run, make_forward(run.model), load_tokenizer(None), images, sizes, files


def test_a_prompt_that_fits_gives_the_single_pass(setup):
    run, forward, tokenizer, images, sizes, _ = setup
    length, ids = run.glip_config.max_text_len, np.arange(1, len(NAMES) + 1)
    (chunk,) = build_prompt_chunks(NAMES, ids, tokenizer, length, num_phrases=PHRASES)
    merged = detect_chunked(forward, run.params, images, sizes, [chunk], 100)
    # The single pass: the plain prompt encoded by hand, one row per class, no padding rows.
    caption, spans = class_prompt(NAMES)
    input_ids, mask, encoding = encode(tokenizer, caption, length)
    pmap, mapped = positive_map(encoding, [[s] for s in spans], length)
    assert caption == chunk.caption and mapped.all()
    # ... through the whole model, the text repeated per image (the forward encodes it once).
    whole = jax.jit(lambda p, x, *rest: detect(run.glip_config, run.model.apply({"params": p}, x, *rest[:2]),
                                               *rest[2:], x.shape[1:3]))
    direct = jax.device_get(whole(run.params, images, np.stack([input_ids] * 2), np.stack([mask] * 2),
                                  pmap, mapped, sizes))
    for b, (boxes, scores, labels) in enumerate(merged):
        valid = direct.valid[b]
        assert 0 < valid.sum() == len(scores)
        np.testing.assert_allclose(boxes, direct.boxes[b][valid], atol=BOX_TOL, rtol=0)
        np.testing.assert_allclose(scores, direct.scores[b][valid], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(labels, direct.labels[b][valid])


def test_chunks_merge_to_the_detections_of_each_chunk_alone(setup):
    run, forward, tokenizer, images, sizes, _ = setup
    ids = np.arange(1, len(NAMES) + 1)
    chunks = build_prompt_chunks(NAMES, ids, tokenizer, run.glip_config.max_text_len, budget=12, num_phrases=PHRASES)
    assert len(chunks) >= 3 and all(c.attention_mask.sum() <= 12 for c in chunks)
    assert np.concatenate([c.category_ids[c.phrase_mask] for c in chunks]).tolist() == ids.tolist()
    merged = detect_chunked(forward, run.params, images, sizes, chunks, 10_000)
    alone = [detect_chunked(forward, run.params, images, sizes, [c], 10_000) for c in chunks]
    for b, (boxes, scores, labels) in enumerate(merged):
        assert np.all(np.diff(scores) <= 0)
        for chunk, single in zip(chunks, alone):
            for label in chunk.category_ids[chunk.phrase_mask]:
                mine, theirs = labels == label, single[b][2] == label
                np.testing.assert_array_equal(scores[mine], single[b][1][theirs])
                np.testing.assert_array_equal(boxes[mine], single[b][0][theirs])
        top = detect_chunked(forward, run.params, images, sizes, chunks, 5)[b]
        np.testing.assert_array_equal(top[1], scores[:5])


def test_a_1203_class_list_is_covered_by_chunks_that_fit():
    tokenizer = load_tokenizer(None)
    file = pathlib.Path(tfds.__file__).parent / "datasets" / "lvis" / "classes.txt"  # LVIS v1 class names
    names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    assert len(names) == 1203
    chunks = build_prompt_chunks(names, range(1, 1204), tokenizer, 256)
    assert np.concatenate([c.category_ids[c.phrase_mask] for c in chunks]).tolist() == list(range(1, 1204))
    assert all(c.positive_map.shape == (chunks[0].positive_map.shape[0], 256) for c in chunks)
    assert chunks[0].positive_map.shape[0] <= max_phrases(256)
    for k, chunk in enumerate(chunks):
        used = count_tokens(tokenizer, [chunk.caption])[0] + NUM_SPECIAL_TOKENS
        assert used == chunk.attention_mask.sum() <= 256  # nothing truncated
        if k + 1 < len(chunks):  # greedy: the next class would not have fitted
            first_next = clean_name(names[int(chunks[k + 1].category_ids[0]) - 1])
            assert used + count_tokens(tokenizer, [". " + first_next])[0] > 256
    assert len(chunks) == 14  # about 86 classes per chunk, 3 tokens each with its separator


def test_preprocessing_matches_the_evaluation_transform():
    config = transforms.TransformConfig(canvas=(128, 160), short_sides=(96,), max_size=150,
                                        eval_short_side=96, eval_max_size=150)
    rng = np.random.default_rng(0)
    for shape in [(60, 70), (300, 200), (97, 400), (96, 120), (50, 51)]:  # enlarge, shrink, fit the canvas
        image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        want = transforms.transform(tf.constant(image), tf.zeros([0, 4]), {}, tf.zeros([2], tf.int64), config,
                                    training=False)
        got, size = preprocess.prepare(image, 96, 150, config.canvas)
        assert size == tuple(want["image_size"].numpy())
        np.testing.assert_allclose(got, want["image"].numpy(), atol=1e-4, rtol=0)  # measured 2e-5


_NO_TENSORFLOW = "raise ImportError('TensorFlow is blocked in this test')\n"


def test_command_end_to_end_without_tensorflow(setup, detecting_run, tmp_path):
    files = setup[-1]
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("tensorflow", "tensorflow_datasets"):
        (blocked / f"{name}.py").write_text(_NO_TENSORFLOW)
    classes = tmp_path / "classes.txt"
    many = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
            for s in ("circle", "square", "triangle", "star", "ring", "cross")]
    classes.write_text("\n".join(many) + "\n\n")  # 42 classes: more than one 64-token chunk
    out = tmp_path / "out"
    env = child_env(PYTHONPATH=os.pathsep.join([str(blocked), os.getcwd()]))
    command = [sys.executable, "-m", "glipjax.predict", "--checkpoint", str(detecting_run), "--image",
               *map(str, files), "--classes", str(classes), "--out", str(out), "--min-score", "0.05",
               "--max-detections", "20"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2/2 tall.png" in result.stderr and "ETA" in result.stderr
    report = json.loads((out / "predictions.json").read_text())
    assert report["engine"] == "params" and report["step"] == TRAIN_STEPS and report["classes"] == many
    assert [i["file"] for i in report["images"]] == [str(f) for f in files]
    for entry, file in zip(report["images"], files):
        with Image.open(file) as original:
            assert (entry["width"], entry["height"]) == original.size
        with Image.open(out / f"{file.stem}.png") as drawn:
            assert drawn.size == original.size
        dets = entry["detections"]
        assert 0 < len(dets) <= 20
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True) and min(scores) >= 0.05
        for d in dets:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= entry["width"] and 0 <= y0 <= y1 <= entry["height"]
            assert d["phrase"] in many


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_errors_are_one_line_with_status_2(setup, detecting_run, tmp_path, capsys):
    image = str(setup[-1][0])
    args = ["--checkpoint", str(detecting_run), "--out", str(tmp_path / "out")]
    assert "image not found" in _error(capsys, args + ["--image", image, str(tmp_path / "absent.jpg"),
                                                        "--prompt", "red circle"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    assert "cannot read image" in _error(capsys, args + ["--image", str(broken), "--prompt", "red circle"])
    assert "names no class" in _error(capsys, args + ["--image", image, "--prompt", " . . "])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "names no class" in _error(capsys, args + ["--image", image, "--classes", str(empty)])
    assert "class file not found" in _error(capsys, args + ["--image", image, "--classes", str(tmp_path / "no")])
    no_run = ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"), "--image", image, "--prompt", "a"]
    assert "has no config.json" in _error(capsys, no_run)
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").symlink_to(detecting_run / "checkpoints")
    config = json.loads((detecting_run / "config.json").read_text())
    config["model"]["fusion_heads"], config["model"]["fusion_embed_dim"] = 4, 128
    (other / "config.json").write_text(json.dumps(config))
    line = _error(capsys, ["--checkpoint", str(other), "--out", str(tmp_path / "out"), "--image", image,
                           "--prompt", "red circle"])
    assert "does not hold params of the model" in line and "fusion_embed_dim=128" in line
    assert not (tmp_path / "out").exists()
