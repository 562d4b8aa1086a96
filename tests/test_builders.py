"""Source builders (glipjax.data.builders: coco, mdetr, pseudo_labels, image_text):
the fixtures in tests/fixtures read back exactly, each bad-data rule on a hand-made
case with exact counts, and a fuzzed shard of corrupted real-format records."""

import copy
import json
import math
import pathlib
import shutil
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from glipjax.data.builders import common, pseudo_labels

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"


def read_back(ds) -> list[dict]:
    """Records as plain Python values (caption and categories decoded, spans as lists)."""
    out = []
    for r in tfds.as_numpy(ds):
        objects = r["objects"]
        out.append(
            {
                "image": r["image"],
                "image_id": int(r["image_id"]),
                "caption": r["caption"].decode("utf-8"),
                "bbox": objects["bbox"].tolist(),
                "category": [c.decode("utf-8") for c in objects["category"]],
                "spans": [np.asarray(s).reshape(-1, 2).tolist() for s in objects["spans"]],
                "score": objects["score"].tolist(),
            }
        )
    return sorted(out, key=lambda r: (r["image_id"], r["caption"]))


def load(kind: str, data_dir, **args) -> tuple[list[dict], dict]:
    ds, meta = common.load_source(kind, data_dir=data_dir, **args)
    return read_back(ds), meta


def check_counts_add_up(counts: dict) -> None:
    for group in common.GROUPS:
        c = counts[group]
        assert c["read"] == c["written"] + sum(c["dropped"].values()), (group, c)


