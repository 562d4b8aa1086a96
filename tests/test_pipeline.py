"""The input pipeline on the tiny shapes mix (configs/demo.py:tiny): shapes and dtypes,
determinism, resume in a new process, per-host sharding, mix proportions, global
arrays on the 8 fake CPU devices, evaluation order and runtime drops."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from glipjax import sharding
from glipjax.config import load_config
from glipjax.data import pipeline, shapes

NUM_BATCHES = 40  # 320 samples for the mix proportions


def _config(*overrides):
    return load_config("configs/demo.py:tiny", list(overrides))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def batches(data_dir):
    loader = pipeline.DataLoader(_config(), data_dir, process_index=0, process_count=1)
    return [loader.next_host_batch() for _ in range(NUM_BATCHES)], loader


def test_batch_fields_shapes_dtypes_and_contents(batches):
    batch = batches[0][0]
    b, g, L = 8, 8, 64
    expected = {
        "images": ((b, 96, 96, 3), np.float32), "input_ids": ((b, L), np.int32),
        "attention_mask": ((b, L), np.int32), "gt_boxes": ((b, g, 4), np.float32), "gt_mask": ((b, g), np.bool_),
        "positive_map": ((b, g, L), np.float32), "image_sizes": ((b, 2), np.int32), "image_id": ((b,), np.int64),
        "source": ((b,), np.int32),
    }
    assert set(batch) == set(pipeline.BATCH_FIELDS) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    for batch in batches[0][:5]:
        assert np.all(batch["input_ids"][:, 0] == 101), "[CLS] first"
        mask = batch["gt_mask"]
        assert mask.any(axis=1).all(), "every shapes image keeps a box"
        rows = batch["positive_map"].sum(-1)
        np.testing.assert_allclose(rows[mask], 1.0, atol=1e-4)  # rows normalised (1e-6 per token)
        assert np.all(rows[~mask] == 0) and np.all(batch["gt_boxes"][~mask] == 0)
        # Tokens a box binds to are real tokens; boxes lie inside the resized image.
        assert np.all((batch["positive_map"] > 0) <= batch["attention_mask"][:, None, :].astype(bool))
        h, w = batch["image_sizes"][:, 0:1], batch["image_sizes"][:, 1:2]
        boxes = batch["gt_boxes"]
        assert np.all(boxes[..., 2][mask] <= (w - 1)[:, 0].repeat(8).reshape(8, 8)[mask])
        assert np.all(boxes[..., 3][mask] <= (h - 1)[:, 0].repeat(8).reshape(8, 8)[mask])
        assert set(np.unique(batch["image_sizes"])) <= {64, 80, 96}


def test_same_seed_same_batches_other_seed_differs(data_dir, batches):
    first = batches[0][:3]
    again = pipeline.DataLoader(_config(), data_dir, process_index=0, process_count=1)
    other = pipeline.DataLoader(_config("seed=1"), data_dir, process_index=0, process_count=1)
    for reference in first:
        batch = again.next_host_batch()
        assert all(np.array_equal(reference[k], batch[k]) for k in reference)
    assert not np.array_equal(first[0]["images"], other.next_host_batch()["images"])


_RESTORE_SCRIPT = """
import sys, numpy as np
from glipjax import sharding
from glipjax.config import load_config
from glipjax.data import pipeline, shapes
loader = pipeline.DataLoader(load_config("configs/demo.py:tiny"), sys.argv[1], process_index=0, process_count=1)
loader.restore(sys.argv[2])
batches = [loader.next_host_batch() for _ in range(5)]
np.savez(sys.argv[3], **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
print(loader.runtime_drops)
"""


def test_resume_in_a_new_process_gives_the_next_batches_byte_for_byte(data_dir, batches, tmp_path, repo_root):
    loader = pipeline.DataLoader(_config(), data_dir, process_index=0, process_count=1)
    for _ in range(3):
        loader.next_host_batch()
    loader.save(tmp_path / "state")
    out = tmp_path / "next.npz"
    result = subprocess.run(
        [sys.executable, "-c", _RESTORE_SCRIPT, str(data_dir), str(tmp_path / "state"), str(out)],
        cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = np.load(out)
    for i, expected in enumerate(batches[0][3:8]):
        for key, value in expected.items():
            got = restored[f"{i}/{key}"]
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), (i, key)
    assert json.loads((tmp_path / "state" / "drop_counts.json").read_text()).keys() <= set(pipeline.RUNTIME_DROPS)


def test_two_hosts_read_disjoint_records(data_dir):
    ids = []
    for index in range(2):
        loader = pipeline.DataLoader(_config(), data_dir, process_index=index, process_count=2)
        assert [s.size for s in loader.sources] == [24, 24]
        seen = set()
        for _ in range(12):  # 48 samples from 24 records per source
            batch = loader.next_host_batch()
            assert batch["images"].shape[0] == 4, "the host batch is the global batch / 2"
            seen.update(batch["image_id"].tolist())
        ids.append(seen)
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert len(ids[0] | ids[1]) > 30, "together the hosts cover most of the 48 records"


def test_mix_proportions_follow_the_weights(batches):
    sources = np.concatenate([b["source"] for b in batches[0]])
    fraction = float(np.mean(sources == 0))  # shapes_captions
    weights = _config().data.sources
    expected = weights.shapes_captions.weight / (weights.shapes_captions.weight + weights.shapes_detection.weight)
    assert 0 < expected < 1
    # Allow 3.5 binomial standard deviations (0.078 for 320 samples at weight 0.2).
    assert abs(fraction - expected) < 3.5 * np.sqrt(expected * (1 - expected) / sources.size), fraction
    names = batches[1].source_names
    assert names == ["shapes_captions", "shapes_detection"]


def test_detection_and_caption_prompts_differ(batches):
    ids = np.concatenate([b["input_ids"] for b in batches[0]])
    sources = np.concatenate([b["source"] for b in batches[0]])
    captions, detections = ids[sources == 0], ids[sources == 1]
    assert len(captions) and len(detections)
    period = 1012  # "." in the bert-base-uncased vocabulary
    # A detection prompt separates its classes with ". "; a shapes caption is one sentence.
    assert all((row == period).sum() >= 1 for row in detections)


def test_full_negative_prob_sets_how_many_classes_a_detection_prompt_draws():
    names = [f"{color} {shape}" for color in ("red", "blue", "green") for shape in ("circle", "square")]

    def prompt_lengths(full_negative_prob):
        encode = pipeline.PromptEncoder(None, 64, full_negative_prob).bind("detection", names)
        lengths = []
        for seed in range(20):
            _, mask, pmap, kept, dropped = encode(b"", np.array([b"red circle"]), np.zeros((1, 2), np.int64),
                                                  np.ones(1, np.int64), [], np.array([seed, 7], np.int64))
            assert kept.tolist() == [0] and dropped == 0 and pmap.sum() > 0
            lengths.append(int(mask.sum()))
        return lengths

    # Six classes of 2 words + ". " fit in 64 tokens: at 1 every prompt names all six.
    assert set(prompt_lengths(1.0)) == {2 + 6 * 3 - 1}
    assert min(prompt_lengths(0.0)) < 2 + 6 * 3 - 1  # at 0 the count is always drawn from 1..6
    with pytest.raises(ValueError, match="full_negative_prob must be in"):
        pipeline.PromptEncoder(None, 64, 1.5)


def test_global_arrays_are_sharded_over_the_data_axes(data_dir):
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    loader = pipeline.DataLoader(_config(), data_dir, mesh=mesh)
    batch = next(loader)
    for key, value in batch.items():
        assert isinstance(value, jax.Array) and value.shape[0] == 8, key
        assert value.sharding.spec[0] == ("data", "fsdp"), key
        assert len(value.addressable_shards) == 8 and value.addressable_shards[0].data.shape[0] == 1
    tensor_mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    images = sharding.shard_batch({"images": np.zeros((8, 4, 4, 3), np.float32)}, tensor_mesh)["images"]
    assert images.addressable_shards[0].data.shape[0] == 4  # split over data only, whole over tensor


def test_evaluation_reads_each_record_once_in_order_with_padding(data_dir):
    cfg = _config("data.batch_size=5", "data.sources.shapes_detection.prompt=fixed")
    loader = pipeline.DataLoader(cfg, data_dir, process_index=0, process_count=1, training=False)
    batches = []
    while True:
        try:
            batches.append(loader.next_host_batch())
        except StopIteration:
            break
    sources = np.concatenate([b["source"] for b in batches])
    ids = np.concatenate([b["image_id"] for b in batches])
    assert len(sources) == 100 and (sources == -1).sum() == 4, "96 records and 4 padding examples"
    assert np.array_equal(ids[:48], ids[48:96]) and len(set(ids[:48].tolist())) == 48
    assert set(np.unique(np.concatenate([b["image_sizes"] for b in batches])[:96])) == {96}
    fixed = np.concatenate([b["input_ids"] for b in batches])[48:96]
    assert np.all(fixed == fixed[0]), "the fixed class prompt is the same for every image"


def test_prompt_truncation_drops_are_counted(data_dir):
    # 16 tokens hold only a few classes: boxes of the classes cut off are dropped.
    cfg = _config("data.max_text_len=16", "data.sources.shapes_captions.weight=0.01")
    loader = pipeline.DataLoader(cfg, data_dir, process_index=0, process_count=1)
    for _ in range(4):
        batch = loader.next_host_batch()
        assert batch["input_ids"].shape == (8, 16)
    report = loader.drop_report()
    assert report["runtime"]["dropped_prompt"] > 0
    assert set(report) == {"shapes_captions", "shapes_detection", "runtime"}


@pytest.mark.parametrize("override, message", [
    ("data.sources.shapes_captions.kind=nope", "unknown kind 'nope'"),
    ("data.sources.shapes_captions.prompt=nope", "unknown prompt 'nope'"),
    ("data.batch_size=7", "not divisible by 2"),
])
def test_bad_config_names_the_field(data_dir, override, message):
    with pytest.raises(ValueError, match=message):
        pipeline.DataLoader(_config(override), data_dir, process_index=0, process_count=2)


FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _fixture_sources(**weights):
    cfg = _config("data.batch_size=4").unlock()
    entries = {
        "coco": dict(kind="coco", annotations=str(FIXTURES / "coco_instances.json"), images=str(FIXTURES / "images")),
        "flickr": dict(kind="mdetr", annotations=str(FIXTURES / "mdetr_flickr_train.json"),
                       images=str(FIXTURES / "images")),
        "pseudo": dict(kind="pseudo_labels", annotations=str(FIXTURES / "pseudo_labels_v1.jsonl"),
                       images=str(FIXTURES / "images")),
        "captions": dict(kind="image_text", annotations=str(FIXTURES / "image_text.jsonl"), images=str(FIXTURES)),
    }
    cfg.data.sources = ml_collections.ConfigDict({k: {**entries[k], "weight": w} for k, w in weights.items()})
    return cfg


def test_real_format_sources_mix_into_fixed_batches(data_dir):
    cfg = _fixture_sources(coco=1.0, flickr=1.0, pseudo=1.0, captions=1.0)
    loader = pipeline.DataLoader(cfg, data_dir, process_index=0, process_count=1)
    assert loader.source_names == ["captions", "coco", "flickr", "pseudo"]
    assert [s.prompt for s in loader.sources] == ["caption", "detection", "caption", "caption"]
    seen = set()
    for _ in range(6):
        batch = loader.next_host_batch()
        assert batch["images"].shape == (4, 96, 96, 3) and batch["positive_map"].shape == (4, 8, 64)
        seen.update(batch["source"].tolist())
        assert not batch["gt_mask"][batch["source"] == 0].any(), "image-caption pairs carry no boxes"
    assert seen == {0, 1, 2, 3}
    assert loader.drop_report()["coco"] == {"boxes/iscrowd": 1}
    loader.close()


def test_unset_or_missing_source_files_name_the_field(data_dir, tmp_path):
    cfg = _fixture_sources(coco=1.0)
    with cfg.unlocked():
        cfg.data.sources.coco.annotations = ""
        cfg.data.sources.coco.images = ""
    with pytest.raises(ValueError, match=r"data.sources.coco: coco_format: annotations is not set \(a required path\)"):
        pipeline.DataLoader(cfg, data_dir, process_index=0, process_count=1)
    with cfg.unlocked():
        cfg.data.sources.coco.annotations = str(tmp_path / "absent.json")
        cfg.data.sources.coco.images = str(FIXTURES / "images")
    with pytest.raises(ValueError, match=r"data.sources.coco: coco_format: annotations file not found: .*absent.json"):
        pipeline.DataLoader(cfg, data_dir, process_index=0, process_count=1)


def test_coco_boxes_follow_the_reference_conversion_and_resize(data_dir):
    cfg = _fixture_sources(coco=1.0)
    with cfg.unlocked():
        cfg.data.sources.coco.prompt = "fixed"
    loader = pipeline.DataLoader(cfg, data_dir, process_index=0, process_count=1, training=False)
    batch = loader.next_host_batch()
    row = batch["image_id"].tolist().index(42)  # street.jpg, 64x48
    assert batch["image_sizes"][row].tolist() == [72, 96]  # long side capped at 96: short side round(96*48/64)
    # Its first box [x, y, w, h] = [4, 20, 24, 26] -> +1 xyxy [4, 20, 27, 45], scaled by 1.5.
    np.testing.assert_allclose(batch["gt_boxes"][row, 0], [6.0, 30.0, 40.5, 67.5], rtol=1e-6)


def test_boxes_bind_to_their_phrase_words(batches):
    from glipjax.data.inspect import bound_words
    from glipjax.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    phrase = re.compile(rf"^((small|large) )?({'|'.join(shapes.COLORS)}) ({'|'.join(shapes.SHAPES)})$")
    checked = 0
    for batch in batches[0][:4]:
        for k in range(len(batch["source"])):
            for row in batch["positive_map"][k][batch["gt_mask"][k]]:
                words = bound_words(tok, batch["input_ids"][k], row)
                assert phrase.match(words), words  # captions: "[size ]colour shape"; detection: the class
                checked += 1
    assert checked > 20


def test_inspect_mix_prints_the_mix_and_draws_a_batch(data_dir, tmp_path, capsys):
    from glipjax.data.inspect import inspect_mix

    cfg = _config(f"data.data_dir={data_dir}")
    path = inspect_mix(cfg, tmp_path, num_batches=2, cols=4)
    out = capsys.readouterr().out
    assert path == tmp_path / "batch.png" and path.is_file()
    assert "mix: 2 sources, 16 samples in 2 batches" in out
    assert "shapes_captions: shapes, prompt caption, 48 records, weight 0.200, measured" in out
    assert "drops runtime: dropped_degenerate 0, dropped_max_boxes 0, dropped_prompt 0" in out
