"""ODinW and the dataset runner on tiny COCO-format sets written from the shapes
generator (64 px images, evaluated at 96 px, so boxes must be mapped back):

- an oracle detector that returns each image's ground truth scores AP 1 on every
  set, and one that misplaces the boxes of one set halves the mean: the loop, the
  prompt's category order, box scaling and last-batch padding are right;
- a randomly initialised tiny GLIP on 8 devices: the report equals pycocotools run
  directly on the same detections; reading fewer images changes nothing for the
  images read; the ODinW dataset table and suites.

Tolerances: AP of exact boxes is 1 up to float32 box scaling (1e-9); report versus
pycocotools is exact (the same detections)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from flax.core import meta
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs.demo import get_config
from eval_sets import write_coco_set
from glipjax import sharding
from glipjax.data import shapes
from glipjax.data.pipeline import transform_config
from glipjax.data.tokenizer import load_tokenizer
from glipjax.eval import datasets
from glipjax.eval.coco import STAT_NAMES
from glipjax.eval.odinw import ODINW_13, ODINW_35, SUITES, evaluate_odinw, resolve_datasets
from glipjax.models.bert import BertConfig
from glipjax.models.glip import GLIP, glip_tiny
from glipjax.models.postprocess import Detections

BATCH = 8
SETS = {"alpha": (0, 5), "beta": (1, 3)}  # name: (generator seed, images); 5 and 3 leave padded batches


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = get_config("tiny")
    root = tmp_path_factory.mktemp("odinw")
    files = {name: write_coco_set(root / name / "valid", seed, n) for name, (seed, n) in SETS.items()}
    data = datasets.EvalData(tmp_path_factory.mktemp("tfds"), transform_config(cfg.data),
                             load_tokenizer(None), progress=False)
    return cfg, root, files, data


class Oracle:
    """A Detector stand-in that returns each image's ground truth in input pixels,
    labelled with its phrase index in the (single-chunk) class prompt; images are
    recognised by their pixels. `misplace`: image ids whose boxes are moved away."""

    def __init__(self, data, files, misplace=()):
        self.batch_size, self.max_detections = BATCH, 100
        self.glip_config = types.SimpleNamespace(max_text_len=64)
        self.truth = {}
        for path in files:
            gt = json.loads(path.read_text())
            order = sorted(c["id"] for c in gt["categories"])  # the prompt lists classes in id order
            ds, _, _ = datasets.open_records("coco", data, path, path.parent)
            for example in tfds.as_numpy(datasets._examples(ds, data.transform)):
                (rh, rw), (oh, ow) = example["image_size"], example["original_size"]
                anns = [a for a in gt["annotations"] if a["image_id"] == example["image_id"]]
                boxes = np.array([[x, y, x + w - 1, y + h - 1] for x, y, w, h in (a["bbox"] for a in anns)])
                boxes = boxes * [rw / ow, rh / oh, rw / ow, rh / oh]
                if example["image_id"] in misplace:
                    boxes = boxes * 0.2
                labels = [order.index(a["category_id"]) + 1 for a in anns]
                self.truth[example["image"].tobytes()] = (boxes, labels)

    def detect_chunks(self, images, image_sizes, chunks):
        assert len(chunks) == 1
        out = Detections(np.zeros((len(images), 100, 4), np.float32), np.zeros((len(images), 100), np.float32),
                         np.zeros((len(images), 100), np.int32), np.zeros((len(images), 100), bool))
        for b, image in enumerate(images):
            boxes, labels = self.truth.get(image.tobytes(), (np.zeros((0, 4)), []))  # padding: nothing
            n = len(labels)
            out.boxes[b, :n], out.labels[b, :n], out.scores[b, :n], out.valid[b, :n] = boxes, labels, 0.9, True
        return [out]


def test_oracle_scores_one_and_a_misplaced_set_halves_the_mean(setup):
    cfg, root, files, data = setup
    entries = [str(p.relative_to(root)) for p in files.values()]
    report = evaluate_odinw(Oracle(data, files.values()), data, root, entries)
    assert report["num_datasets"] == 2 and list(report["datasets"]) == entries
    for name, (_, count) in zip(entries, SETS.values()):
        one = report["datasets"][name]
        assert one["num_images"] == count and one["num_chunks"] == 1
        assert one["AP"] == pytest.approx(1.0, abs=1e-9) and one["AP75"] == pytest.approx(1.0, abs=1e-9), name
    assert report["AP"] == pytest.approx(1.0, abs=1e-9)
    beta_ids = {100 * SETS["beta"][0] + i for i in range(SETS["beta"][1])}
    half = evaluate_odinw(Oracle(data, files.values(), misplace=beta_ids), data, root, entries)
    assert half["datasets"][entries[1]]["AP"] == 0.0
    assert half["AP"] == pytest.approx(0.5, abs=1e-9) and half["AP50"] == pytest.approx(0.5, abs=1e-9)


def test_resolve_datasets(tmp_path):
    assert len(ODINW_35) == 35 and len(ODINW_13) == 13 and set(ODINW_13) <= set(ODINW_35)
    assert SUITES["odinw35"] == tuple(ODINW_35)
    for name in ("pistols", "PascalVOC"):
        path = tmp_path / ODINW_35[name]
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    custom = tmp_path / "mine" / "annotations.json"
    custom.parent.mkdir()
    custom.write_text("{}")
    found = resolve_datasets(tmp_path, ["pistols", "mine/annotations.json", "PascalVOC", "pistols"])
    assert found == [("pistols", tmp_path / "pistols/export/val_annotations_without_background.json"),
                     ("mine/annotations.json", custom),
                     ("PascalVOC", tmp_path / "PascalVOC/valid/annotations_without_background.json")]
    with pytest.raises(ValueError, match="not found"):
        resolve_datasets(tmp_path, ["odinw13"])  # the rest of the suite is absent
    with pytest.raises(ValueError, match="unknown ODinW dataset 'Pistols'"):
        resolve_datasets(tmp_path, ["Pistols"])
    with pytest.raises(ValueError, match="no ODinW datasets"):
        resolve_datasets(tmp_path, [])


# ---------------------------------------------------------------- a real (random) model


@pytest.fixture(scope="module")
def detector(setup):
    cfg = setup[0]
    text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=cfg.data.max_text_len)
    base = glip_tiny(text)
    config = dataclasses.replace(base, head=dataclasses.replace(base.head, fusion_embed_dim=64, fusion_heads=4),
                                 max_text_len=cfg.data.max_text_len,
                                 postprocess=dataclasses.replace(base.postprocess, pre_nms_thresh=0.005))
    model = GLIP(config)  # random weights score about 0.01: the threshold lets their boxes through
    length = cfg.data.max_text_len
    args = (jax.random.PRNGKey(0), np.zeros((1, *cfg.data.canvas, 3), np.float32),
            np.ones((1, length), np.int32), np.ones((1, length), np.int32))
    mesh = sharding.make_mesh({"data": -1}, jax.local_devices())
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(meta.unbox(jax.jit(model.init)(*args)["params"]), replicated)  # as load_run places them
    return datasets.Detector(model, config, params, mesh, batch_size=BATCH)


def test_report_equals_pycocotools_on_the_same_detections(setup, detector):
    cfg, root, files, data = setup
    path = files["alpha"]
    report = datasets.evaluate_coco(detector, data, path, path.parent)
    chunks = datasets.class_chunks(*datasets._prompt_names(json.loads(path.read_text())["categories"]),
                                   data.tokenizer, 64)
    ds, _, sizes = datasets.open_records("coco", data, path, path.parent)
    found = datasets.detect_set(detector, data, chunks, ds, sizes, "alpha")
    results = [{"image_id": i, "category_id": int(c), "score": float(s),
                "bbox": [b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1]}
               for i, boxes, scores, labels in found.per_image() for b, s, c in zip(boxes, scores, labels)]
    assert results and report["num_images"] == 5 and report["num_chunks"] == len(chunks) == 1
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        direct = COCOeval(gt, gt.loadRes(results), "bbox")
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    for name, value in zip(STAT_NAMES, direct.stats):
        assert report[name] == value or (math.isnan(report[name]) and value < 0), name
    # faster-coco-eval agrees with pycocotools on COCO AP.
    faster = FasterCOCO(str(path))
    other = COCOeval_faster(faster, faster.loadRes(results), iouType="bbox", print_function=lambda *a: None)
    other.evaluate()
    other.accumulate()
    other.summarize()
    np.testing.assert_allclose(other.stats[:12], direct.stats, atol=1e-12)
    # Boxes clipped to the 96 px input (x <= 95) are scaled back to the 64 px original as the
    # reference's BoxList.resize does (x * 64 / 96); labels are the set's category ids.
    assert found.boxes[found.valid].max() <= 95 * 64 / 96 + 1e-4 and found.valid.sum(1).max() <= detector.max_detections
    assert set(found.labels[found.valid].tolist()) <= {c["id"] for c in json.loads(path.read_text())["categories"]}

    # The first 3 images alone (one padded batch of 3) give the same detections.
    few = dataclasses.replace(data, max_images=3)
    ds3, _, sizes3 = datasets.open_records("coco", few, path, path.parent)
    first = datasets.detect_set(detector, few, chunks, ds3, sizes3, "alpha")
    assert sizes3 == [3]
    for a, b in zip(dataclasses.astuple(first), dataclasses.astuple(found)):
        np.testing.assert_allclose(a, b[:3], rtol=1e-6, atol=1e-4)
    split = detector._split  # one compiled shape for every batch
    assert [f._cache_size() for f in (split.images, split.text, split.detect)] == [1, 1, 1]


def test_chunks_equal_the_whole_model_with_each_chunk_per_row(setup, detector):
    cfg, root, files, data = setup
    path = files["alpha"]
    ds, _, _ = datasets.open_records("coco", data, path, path.parent)
    examples = list(tfds.as_numpy(datasets._examples(ds, data.transform)))[:BATCH]
    images = datasets.pad_rows([e["image"] for e in examples], BATCH)
    sizes = datasets.pad_rows([e["image_size"].astype(np.int32) for e in examples], BATCH)
    chunks = datasets.class_chunks([c.name for c in shapes.CATEGORIES], [c.id for c in shapes.CATEGORIES],
                                   data.tokenizer, 64)
    assert len(chunks) >= 2
    for chunk, split in zip(chunks, detector.detect_chunks(images, sizes, chunks)):
        rows = [np.broadcast_to(x, (BATCH,) + x.shape)
                for x in (chunk.input_ids, chunk.attention_mask, chunk.positive_map, chunk.phrase_mask)]
        whole = detector(images, *rows, sizes)
        np.testing.assert_array_equal(split.valid, whole.valid)
        np.testing.assert_array_equal(split.labels[split.valid], whole.labels[whole.valid])
        np.testing.assert_allclose(split.scores[split.valid], whole.scores[whole.valid], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(split.boxes[split.valid], whole.boxes[whole.valid], atol=1e-3)


def test_class_chunks_share_a_phrase_bucket(setup):
    tokenizer = setup[3].tokenizer
    names = [c.name for c in shapes.CATEGORIES]
    ids = [c.id for c in shapes.CATEGORIES]
    chunks = datasets.class_chunks(names, ids, tokenizer, 64)
    (shape,) = {c.positive_map.shape for c in chunks}  # one shape for every chunk
    assert len(chunks) > 1 and shape[0] % datasets.PHRASE_BUCKET == 0 and shape[1] == 64
    assert max(c.phrase_mask.sum() for c in chunks) > shape[0] - datasets.PHRASE_BUCKET
    assert np.concatenate([c.category_ids[c.phrase_mask] for c in chunks]).tolist() == ids
    by_count = datasets.class_chunks(names, ids, tokenizer, 64, classes_per_chunk=5)
    assert [int(c.phrase_mask.sum()) for c in by_count] == [5] * 7 + [1]
    assert by_count[0].positive_map.shape == (16, 64)
