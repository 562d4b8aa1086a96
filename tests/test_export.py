"""Export: the bundle's files, load_run on it, predictions through the serialized
function equal to those of the training checkpoint, and a bfloat16 export with its
own canvas and batch that loads and runs."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import TRAIN_STEPS
from glipjax import export, predict, sharding
from glipjax.runs import RunError, load_run

NAMES = ["red circle", "blue square", "green triangle"]
BOX_TOL = 1e-4  # px; the same maths compiled twice, so only float rounding may differ


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("images") / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def named_encoder_run(detecting_run, tmp_path_factory):
    """detecting_run with its text encoder named by a folder, as a run from a pretrained
    BERT names it: the folder holds a config.json of the run's BERT sizes (the checkpoint
    holds the weights), which an export must carry."""
    root = tmp_path_factory.mktemp("named_encoder")
    (root / "encoder").mkdir()
    text_config = dataclasses.asdict(load_run(detecting_run).glip_config.text)
    (root / "encoder" / "config.json").write_text(json.dumps(text_config))
    config = json.loads((detecting_run / "config.json").read_text())
    config["model"]["text_encoder"] = str(root / "encoder")
    (root / "run").mkdir()
    (root / "run" / "config.json").write_text(json.dumps(config))
    (root / "run" / "checkpoints").symlink_to(detecting_run / "checkpoints")
    return root / "run"


@pytest.fixture(scope="module")
def bundle(named_encoder_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    return out, export.export(named_encoder_run, out)


def test_bundle_files_and_shapes(bundle):
    out, info = bundle
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "export.json", "inference_96x96_L64.jax", "params", "text_encoder"]
    assert json.loads((out / "export.json").read_text()) == info
    assert info["step"] == TRAIN_STEPS and info["ema"] is False and info["dtype"] == "float32"
    shapes = info["inference"]
    assert (shapes["batch"], shapes["height"], shapes["width"], shapes["text_len"], shapes["phrases"]) == (1, 96, 96, 64, 31)
    assert [i["name"] for i in shapes["inputs"]] == [
        "images", "input_ids", "attention_mask", "positive_map", "phrase_mask", "image_sizes"]
    assert {o["name"]: o["shape"] for o in shapes["outputs"]} == {
        "boxes": [1, 100, 4], "scores": [1, 100], "labels": [1, 100], "valid": [1, 100]}


def test_load_run_reads_the_bundle(bundle, detecting_run):
    mesh = sharding.make_mesh({"data": 1}, jax.local_devices()[:1])
    exported, trained = load_run(bundle[0], mesh=mesh), load_run(detecting_run, mesh=mesh)
    assert exported.step == trained.step == TRAIN_STEPS and exported.glip_config == trained.glip_config
    for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(trained.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(RunError, match="exported without --ema"):
        load_run(bundle[0], ema=True)
    with pytest.raises(RunError, match=f"from step {TRAIN_STEPS}, not 1"):
        load_run(bundle[0], step=1)


def test_predictions_from_the_export_equal_the_checkpoint(bundle, detecting_run, image, tmp_path):
    from_export = predict.predict(bundle[0], [image], NAMES, tmp_path / "a", min_score=0.0, progress=False)
    from_training = predict.predict(detecting_run, [image], NAMES, tmp_path / "b", min_score=0.0, progress=False)
    assert from_export["engine"] == "exported" and from_training["engine"] == "params"
    ours, theirs = from_export["images"][0]["detections"], from_training["images"][0]["detections"]
    assert len(ours) == len(theirs) > 0
    assert [d["phrase"] for d in ours] == [d["phrase"] for d in theirs]
    np.testing.assert_allclose([d["box"] for d in ours], [d["box"] for d in theirs], atol=BOX_TOL, rtol=0)
    np.testing.assert_allclose([d["score"] for d in ours], [d["score"] for d in theirs], atol=1e-6, rtol=0)


def test_bfloat16_export_with_its_own_canvas_and_batch(detecting_run, image, tmp_path, capsys):
    out = tmp_path / "bf16"
    export.main(["--checkpoint", str(detecting_run), "--out", str(out), "--dtype", "bfloat16",
                 "--height", "64", "--width", "96", "--batch", "2", "--phrases", "4"])
    assert "inference_64x96_L64.jax" in capsys.readouterr().out
    run = load_run(out)
    assert {x.dtype for x in jax.tree.leaves(run.params)} == {jnp.dtype(jnp.bfloat16)}
    assert run.config.model.dtype == "bfloat16" and run.config.data.canvas == (64, 96)
    # Five classes in chunks of at most four phrases; one image padded to the batch of two.
    names = NAMES + ["yellow star", "purple cross"]
    report = predict.predict(out, [image], names, tmp_path / "pred", min_score=0.0, progress=False)
    assert report["engine"] == "exported"
    dets = report["images"][0]["detections"]
    assert dets and {d["phrase"] for d in dets} <= set(names)
    assert np.isfinite([d["box"] + [d["score"]] for d in dets]).all()


def test_export_errors(bundle, detecting_run, tmp_path):
    with pytest.raises(RunError, match="not an empty directory"):
        export.export(detecting_run, bundle[0])
    with pytest.raises(RunError, match="multiples of 32"):
        export.export(detecting_run, tmp_path / "odd", height=100)
    with pytest.raises(RunError, match="no EMA params"):
        export.export(detecting_run, tmp_path / "ema", ema=True)