def check_invariants(records: list[dict], meta: dict) -> None:
    """The schema invariants every written record satisfies, and the written counts."""
    kind = meta["kind"]
    for r in records:
        height, width, channels = r["image"].shape
        assert channels == 3 and r["image"].dtype == np.uint8
        caption = r["caption"]
        assert (caption == "") == (kind == "coco")
        if kind != "coco":
            assert caption.strip()
        for box, category, spans, score in zip(r["bbox"], r["category"], r["spans"], r["score"]):
            x1, y1, x2, y2 = box
            assert all(math.isfinite(v) for v in box), box
            assert 0 <= x1 < x2 <= width - 1 and 0 <= y1 < y2 <= height - 1, (box, width, height)
            assert math.isfinite(score)
            if kind == "coco":
                assert category in meta["class_names"] and spans == [] and score == 1.0
            else:
                assert category == "" and spans, (r, spans)
                assert all(0 <= s < e <= len(caption) for s, e in spans), (caption, spans)
        if kind == "image_text":
            assert r["bbox"] == []
    counts = meta["counts"]
    check_counts_add_up(counts)
    assert counts["records"]["written"] == len(records) == meta["num_examples"]
    assert counts["boxes"]["written"] == sum(len(r["bbox"]) for r in records)
    assert counts["spans"]["written"] == sum(len(s) for r in records for s in r["spans"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("builders_tfds")


# ----------------------------------------------------------------------------------
# The rules as functions (no build)


def test_clean_box_applies_the_plus_one_convention_and_clips():
    box, clipped = common.clean_box([4, 20, 24, 26], "xywh", 64, 48)
    assert box.dtype == np.float32 and box.tolist() == [4, 20, 27, 45] and not clipped
    box, clipped = common.clean_box([50, 40, 30, 20], "xywh", 64, 48)
    assert box.tolist() == [50, 40, 63, 47] and clipped
    box, clipped = common.clean_box([-5.5, 2, 70, 1e30], "xywh", 64, 48)
    assert box.tolist() == [0, 2, 63, 47] and clipped
    box, clipped = common.clean_box([1.5, 2.5, 10.0, 20.0], "xyxy", 64, 48)
    assert box.tolist() == [1.5, 2.5, 10.0, 20.0] and not clipped


@pytest.mark.parametrize(
    "raw, box_format, reason",
    [
        ([10, 10, 0, 5], "xywh", "nonpositive_size"),
        ([10, 10, 5, -3], "xywh", "nonpositive_size"),
        ([10, 10, 10, 20], "xyxy", "nonpositive_size"),
        ([10, 10, 1, 5], "xywh", "degenerate"),  # x2 == x1 in the +1 convention
        ([-20, 5, 21, 5], "xywh", "degenerate"),  # x2 = 0: only column 0 left after clipping
        ([70, 10, 5, 5], "xywh", "outside"),
        ([-30, -30, 10, 10], "xywh", "outside"),
        ([1e30, 1, 2, 2], "xywh", "outside"),
        ([float("nan"), 1, 2, 2], "xywh", "malformed"),
        ([1, 2, float("inf"), 2], "xyxy", "malformed"),
        ([1, 2, 3], "xywh", "malformed"),
        (["1", 2, 3, 4], "xywh", "malformed"),
        ([True, 2, 3, 4], "xywh", "malformed"),
        ([10**400, 1, 2, 2], "xywh", "malformed"),
        (None, "xywh", "malformed"),
        ("1 2 3 4", "xyxy", "malformed"),
    ],
)
def test_clean_box_rejects_by_reason(raw, box_format, reason):
    with pytest.raises(common.Reject) as e:
        common.clean_box(raw, box_format, 64, 48)
    assert e.value.reason == reason


def test_clean_spans_keeps_valid_spans_and_counts_the_rest():
    counter = common.DropCounter()
    caption = "a red car"  # 9 characters
    spans = common.clean_spans([[2, 9], [2, 30], [5, 5], [-1, 3], [0, 1.0], "x", [0, 1, 2], [0, 1]], caption, counter)
    assert spans.dtype == np.int32 and spans.tolist() == [[2, 9], [0, 1]]
    assert counter.as_dict()["spans"] == {
        "read": 8,
        "written": 2,
        "dropped": {"empty": 1, "malformed": 3, "outside_caption": 2},
    }
    assert common.clean_spans(None, caption, counter).shape == (0, 2)
    assert counter.dropped["spans"]["malformed"] == 4


def test_check_image_keeps_jpeg_png_bytes_and_reencodes_other_formats():
    jpeg = (IMAGES / "street.jpg").read_bytes()
    checked = common.check_image(jpeg)
    assert (checked.width, checked.height, checked.reencoded) == (64, 48, False) and checked.data == jpeg
    gray = common.check_image((IMAGES / "night.jpg").read_bytes())
    assert (gray.width, gray.height, gray.reencoded) == (32, 24, False)
    gif = common.check_image((IMAGES / "logo.gif").read_bytes())
    assert gif.reencoded and gif.data.startswith(b"\x89PNG") and (gif.width, gif.height) == (24, 24)
    png = (IMAGES / "kitchen.png").read_bytes()
    for bad in (jpeg[: len(jpeg) // 2], png[:-20], b"", b"not an image", jpeg[:20] + b"\x00" * 50):
        with pytest.raises(common.Reject) as e:
            common.check_image(bad)
        assert e.value.reason == "undecodable_image"
    with pytest.raises(common.Reject) as e:
        common.read_image(IMAGES / "absent.jpg")
    assert e.value.reason == "missing_image"


def test_nms_and_pseudo_label_layouts():
    boxes = np.asarray([[50, 30, 77, 57], [51, 31, 77, 57], [0, 0, 10, 10], [0, 0, 10, 10]], np.float64)
    scores = np.asarray([0.97, 0.99, 0.5, 0.5])
    # IoU of the first two = 26*26 / 27*27 = 0.927; the equal-score pair keeps the first.
    assert nms_list(boxes, scores, 0.9) == [False, True, True, False]
    assert nms_list(boxes, scores, 0.95) == [True, True, True, False]
    v1 = {"bboxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "scores": [0.5, 0.6], "tokens_positive": [[[0, 1]], [[2, 3]]]}
    assert pseudo_labels.flatten(v1) == [([1, 2, 3, 4], 0.5, [[0, 1]]), ([5, 6, 7, 8], 0.6, [[2, 3]])]
    v2 = {"bboxes": [[[1, 2, 3, 4], [5, 6, 7, 8]], [[9, 9, 12, 12]]], "scores": [[0.5, 0.6], [0.7]],
          "tokens_positive": [[[0, 1]], [[2, 3], [4, 5]]]}
    assert pseudo_labels.flatten(v2) == [
        ([1, 2, 3, 4], 0.5, [[0, 1]]),
        ([5, 6, 7, 8], 0.6, [[0, 1]]),
        ([9, 9, 12, 12], 0.7, [[2, 3], [4, 5]]),
    ]
    assert pseudo_labels.count_boxes(v2) == 3 and pseudo_labels.count_boxes({"bboxes": 3}) == 0


def nms_list(boxes, scores, threshold):
    return pseudo_labels.nms_keep(boxes, scores, threshold).tolist()


def test_configs_are_keyed_by_inputs_and_options(tmp_path):
    cls = common.builder_class("pseudo_labels")
    base = cls.make_config("train", {"annotations": FIXTURES / "pseudo_labels_v1.jsonl"}, {})
    again = cls.make_config("train", {"annotations": str(FIXTURES / "pseudo_labels_v1.jsonl")}, {})
    assert base.name == again.name and base.name.startswith("train_")
    other_file = cls.make_config("train", {"annotations": FIXTURES / "pseudo_labels_v2.jsonl"}, {})
    other_split = cls.make_config("validation", {"annotations": FIXTURES / "pseudo_labels_v1.jsonl"}, {})
    screened = cls.make_config("train", {"annotations": FIXTURES / "pseudo_labels_v1.jsonl"}, {"screen": True})
    assert len({base.name, other_file.name, other_split.name, screened.name}) == 4
    assert dict(screened.options) == {"screen": True, "score_threshold": 0.9, "nms_threshold": 0.9, "min_boxes": 1}
    with pytest.raises(ValueError, match="unknown option"):
        cls.make_config("train", {"annotations": FIXTURES / "pseudo_labels_v1.jsonl"}, {"threshold": 0.5})
    with pytest.raises(ValueError, match="score_threshold"):
        cls.make_config("train", {"annotations": FIXTURES / "pseudo_labels_v1.jsonl"}, {"score_threshold": "high"})
    with pytest.raises(ValueError, match="not found"):
        cls.make_config("train", {"annotations": tmp_path / "absent.jsonl"}, {})
    with pytest.raises(ValueError, match="required"):
        common.builder_class("coco").make_config("train", {"annotations": FIXTURES / "coco_instances.json"}, {})
    with pytest.raises(ValueError, match="split"):
        cls.make_config("train[:50%]", {"annotations": FIXTURES / "pseudo_labels_v1.jsonl"}, {})
    with pytest.raises(ValueError, match="Unknown source kind"):
        common.builder_class("objects365")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['image'\]"):
        common.build_source("coco", tmp_path, annotations=FIXTURES / "coco_instances.json", image=IMAGES)


# ----------------------------------------------------------------------------------
# The fixtures, built and read back


def test_coco_fixture(data_dir):
    records, meta = load("coco", data_dir, annotations=FIXTURES / "coco_instances.json", images=IMAGES)
    check_invariants(records, meta)
    assert meta["class_names"] == ["person", "car", "dog"] and meta["category_ids"] == [1, 3, 18]
    by_id = {r["image_id"]: r for r in records}
    assert sorted(by_id) == [5, 7, 42, 1001]
    assert by_id[42]["bbox"] == [[4, 20, 27, 45], [40, 8, 59, 27]] and by_id[42]["category"] == ["car", "dog"]
    assert by_id[7]["bbox"] == [[10.5, 10, 28.5, 39]] and by_id[7]["category"] == ["person"]
    assert by_id[1001]["bbox"] == [[5, 5, 34, 24], [50, 30, 77, 57]] and by_id[1001]["category"] == ["dog", "car"]
    assert by_id[5]["bbox"] == [] and by_id[5]["image"].shape == (24, 24, 3)  # the GIF, re-encoded
    assert by_id[7]["image"].shape == (56, 40, 3) and by_id[42]["image"].shape == (48, 64, 3)
    assert all(r["caption"] == "" and r["score"] == [1.0] * len(r["bbox"]) for r in records)
    counts = meta["counts"]
    assert counts["records"] == {"read": 4, "written": 4, "dropped": {}}
    assert counts["boxes"] == {"read": 6, "written": 5, "dropped": {"iscrowd": 1}}
    assert counts["repaired"] == {"reencoded": 1} and counts["noted"] == {"no_boxes": 1}
    assert meta["drops"] == {"boxes/iscrowd": 1}


def test_records_keep_the_original_image_bytes_and_spans_are_ragged(data_dir):
    ds, _ = common.load_source(
        "coco", data_dir=data_dir, annotations=FIXTURES / "coco_instances.json", images=IMAGES,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    spans = ds.element_spec["objects"]["spans"]
    assert isinstance(spans, tf.RaggedTensorSpec) and spans.shape.as_list() == [None, None, 2]
    stored = {int(r["image_id"]): r["image"] for r in tfds.as_numpy(ds)}
    assert stored[42] == (IMAGES / "street.jpg").read_bytes()
    assert stored[7] == (IMAGES / "kitchen.png").read_bytes()


def test_lvis_fixture(data_dir):
    records, meta = load("coco", data_dir, annotations=FIXTURES / "lvis_v1_val.json", images=IMAGES)
    check_invariants(records, meta)
    assert meta["class_names"] == ["aerosol_can", "apple", "zebra"] and meta["category_ids"] == [1, 12, 1202]
    by_id = {r["image_id"]: r for r in records}
    # coco_url .../train2017/000000000009.jpg is found under images/train2017/.
    assert by_id[9]["image"].shape == (40, 48, 3) and by_id[9]["bbox"] == [[8, 8, 23, 31]]
    assert by_id[9]["category"] == ["zebra"]
    # .../val2017/night.jpg falls back to images/night.jpg (grayscale JPEG, decoded to 3 channels).
    assert by_id[139]["image"].shape == (24, 32, 3)
    assert by_id[139]["bbox"] == [[6, 4, 21, 19], [20, 10, 31, 23]]  # the apple box clipped to the image
    assert by_id[139]["category"] == ["aerosol_can", "apple"]
    assert meta["counts"]["repaired"] == {"clipped": 1} and meta["drops"] == {}


def test_mdetr_fixture(data_dir):
    records, meta = load("mdetr", data_dir, annotations=FIXTURES / "mdetr_flickr_train.json", images=IMAGES)
    check_invariants(records, meta)
    assert [r["image_id"] for r in records] == [0, 1, 2]
    r0, r1, r2 = records
    assert r0["caption"] == "A red car is parked next to a yellow ball."
    assert r0["bbox"] == [[4, 20, 27, 45], [40, 8, 59, 27]] and r0["spans"] == [[[2, 9]], [[30, 41]]]
    assert [r0["caption"][s:e] for (s, e), in r0["spans"]] == ["red car", "yellow ball"]
    assert r1["spans"] == [[[4, 10], [11, 15]], [[33, 40]]]
    assert r1["caption"][4:10] + " " + r1["caption"][11:15] == "yellow ball"
    assert r2["bbox"] == [[5, 5, 34, 24], [50, 30, 77, 57]] and r2["image"].shape == (60, 80, 3)
    assert [r2["caption"][s:e] for (s, e), in r2["spans"]] == ["white cloud", "brown box"]
    assert all(r["category"] == ["", ""] and r["score"] == [1.0, 1.0] for r in records)
    counts = meta["counts"]
    assert counts["records"]["written"] == 3 and counts["boxes"]["written"] == 6
    assert counts["spans"] == {"read": 7, "written": 7, "dropped": {}} and meta["drops"] == {}


def test_pseudo_label_v1_and_v2_fixtures_agree(data_dir):
    v1, meta1 = load("pseudo_labels", data_dir, annotations=FIXTURES / "pseudo_labels_v1.jsonl", images=IMAGES)
    v2, meta2 = load("pseudo_labels", data_dir, annotations=FIXTURES / "pseudo_labels_v2.jsonl", images=IMAGES)
    check_invariants(v1, meta1)
    check_invariants(v2, meta2)
    field = next(r for r in v1 if r["image"].shape == (60, 80, 3))
    assert field["bbox"] == [[5, 5, 34, 24], [50, 30, 77, 57], [51, 31, 77, 57], [0, 0, 79, 59]]
    assert field["score"] == pytest.approx([0.95, 0.97, 0.6, 0.92], abs=1e-7)
    assert [field["caption"][s:e] for (s, e), in field["spans"]] == ["white cloud", "brown box", "brown box", "a field"]
    kitchen = next(r for r in v1 if r["image"].shape == (56, 40, 3))
    # Given for a 20x28 image: scaled by 2 to the 40x56 file.
    assert kitchen["bbox"] == [[10, 10, 29, 39]] and kitchen["spans"] == [[[2, 7], [8, 13]]]
    assert meta1["counts"]["repaired"] == {"rescaled": 1} and meta1["counts"]["noted"] == {"size_mismatch": 1}
    # v2 shares an entity's spans across its boxes; the same boxes come out.
    for a, b in zip(v1, v2):
        assert a["image_id"] == b["image_id"] and a["bbox"] == b["bbox"] and a["score"] == b["score"]
    spans_v2 = {r["image"].shape: r["spans"] for r in v2}
    assert spans_v2[(60, 80, 3)] == field["spans"] and spans_v2[(56, 40, 3)] == [[[2, 13]]]
    assert meta2["counts"]["repaired"] == {} and meta2["counts"]["boxes"]["written"] == 5
    assert [r["image_id"] for r in v1] == sorted([common.stable_id("field.jpg"), common.stable_id("kitchen.png")])


def test_pseudo_label_screening(data_dir):
    args = dict(annotations=FIXTURES / "pseudo_labels_v1.jsonl", images=IMAGES)
    records, meta = load("pseudo_labels", data_dir, screen=True, **args)
    check_invariants(records, meta)
    assert meta["drops"] == {"boxes/low_score": 1}  # 0.6 is not > 0.9
    records, meta = load("pseudo_labels", data_dir, screen=True, score_threshold=0.5, **args)
    check_invariants(records, meta)
    assert meta["drops"] == {"boxes/nms": 1}  # IoU 0.927 > 0.9 with the 0.97 box
    field = next(r for r in records if r["image"].shape == (60, 80, 3))
    assert field["bbox"] == [[5, 5, 34, 24], [50, 30, 77, 57], [0, 0, 79, 59]]
    records, meta = load("pseudo_labels", data_dir, min_boxes=2, **args)
    check_invariants(records, meta)
    assert len(records) == 1 and meta["drops"] == {"records/too_few_boxes": 1, "boxes/record_skipped": 1}


def test_image_text_fixture(data_dir):
    records, meta = load("image_text", data_dir, annotations=FIXTURES / "image_text.jsonl")
    check_invariants(records, meta)
    captions = {r["caption"]: r for r in records}
    assert set(captions) == {
        "a red car and a yellow ball on a blue sky",
        "a grey moon in the night",
        "a green plant on a white wall",
    }
    assert captions["a grey moon in the night"]["image"].shape == (24, 32, 3)
    assert captions["a grey moon in the night"]["image_id"] == common.stable_id("images/night.jpg")
    assert meta["counts"]["noted"] == {} and meta["drops"] == {}


def test_metadata_and_parts_are_read_back_from_disk(data_dir):
    args = dict(annotations=FIXTURES / "coco_instances.json", images=IMAGES)
    first = common.build_source("coco", data_dir, **args)
    again = common.build_source("coco", data_dir, **args)  # a new builder reading the prepared one
    assert again.data_path == first.data_path
    meta = common.source_metadata(again)
    assert meta["kind"] == "coco" and meta["class_names"] == ["person", "car", "dog"]
    assert meta["paths"] == {
        "annotations": str((FIXTURES / "coco_instances.json").resolve()),
        "images": str(IMAGES.resolve()),
    }
    ids = []
    for part in tfds.even_splits("train", n=2):
        ds, part_meta = common.load_source("coco", data_dir=data_dir, part=part, **args)
        ids.append([int(r["image_id"]) for r in tfds.as_numpy(ds)])
        assert part_meta["num_examples"] == len(ids[-1]) == 2
    assert sorted(ids[0] + ids[1]) == [5, 7, 42, 1001]


def test_same_inputs_build_byte_identical_files(data_dir, tmp_path):
    args = dict(annotations=FIXTURES / "mdetr_flickr_train.json", images=IMAGES)
    a = common.build_source("mdetr", data_dir, **args)
    b = common.build_source("mdetr", tmp_path, **args)
    files_a = sorted(pathlib.Path(a.data_path).glob("*.tfrecord*"))
    files_b = sorted(pathlib.Path(b.data_path).glob("*.tfrecord*"))
    assert [f.name for f in files_a] == [f.name for f in files_b] and files_a
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(files_a, files_b))


# ----------------------------------------------------------------------------------
# Bad data: one hand-made case of each rule, with exact counts


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_images")
    shutil.copy(IMAGES / "street.jpg", root / "street.jpg")
    shutil.copy(IMAGES / "field.jpg", root / "field.jpg")
    data = (IMAGES / "street.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return root


def write_json(path: pathlib.Path, data) -> pathlib.Path:
    path.write_text(json.dumps(data))
    return path


def test_detection_bad_data_rules(bad_images, data_dir):
    def ann(i, image_id, bbox, category=3, **extra):
        return {"id": i, "image_id": image_id, "category_id": category, "bbox": bbox, **extra}

    coco = {
        "images": [
            {"id": 1, "file_name": "street.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "truncated.jpg", "width": 64, "height": 48},
            {"id": 3, "file_name": "absent.jpg", "width": 64, "height": 48},
            {"id": 1, "file_name": "field.jpg", "width": 80, "height": 60},
            {"id": 4, "file_name": "field.jpg", "width": 80, "height": 60},
        ],
        "annotations": [
            ann(1, 1, [4, 20, 24, 26]),  # kept as it is
            ann(2, 1, [10, 10, 0, 5]),  # zero width
            ann(3, 1, [50, 40, 30, 20]),  # partly outside: clipped to [50, 40, 63, 47]
            ann(4, 1, [70, 10, 5, 5]),  # entirely outside (x >= 64)
            ann(5, 1, [4, 4, 8, 8], category=99),  # unknown category id
            ann(6, 1, [4, 4, 8, 8], iscrowd=1),  # crowd
            ann(7, 1, [10, 10, 1, 5]),  # 1 pixel wide: degenerate in the +1 convention
            ann(8, 2, [4, 4, 8, 8]),  # of the undecodable image
            ann(9, 2, [4, 4, 8, 8]),
            ann(10, 3, [4, 4, 8, 8]),  # of the missing image
            ann(11, 404, [4, 4, 8, 8]),  # of no listed image
        ],
        "categories": [{"id": 3, "name": "car"}],
    }
    records, meta = load("coco", data_dir, annotations=write_json(bad_images / "coco.json", coco), images=bad_images)
    check_invariants(records, meta)
    assert [r["image_id"] for r in records] == [1, 4]
    assert records[0]["bbox"] == [[4, 20, 27, 45], [50, 40, 63, 47]] and records[1]["bbox"] == []
    counts = meta["counts"]
    assert counts["records"] == {
        "read": 5,
        "written": 2,
        "dropped": {"duplicate_image_id": 1, "missing_image": 1, "undecodable_image": 1},
    }
    assert counts["boxes"] == {
        "read": 11,
        "written": 2,
        "dropped": {
            "degenerate": 1, "iscrowd": 1, "nonpositive_size": 1, "outside": 1,
            "record_skipped": 3, "unknown_category": 1, "unknown_image": 1,
        },
    }
    assert counts["repaired"] == {"clipped": 1} and counts["noted"] == {"no_boxes": 1}


def test_grounding_bad_data_rules(bad_images, data_dir):
    mdetr = {
        "images": [
            {"id": 10, "file_name": "street.jpg", "caption": "a red car", "width": 64, "height": 48},
            {"id": 11, "file_name": "field.jpg", "caption": "", "width": 80, "height": 60},
            {"id": 12, "file_name": "field.jpg", "caption": "a field", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "bbox": [4, 20, 24, 26], "tokens_positive": [[2, 9]]},
            {"id": 2, "image_id": 10, "bbox": [4, 20, 24, 26], "tokens_positive": [[2, 30]]},  # past the end
            {"id": 3, "image_id": 10, "bbox": [40, 8, 20, 20], "tokens_positive": [[2, 9], [5, 5]]},  # one empty
            {"id": 4, "image_id": 10, "bbox": [40, 8, 20, 20], "tokens_positive": [[-1, 3]]},  # before the start
            {"id": 5, "image_id": 11, "bbox": [5, 5, 30, 20], "tokens_positive": [[0, 1]]},  # empty caption
            {"id": 6, "image_id": 12, "bbox": [0, 0, 80, 60], "tokens_positive": [[2, 7]]},
        ],
    }
    records, meta = load("mdetr", data_dir, annotations=write_json(bad_images / "mdetr.json", mdetr), images=bad_images)
    check_invariants(records, meta)
    assert [(r["image_id"], r["spans"]) for r in records] == [(10, [[[2, 9]], [[2, 9]]]), (12, [[[2, 7]]])]
    assert records[1]["bbox"] == [[0, 0, 79, 59]]  # the file's size (80x60) is used, not the annotated one
    counts = meta["counts"]
    assert counts["records"] == {"read": 3, "written": 2, "dropped": {"empty_caption": 1}}
    assert counts["boxes"] == {"read": 6, "written": 3, "dropped": {"no_span": 2, "record_skipped": 1}}
    assert counts["spans"] == {"read": 6, "written": 3, "dropped": {"empty": 1, "outside_caption": 2}}
    assert counts["noted"] == {"size_mismatch": 1}


def test_image_text_bad_lines(bad_images, data_dir):
    lines = [
        json.dumps({"image": "street.jpg", "caption": "a red car"}),
        json.dumps({"image": "field.jpg", "caption": "  "}),
        json.dumps({"image": "absent.jpg", "caption": "nothing here"}),
        json.dumps({"image": "truncated.jpg", "caption": "half a car"}),
        "",
        "{not json",
        json.dumps(["street.jpg", "a list"]),
        json.dumps({"image": "street.jpg"}),
    ]
    path = bad_images / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, meta = load("image_text", data_dir, annotations=path)
    check_invariants(records, meta)
    assert [r["caption"] for r in records] == ["a red car"]
    assert meta["counts"]["records"] == {
        "read": 7,
        "written": 1,
        "dropped": {"empty_caption": 1, "malformed_record": 3, "missing_image": 1, "undecodable_image": 1},
    }


def test_a_source_with_no_valid_record_names_its_counts(bad_images, tmp_path):
    path = bad_images / "nothing.jsonl"
    path.write_text(json.dumps({"image": "absent.jpg", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="missing_image"):
        common.load_source("image_text", data_dir=tmp_path, annotations=path)


# ----------------------------------------------------------------------------------
# A fuzzed shard: random corruptions of the fixtures' records

BAD_VALUES = [
    None, float("nan"), float("inf"), -1, 0, 1e30, -1e30, 10**20, "", "x", [], {}, True,
    [1, 2], [[-5, 10**6]], [float("nan")] * 4, [0, 0, -3, -3], [[3, 1]], [[0, 10**4]],
]


def corrupt(value, rng: np.random.Generator, depth: int = 0):
    """`value` with one random change somewhere inside it: a key deleted, an entry
    replaced by a bad value, a number negated or made huge or NaN."""
    if isinstance(value, dict) and value and depth < 4 and rng.random() < 0.85:
        key = list(value)[rng.integers(len(value))]
        out = dict(value)
        if rng.random() < 0.25:
            del out[key]
        else:
            out[key] = corrupt(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and depth < 4 and rng.random() < 0.85:
        out = list(value)
        i = int(rng.integers(len(out)))
        out[i] = corrupt(out[i], rng, depth + 1)
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool) and rng.random() < 0.5:
        return [-value, value * 1e6 + 1e3, float("nan"), value + 10**4][rng.integers(4)]
    return copy.deepcopy(BAD_VALUES[rng.integers(len(BAD_VALUES))])


def span_past_the_end(spans, rng: np.random.Generator):
    """`spans` (nested lists ending in [start, end] pairs) with one end moved past any
    caption in the fixtures."""
    if isinstance(spans, list) and len(spans) == 2 and all(isinstance(v, int) for v in spans):
        return [spans[0], spans[1] + int(rng.integers(100, 1000))]
    if isinstance(spans, list) and spans:
        i = int(rng.integers(len(spans)))
        return spans[:i] + [span_past_the_end(spans[i], rng)] + spans[i + 1 :]
    return spans


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    """root/images: the fixture images plus corrupted copies (cut, bit-flipped, empty,
    text); the fuzzed annotation files go to root."""
    root = tmp_path_factory.mktemp("fuzz")
    images = root / "images"
    rng = np.random.default_rng(0)
    for path in [p for p in IMAGES.rglob("*") if p.is_file()]:
        rel = path.relative_to(IMAGES)
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, images / rel)
        data = bytearray(path.read_bytes())
        (images / f"cut_{rel.name}").write_bytes(data[: int(rng.integers(1, len(data)))])
        for _ in range(8):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        (images / f"flip_{rel.name}").write_bytes(bytes(data))
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.png").write_text("not a png")
    return root


def corrupt_file_name(name: str, rng: np.random.Generator) -> str:
    """`name` pointing to a corrupted copy, an unreadable or missing file, or unchanged."""
    base = pathlib.PurePosixPath(name)
    new = [f"cut_{base.name}", f"flip_{base.name}", "empty.jpg", "text.png", "gone.jpg", base.name]
    return str(base.with_name(new[rng.integers(len(new))]))


def fuzz_coco_style(data: dict, rng: np.random.Generator, copies: int) -> dict:
    """`copies` copies of each image (new ids) with its annotations, about half of
    the entries corrupted."""
    images, annotations = [], []
    for c in range(copies):
        for image in data["images"]:
            new = dict(image, id=image["id"] * 100 + c)
            if rng.random() < 0.2:
                key = "file_name" if "file_name" in new else "coco_url"
                new[key] = corrupt_file_name(new[key], rng)
            images.append(corrupt(new, rng) if rng.random() < 0.3 else new)
            for ann in data["annotations"]:
                if ann["image_id"] == image["id"]:
                    new_ann = dict(ann, image_id=new["id"], id=len(annotations))
                    if "tokens_positive" in new_ann and rng.random() < 0.2:
                        new_ann["tokens_positive"] = span_past_the_end(new_ann["tokens_positive"], rng)
                    annotations.append(corrupt(new_ann, rng) if rng.random() < 0.5 else new_ann)
    return dict(data, images=images, annotations=annotations)


def fuzz_jsonl(lines: list[dict], rng: np.random.Generator, copies: int, name_key: str) -> list[str]:
    """`copies` copies of the records, about half with one to three corruptions
    (mostly inside their list fields: boxes, scores, spans), a few cut short."""
    out = []
    for _ in range(copies):
        for record in lines:
            record = dict(record)
            if rng.random() < 0.15:
                record[name_key] = corrupt_file_name(record[name_key], rng)
            roll = rng.random()
            if roll < 0.05:
                out.append(json.dumps(record)[: int(rng.integers(1, 20))])  # a cut line
                continue
            if "tokens_positive" in record and rng.random() < 0.2:
                record["tokens_positive"] = span_past_the_end(record["tokens_positive"], rng)
            if roll < 0.55:
                for _ in range(int(rng.integers(1, 4))):
                    if not isinstance(record, dict):
                        break
                    lists = [k for k, v in record.items() if isinstance(v, list)]
                    if lists and rng.random() < 0.7:
                        key = lists[rng.integers(len(lists))]
                        record = dict(record, **{key: corrupt(record[key], rng)})
                    else:
                        record = corrupt(record, rng)
            out.append(json.dumps(record))
    return out


def read_lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    "kind, fixture",
    [
        ("coco", "coco_instances.json"),
        ("coco", "lvis_v1_val.json"),
        ("mdetr", "mdetr_flickr_train.json"),
        ("pseudo_labels", "pseudo_labels_v1.jsonl"),
        ("pseudo_labels", "pseudo_labels_v2.jsonl"),
        ("image_text", "image_text.jsonl"),
    ],
)
def test_fuzzed_shard_builds_with_valid_records_and_balanced_counts(kind, fixture, fuzz_dir, data_dir):
    rng = np.random.default_rng(zlib.crc32(fixture.encode()))
    path = fuzz_dir / f"fuzz_{fixture}"
    if fixture.endswith(".json"):
        source = json.loads((FIXTURES / fixture).read_text())
        fuzzed = fuzz_coco_style(source, rng, copies=6)
        path.write_text(json.dumps(fuzzed))  # NaN and Infinity are written as JSON extensions
        expected_records, expected_boxes = len(fuzzed["images"]), len(fuzzed["annotations"])
    else:
        name_key = "image" if kind == "image_text" else "file_name"
        lines = fuzz_jsonl(read_lines(FIXTURES / fixture), rng, copies=16, name_key=name_key)
        path.write_text("\n".join(lines) + "\n")
        expected_records, expected_boxes = len(lines), None
    images = {} if kind == "image_text" else {"images": fuzz_dir / "images"}  # image_text: relative to the JSONL
    records, meta = load(kind, data_dir, annotations=path, **images)
    check_invariants(records, meta)
    counts = meta["counts"]
    assert counts["records"]["read"] == expected_records
    if expected_boxes is not None:
        assert counts["boxes"]["read"] == expected_boxes
    dropped = sum(counts["records"]["dropped"].values())
    assert 0 < dropped < expected_records, counts  # the shard was corrupted, yet records survive
    if kind != "image_text":  # corruptions reached single boxes, not only whole records
        assert len(set(counts["boxes"]["dropped"]) - {"record_skipped"}) >= 2, counts


def test_an_image_listed_once_per_caption_is_checked_once(tmp_path, monkeypatch):
    calls = []
    check = common.read_image
    monkeypatch.setattr(common, "read_image", lambda path: calls.append(path.name) or check(path))
    common.build_source("mdetr", tmp_path, annotations=FIXTURES / "mdetr_flickr_train.json", images=IMAGES)
    assert sorted(calls) == ["field.jpg", "street.jpg"]  # three records, two files
