"""TFDS builder for the bundled "shapes" dataset (see glipjax.data.shapes).

Nothing is downloaded: every split is generated from the config's seed. Features:
  image        uint8 (image_size, image_size, 3), stored as PNG
  image_id     int64, unique across splits
  caption      text; every boxed object's phrase is at objects/span_start:span_end
  objects      sequence (empty in the "captions" split), in order of mention:
    bbox           float32 [4]: absolute pixel xyxy (x0, y0, x1, y1), pixel-edge
                   coordinates, tight around the object's visible pixels
    category_id    int32, from glipjax.data.shapes.CATEGORIES (1-based)
    category_name  text, "colour shape", e.g. "red circle"
    size           text, "small" or "large"
    span_start     int32, character offset of the phrase in the caption
    span_end       int32, exclusive end of the phrase

The builder config is named after all its parameters, so each c.data.shapes setting
has its own directory under data_dir/shapes/ and the same setting always gives the
same records.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from glipjax.data import shapes

CONFIG_FIELDS = ("seed", "image_size", "num_train", "num_validation", "num_captions", "num_novel", "max_objects")
VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """The generator parameters of one build (the fields of c.data.shapes)."""

    seed: int = 0
    image_size: int = 128
    num_train: int = 4000
    num_validation: int = 400
    num_captions: int = 1000
    num_novel: int = 400
    max_objects: int = shapes.MAX_OBJECTS

    def split_counts(self) -> dict[str, int]:
        return {
            "train": self.num_train,
            "validation": self.num_validation,
            "captions": self.num_captions,
            "novel": self.num_novel,
        }


def shapes_config(cfg_shapes: Mapping[str, Any]) -> ShapesConfig:
    """The builder config for c.data.shapes (a ConfigDict or a plain mapping)."""
    keys = set(cfg_shapes.keys())
    missing = [f for f in CONFIG_FIELDS if f not in keys]
    unknown = sorted(keys - set(CONFIG_FIELDS))
    if missing or unknown:
        raise ValueError(
            f"data.shapes needs exactly the fields {CONFIG_FIELDS}; missing {missing}, unknown {unknown}."
        )
    values = {f: int(cfg_shapes[f]) for f in CONFIG_FIELDS}
    for f in ("num_train", "num_validation", "num_captions", "num_novel"):
        if values[f] < 1:
            raise ValueError(f"data.shapes.{f} must be at least 1, got {values[f]}.")
    shapes.check_params(values["seed"], values["image_size"], values["max_objects"])
    name = (
        f"seed{values['seed']}_px{values['image_size']}_obj{values['max_objects']}"
        f"_n{values['num_train']}-{values['num_validation']}-{values['num_captions']}-{values['num_novel']}"
    )
    return ShapesConfig(name=name, version=VERSION, description="Coloured shapes with boxes and captions.", **values)


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic coloured shapes with detection boxes and grounded captions."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format="png"),
                    "image_id": np.int64,
                    "caption": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                            "category_id": np.int32,
                            "category_name": tfds.features.Text(),
                            "size": tfds.features.Text(),
                            "span_start": np.int32,
                            "span_end": np.int32,
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split, n) for split, n in self.builder_config.split_counts().items()}

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg = self.builder_config
        for index in range(count):
            sample = shapes.generate(
                cfg.seed, split, index, image_size=cfg.image_size, max_objects=cfg.max_objects
            )
            yield index, encode_sample(sample, with_boxes=split in shapes.SPLITS_WITH_BOXES)


def encode_sample(sample: shapes.Sample, *, with_boxes: bool) -> dict[str, Any]:
    """The TFDS example dict of `sample` (the image encoded as PNG)."""
    buffer = io.BytesIO()
    Image.fromarray(sample.image).save(buffer, format="PNG", compress_level=1)
    objects = sample.objects if with_boxes else ()
    return {
        "image": buffer.getvalue(),
        "image_id": sample.image_id,
        "caption": sample.caption,
        "objects": {
            "bbox": np.asarray([o.box for o in objects], np.float32).reshape(-1, 4),
            "category_id": np.asarray([o.category.id for o in objects], np.int32),
            "category_name": [o.category.name for o in objects],
            "size": [o.size for o in objects],
            "span_start": np.asarray([o.span[0] for o in objects], np.int32),
            "span_end": np.asarray([o.span[1] for o in objects], np.int32),
        },
    }


def shapes_builder(cfg_shapes: Mapping[str, Any], data_dir: str | os.PathLike) -> Shapes:
    """The (possibly not yet prepared) builder for c.data.shapes under `data_dir`."""
    return Shapes(config=shapes_config(cfg_shapes), data_dir=os.fspath(data_dir))


def prepare(builder: Shapes) -> Shapes:
    """Writes the builder's splits unless they are already on disk; returns it."""
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    )
    return builder


def build_shapes(cfg_shapes: Mapping[str, Any], data_dir: str | os.PathLike) -> Shapes:
    """Builds the dataset for c.data.shapes under `data_dir` unless it is already
    there, and returns the prepared builder."""
    return prepare(shapes_builder(cfg_shapes, data_dir))


def load_split(
    cfg_shapes: Mapping[str, Any],
    data_dir: str | os.PathLike,
    split: str,
    *,
    shuffle_files: bool = False,
    decoders: Mapping[str, Any] | None = None,
    max_records: int | None = None,
) -> tf.data.Dataset:
    """The decoded records of `split` (built first if needed), as a tf.data.Dataset;
    with `max_records`, only its first max_records records."""
    if split not in shapes.SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {shapes.SPLITS}.")
    if max_records is not None and max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records}.")
    builder = build_shapes(cfg_shapes, data_dir)
    # A sliced split rather than take(): TFDS caches small splits whole, and a take() of
    # the cached dataset reads it only in part (tf.data warns and discards the cache).
    name = split if max_records is None else f"{split}[:{max_records}]"
    return builder.as_dataset(split=name, shuffle_files=shuffle_files, decoders=decoders)
