"""The bundled shapes dataset: generator rules, TFDS builder determinism and
annotation validity (configs/demo.py:tiny)."""

import logging
import re
import subprocess
import sys

import numpy as np
import pytest

from glipjax.config import load_config
from glipjax.data import shapes

# Tolerances (measured over 1800 generated images at 64, 96 and 128 px):
# - at least 15% of a box's pixels lie within RGB distance 45 of the object's nominal
#   colour (measured minimum 22%);
# - a small object's longer box side is at most 0.17 * size + 1.5 px (measured max
#   0.1875 * size at 64 px); a large one's at least 0.2 * size (measured min 0.227).
COLOR_DISTANCE, MIN_COLOR_FRACTION = 45.0, 0.15
SMALL_MAX, SMALL_SLACK_PX, LARGE_MIN = 0.17, 1.5, 0.20

PAIR_RE = re.compile(rf"\b({'|'.join(shapes.COLORS)}) ({'|'.join(shapes.SHAPES)})\b")
RELATION_RE = re.compile(r"\b(left of|right of|above|below|under)\b")
NOVEL_NAMES = {f"{c} {s}" for c, s in shapes.NOVEL_PAIRS}


def relation_true(a, b, word: str) -> bool:
    """Recomputes a stated relation from two xyxy boxes (strict: no shared row/column)."""
    if word == "left of":
        return a[2] <= b[0]
    if word == "right of":
        return b[2] <= a[0]
    if word == "above":
        return a[3] <= b[1]
    return b[3] <= a[1]  # "below" / "under"


def check_record(image, caption, boxes, names, sizes, spans, image_size):
    """Asserts every rule a boxed record must follow."""
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    assert caption.isascii() and caption.strip() == caption
    assert 1 <= len(boxes) <= shapes.MAX_OBJECTS
    assert len(set(names)) == len(names), "colour-shape pairs are distinct within an image"
    # Every object is mentioned once and the caption names no other object.
    assert [m.group(0) for m in PAIR_RE.finditer(caption)] == list(names), caption
    previous_end = 0
    for box, name, size, (start, end) in zip(boxes, names, sizes, spans):
        x0, y0, x1, y1 = (float(v) for v in box)
        assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size, box
        assert all(float(v).is_integer() for v in box)
        assert previous_end <= start < end <= len(caption)
        previous_end = end
        assert caption[start:end] in (name, f"{size} {name}"), (caption, start, end, name)
        color = np.asarray(shapes.COLORS[name.split()[0]], np.float32)
        region = image[int(y0) : int(y1), int(x0) : int(x1)].astype(np.float32)
        near = np.linalg.norm(region - color, axis=-1) < COLOR_DISTANCE
        assert near.mean() >= MIN_COLOR_FRACTION, (name, box, near.mean())
        side = max(x1 - x0, y1 - y0)
        if size == "small":
            assert side <= SMALL_MAX * image_size + SMALL_SLACK_PX, (name, box)
        else:
            assert size == "large" and side >= LARGE_MIN * image_size, (name, size, box)
    # Relations are stated between consecutive mentions; each must hold.
    for k in range(len(spans) - 1):
        gap = caption[spans[k][1] : spans[k + 1][0]]
        words = RELATION_RE.findall(gap)
        assert len(words) <= 1, gap
        if words:
            assert relation_true(boxes[k], boxes[k + 1], words[0]), (caption, gap, boxes[k], boxes[k + 1])


def sample_fields(s: shapes.Sample):
    return (
        s.image,
        s.caption,
        [o.box for o in s.objects],
        [o.category.name for o in s.objects],
        [o.size for o in s.objects],
        [o.span for o in s.objects],
    )


# ----------------------------------------------------------------------------------
# The generator (no TensorFlow)


def test_importing_generator_and_drawing_does_not_import_tensorflow():
    code = (
        "import sys, glipjax.data, glipjax.data.shapes, glipjax.draw\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_category_table():
    assert len(shapes.CATEGORIES) == len(shapes.COLORS) * len(shapes.SHAPES) == 36
    assert [c.id for c in shapes.CATEGORIES] == list(range(1, 37))
    assert {c.name for c in shapes.NOVEL_CATEGORIES} == NOVEL_NAMES and len(NOVEL_NAMES) == 6
    assert shapes.CATEGORY_BY_NAME["red circle"].id == 1
    # Every colour and every shape still occurs in the base pairs.
    assert {c.color for c in shapes.BASE_CATEGORIES} == set(shapes.COLORS)
    assert {c.shape for c in shapes.BASE_CATEGORIES} == set(shapes.SHAPES)


def test_generate_is_deterministic_and_order_independent():
    a = shapes.generate(3, "train", 7, image_size=96)
    shapes.generate(3, "train", 8, image_size=96)
    b = shapes.generate(3, "train", 7, image_size=96)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.objects == b.objects
    other_seed = shapes.generate(4, "train", 7, image_size=96)
    other_split = shapes.generate(3, "validation", 7, image_size=96)
    assert not np.array_equal(a.image, other_seed.image)
    assert not np.array_equal(a.image, other_split.image)
    assert a.image_id != other_split.image_id


@pytest.mark.parametrize("image_size", [64, 96, 128])
def test_generated_records_follow_the_rules(image_size):
    occluded = 0
    relations = 0
    for split in shapes.SPLITS:
        for index in range(60):
            s = shapes.generate(0, split, index, image_size=image_size)
            check_record(*sample_fields(s), image_size)
            names = {o.category.name for o in s.objects}
            if split == "novel":
                assert names & NOVEL_NAMES
            else:
                assert not names & NOVEL_NAMES
            assert all(o.visible_fraction >= shapes.MIN_VISIBLE_FRACTION for o in s.objects)
            occluded += any(o.visible_fraction < 1.0 for o in s.objects)
            relations += len(RELATION_RE.findall(s.caption))
    assert occluded >= 10, "some images should show occlusion"
    assert relations >= 60, "captions should state relations"


def test_max_objects_is_respected():
    counts = {len(shapes.generate(0, "train", i, image_size=96, max_objects=2).objects) for i in range(40)}
    assert counts == {1, 2}


def test_bad_generator_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        shapes.generate(0, "test", 0)
    with pytest.raises(ValueError, match="image_size"):
        shapes.generate(0, "train", 0, image_size=32)
    with pytest.raises(ValueError, match="max_objects"):
        shapes.generate(0, "train", 0, max_objects=7)


# ----------------------------------------------------------------------------------
# The TFDS builder


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("configs/demo.py:tiny")


@pytest.fixture(scope="module")
def built(tiny_cfg, tmp_path_factory):
    """The tiny dataset built twice, into two directories."""
    from glipjax.data.builders import shapes as shapes_builder

    dirs = [tmp_path_factory.mktemp("tfds_a"), tmp_path_factory.mktemp("tfds_b")]
    builders = [shapes_builder.build_shapes(tiny_cfg.data.shapes, d) for d in dirs]
    return builders[0], dirs


@pytest.fixture(scope="module")
def records(built):
    import tensorflow_datasets as tfds

    builder, _ = built
    return {split: list(tfds.as_numpy(builder.as_dataset(split=split))) for split in shapes.SPLITS}


def test_same_config_gives_byte_identical_records(built):
    _, (dir_a, dir_b) = built
    files_a = sorted(p.relative_to(dir_a) for p in dir_a.rglob("*.tfrecord*"))
    files_b = sorted(p.relative_to(dir_b) for p in dir_b.rglob("*.tfrecord*"))
    assert files_a == files_b and len(files_a) >= 4
    for rel in files_a:
        assert (dir_a / rel).read_bytes() == (dir_b / rel).read_bytes(), rel


def test_builders_do_not_log_the_custom_config_notice(built, tiny_cfg, caplog):
    from glipjax.data.builders import shapes as shapes_builder

    _, (dir_a, _) = built
    with caplog.at_level(logging.INFO, logger="absl"):  # other modules may have raised absl's level
        shapes_builder.shapes_builder(tiny_cfg.data.shapes, dir_a)
        logging.getLogger("absl").warning("another absl warning")
    messages = [record.getMessage() for record in caplog.records]
    assert "another absl warning" in messages
    assert not [m for m in messages if m.startswith("Using custom data configuration")]


def test_split_sizes_follow_the_config(built, records, tiny_cfg):
    builder, _ = built
    c = tiny_cfg.data.shapes
    expected = {"train": c.num_train, "validation": c.num_validation, "captions": c.num_captions, "novel": c.num_novel}
    assert {s: builder.info.splits[s].num_examples for s in shapes.SPLITS} == expected
    assert {s: len(r) for s, r in records.items()} == expected


def test_records_are_the_generated_samples(records, tiny_cfg):
    c = tiny_cfg.data.shapes
    for split in ("train", "novel"):
        for record in records[split][:5]:
            index = int(record["image_id"]) - shapes.image_id(split, 0)
            s = shapes.generate(c.seed, split, index, image_size=c.image_size, max_objects=c.max_objects)
            assert np.array_equal(record["image"], s.image)
            assert record["caption"].decode() == s.caption
            np.testing.assert_array_equal(record["objects"]["bbox"], np.asarray([o.box for o in s.objects]))
            assert record["objects"]["category_id"].tolist() == [o.category.id for o in s.objects]


def test_boxed_records_are_valid(records, tiny_cfg):
    size = tiny_cfg.data.shapes.image_size
    ids = set()
    for split in shapes.SPLITS_WITH_BOXES:
        for r in records[split]:
            objects = r["objects"]
            assert objects["bbox"].dtype == np.float32 and objects["span_start"].dtype == np.int32
            names = [n.decode() for n in objects["category_name"]]
            assert [shapes.CATEGORY_BY_NAME[n].id for n in names] == objects["category_id"].tolist()
            spans = list(zip(objects["span_start"].tolist(), objects["span_end"].tolist()))
            sizes = [s.decode() for s in objects["size"]]
            check_record(r["image"], r["caption"].decode(), objects["bbox"], names, sizes, spans, size)
            ids.add(int(r["image_id"]))
    assert len(ids) == sum(len(records[s]) for s in shapes.SPLITS_WITH_BOXES), "image ids are unique"


def test_novel_pairs_only_in_the_novel_split(records):
    for split in ("train", "validation", "captions"):
        for r in records[split]:
            assert not set(PAIR_RE.findall(r["caption"].decode())) & set(shapes.NOVEL_PAIRS)
            assert not {n.decode() for n in r["objects"]["category_name"]} & NOVEL_NAMES
    for r in records["novel"]:
        assert {n.decode() for n in r["objects"]["category_name"]} & NOVEL_NAMES


def test_captions_split_has_captions_but_no_boxes(records):
    for r in records["captions"]:
        assert r["objects"]["bbox"].shape == (0, 4) and r["objects"]["category_id"].size == 0
        assert PAIR_RE.search(r["caption"].decode())


def test_builder_config_rejects_bad_fields(tiny_cfg):
    from glipjax.data.builders import shapes as shapes_builder

    fields = tiny_cfg.data.shapes.to_dict()
    with pytest.raises(ValueError, match="unknown"):
        shapes_builder.shapes_config({**fields, "colour": 1})
    with pytest.raises(ValueError, match="num_train"):
        shapes_builder.shapes_config({**fields, "num_train": 0})
    assert shapes_builder.shapes_config(fields).name == shapes_builder.shapes_config(dict(fields)).name
    assert shapes_builder.shapes_config(fields).name != shapes_builder.shapes_config({**fields, "seed": 1}).name


def test_load_split_reads_the_built_split(built, tiny_cfg):
    from glipjax.data.builders import shapes as shapes_builder

    _, (dir_a, _) = built
    ds = shapes_builder.load_split(tiny_cfg.data.shapes, dir_a, "validation")
    first = next(iter(ds))
    assert first["image"].shape == (96, 96, 3) and first["objects"]["bbox"].shape[-1] == 4
    assert sum(1 for _ in ds) == tiny_cfg.data.shapes.num_validation
    head = shapes_builder.load_split(tiny_cfg.data.shapes, dir_a, "validation", max_records=3)
    ids = [r["image_id"] for r in ds.take(3).as_numpy_iterator()]
    assert [r["image_id"] for r in head.as_numpy_iterator()] == ids
    with pytest.raises(ValueError, match="split"):
        shapes_builder.load_split(tiny_cfg.data.shapes, dir_a, "test")
    with pytest.raises(ValueError, match="max_records"):
        shapes_builder.load_split(tiny_cfg.data.shapes, dir_a, "validation", max_records=0)
