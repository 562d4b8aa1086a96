"""The record schema every source builder writes, the bad-data rules, and
`load_source`, the one entry point the input pipeline calls.

Record schema (one record per image, or per image and caption for grounding data):
  image      the source file's JPEG/PNG bytes as they are (other formats re-encoded
             as PNG); decodes to uint8 (H, W, 3)
  image_id   int64: the source's integer id, else a stable hash of the file name
  caption    text; "" for detection records (the pipeline builds their prompt)
  objects    sequence:
    bbox       float32 [4]: absolute pixel xyxy in the "+1" convention
               (x2 = x + w - 1), inside [0, W-1] x [0, H-1], x2 > x1 and y2 > y1
    category   text: class name (detection) or "" (grounding, pseudo-labels)
    spans      int32 [k, 2] per object (a nested sequence: objects/spans decodes to a
               tf.RaggedTensor (num_objects, None, 2)): character spans [start, end)
               into the caption, each with 0 <= start < end <= len(caption); none
               for detection
    score      float32: 1.0 for human labels, the teacher's score for pseudo-labels

Bad-data rules, applied while building; every case is counted by reason in
builder.info.metadata["counts"] and nothing raises:
  records  missing_image, undecodable_image, empty_caption, duplicate_image_id,
           too_few_boxes (pseudo-labels), malformed_record (missing keys, wrong
           types): the record is skipped; its boxes count as boxes/record_skipped
  boxes    malformed (not 4 finite numbers), nonpositive_size (w or h <= 0; for xyxy
           input x2 <= x1 or y2 <= y1), outside (no overlap with the image),
           degenerate (x2 <= x1 or y2 <= y1 after conversion and clipping, so a
           1-pixel-wide box too, as in the reference), iscrowd, unknown_category,
           unknown_image (annotation of no listed image), no_span (grounding: none
           of its spans is valid), low_score and nms (pseudo-label screening): dropped
  spans    malformed, outside_caption, empty: dropped
  repaired clipped (box partly outside, clipped to the image), rescaled (pseudo-label
           boxes given for another image size), reencoded (image not JPEG/PNG)
  noted    no_boxes (a record kept with no boxes), size_mismatch (the annotation's
           image size differs from the file's; the file's size is used)
For records, boxes and spans: read == written + sum(dropped).

Each dataset is built once per (source kind, split, input paths, annotation file
size, options): the builder config is named by a hash of these, so two datasets
never share a directory under data_dir/<builder name>/.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
import pathlib
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

VERSION = tfds.core.Version("1.0.0")
GROUPS = ("records", "boxes", "spans")
INT64_MAX = 2**63 - 1
KEPT_FORMATS = ("JPEG", "PNG")  # stored as they are; anything else is re-encoded as PNG
IMAGE_CACHE_SIZE = 32  # checked images a builder keeps while it writes
# Source kind -> (module, builder class) of glipjax.data.builders.
KINDS = {
    "coco": ("glipjax.data.builders.coco", "CocoFormat"),
    "mdetr": ("glipjax.data.builders.mdetr", "MdetrGrounding"),
    "pseudo_labels": ("glipjax.data.builders.pseudo_labels", "PseudoLabels"),
    "image_text": ("glipjax.data.builders.image_text", "ImageText"),
}
# What malformed input raises inside a record's parser; such a record is skipped.
MALFORMED_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError)


def record_features() -> tfds.features.FeaturesDict:
    """The common record schema (see the module docstring)."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "image_id": np.int64,
            "caption": tfds.features.Text(),
            "objects": tfds.features.Sequence(
                {
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "category": tfds.features.Text(),
                    "spans": tfds.features.Sequence(tfds.features.Tensor(shape=(2,), dtype=np.int32)),
                    "score": np.float32,
                }
            ),
        }
    )


class Reject(Exception):
    """A record, box or span that a bad-data rule removes; `reason` names the rule."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DropCounter:
    """Counts of records, boxes and spans read, written and dropped by reason, plus
    repairs and notes (see the module docstring)."""

    def __init__(self) -> None:
        self.read: collections.Counter[str] = collections.Counter()
        self.written: collections.Counter[str] = collections.Counter()
        self.dropped: dict[str, collections.Counter[str]] = {g: collections.Counter() for g in GROUPS}
        self.repaired: collections.Counter[str] = collections.Counter()
        self.noted: collections.Counter[str] = collections.Counter()

    def drop(self, group: str, reason: str, n: int = 1) -> None:
        """Counts `n` items of `group` read and dropped for `reason`."""
        if not n:
            return
        self.read[group] += n
        self.dropped[group][reason] += n

    def write(self, group: str, n: int = 1) -> None:
        """Counts `n` items of `group` read and written."""
        self.read[group] += n
        self.written[group] += n

    def merge(self, other: DropCounter) -> None:
        self.read.update(other.read)
        self.written.update(other.written)
        for group in GROUPS:
            self.dropped[group].update(other.dropped[group])
        self.repaired.update(other.repaired)
        self.noted.update(other.noted)

    def as_dict(self) -> dict[str, Any]:
        """{group: {"read", "written", "dropped": {reason: n}}, "repaired": {...}, "noted": {...}}."""
        out: dict[str, Any] = {
            g: {
                "read": self.read[g],
                "written": self.written[g],
                "dropped": _nonzero(self.dropped[g]),
            }
            for g in GROUPS
        }
        out["repaired"] = _nonzero(self.repaired)
        out["noted"] = _nonzero(self.noted)
        return out


def _nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in sorted(counts.items()) if v}


def flat_drops(counts: Mapping[str, Any]) -> dict[str, int]:
    """The dropped counts of `DropCounter.as_dict()` as {"group/reason": n}."""
    return {f"{g}/{reason}": n for g in GROUPS for reason, n in counts[g]["dropped"].items()}


def stable_id(text: str) -> int:
    """A non-negative int64 id for a string id or file name, the same on every host."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & INT64_MAX


def is_id(value: Any) -> bool:
    """Whether `value` can be a source id (an int or a string)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def record_id(value: Any) -> int:
    """The int64 image_id of a source id: the id itself when it is an int64, else a
    stable hash of its text. Raises Reject(malformed_record) for other types."""
    if not is_id(value):
        raise Reject("malformed_record")
    if isinstance(value, int) and -INT64_MAX <= value <= INT64_MAX:
        return value
    return stable_id(str(value))


# ----------------------------------------------------------------------------------
# The bad-data rules


def number(value: Any) -> float:
    """`value` as a finite float; raises Reject(malformed) for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Reject("malformed")
    try:
        value = float(value)
    except OverflowError as e:  # an int beyond the float range
        raise Reject("malformed") from e
    if not math.isfinite(value):
        raise Reject("malformed")
    return value


def clean_box(raw: Any, box_format: str, width: int, height: int) -> tuple[np.ndarray, bool]:
    """The "+1"-convention xyxy float32 box of `raw` ([x, y, w, h] for "xywh", absolute
    [x1, y1, x2, y2] for "xyxy") clipped to [0, width-1] x [0, height-1], and whether it
    was clipped. Raises Reject(malformed | nonpositive_size | outside | degenerate)."""
    if box_format not in ("xywh", "xyxy"):
        raise ValueError(f"box_format must be 'xywh' or 'xyxy', got {box_format!r}.")
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise Reject("malformed")
    a, b, c, d = (number(v) for v in raw)
    if box_format == "xywh":
        if c <= 0 or d <= 0:
            raise Reject("nonpositive_size")
        box = [a, b, a + c - 1, b + d - 1]
    else:
        if c <= a or d <= b:
            raise Reject("nonpositive_size")
        box = [a, b, c, d]
    x_max, y_max = width - 1, height - 1
    if box[0] > x_max or box[1] > y_max or box[2] < 0 or box[3] < 0:
        raise Reject("outside")
    clipped = [min(max(box[0], 0), x_max), min(max(box[1], 0), y_max), min(box[2], x_max), min(box[3], y_max)]
    out = np.asarray(clipped, np.float32)
    if not (out[2] > out[0] and out[3] > out[1]):
        raise Reject("degenerate")
    return out, clipped != box


def clean_spans(raw: Any, caption: str, counter: DropCounter) -> np.ndarray:
    """The valid [start, end) character spans of `raw` into `caption` as int32 (k, 2);
    each span is counted as written or dropped (malformed, outside_caption, empty)."""
    if not isinstance(raw, (list, tuple)):
        counter.drop("spans", "malformed")
        return np.zeros((0, 2), np.int32)
    kept = []
    for span in raw:
        if (
            not isinstance(span, (list, tuple))
            or len(span) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
        ):
            counter.drop("spans", "malformed")
        elif span[0] < 0 or span[1] > len(caption):
            counter.drop("spans", "outside_caption")
        elif span[0] >= span[1]:
            counter.drop("spans", "empty")
        else:
            kept.append(span)
    counter.write("spans", len(kept))
    return np.asarray(kept, np.int32).reshape(-1, 2)


def clean_caption(raw: Any) -> str:
    """The caption text; raises Reject(empty_caption) for a blank one and
    Reject(malformed_record) for a non-string."""
    if not isinstance(raw, str):
        raise Reject("malformed_record")
    if not raw.strip():
        raise Reject("empty_caption")
    return raw


@dataclasses.dataclass(frozen=True)
class CheckedImage:
    """Image bytes that TensorFlow decodes to (height, width, 3) uint8."""

    data: bytes
    width: int
    height: int
    reencoded: bool


def check_image(data: bytes) -> CheckedImage:
    """Checks that `data` decodes, as the pipeline will decode it, and returns it with
    its size; formats other than JPEG/PNG are re-encoded as PNG. The decoded pixels are
    not kept. Raises Reject(undecodable_image)."""
    reencoded = False
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.format not in KEPT_FORMATS:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG", compress_level=1)
                data, reencoded = buffer.getvalue(), True
    except Exception as e:  # PIL raises many types on corrupt bytes
        raise Reject("undecodable_image") from e
    try:
        shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
    except tf.errors.OpError as e:
        raise Reject("undecodable_image") from e
    if tuple(shape) != (height, width, 3):
        raise Reject("undecodable_image")
    return CheckedImage(data, width, height, reencoded)


def read_image(path: pathlib.Path) -> CheckedImage:
    """`check_image` of the file at `path`; raises Reject(missing_image) when it cannot
    be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Reject("missing_image") from e
    return check_image(data)


def image_path(name: Any, images_dir: pathlib.Path) -> pathlib.Path:
    """`name` (a file name or path) under `images_dir` unless it is absolute."""
    if not isinstance(name, str) or not name:
        raise Reject("malformed_record")
    return images_dir / name


def note_size(counter: DropCounter, image: CheckedImage, annotation: Mapping[str, Any], keys: tuple[str, str]) -> None:
    """Notes size_mismatch when the annotation gives an image size (under `keys`,
    width first) that differs from the file's."""
    if all(k in annotation for k in keys) and (annotation[keys[0]], annotation[keys[1]]) != (image.width, image.height):
        counter.noted["size_mismatch"] += 1


def collect_boxes(
    items: Iterable[Any], parse: Callable[[Any], tuple[np.ndarray, str, np.ndarray, float]], counter: DropCounter
) -> list[tuple[np.ndarray, str, np.ndarray, float]]:
    """parse(item) for each raw box; a box whose parse raises Reject is counted as
    dropped for its reason, one that raises a malformed-input error as malformed."""
    boxes = []
    for item in items:
        try:
            boxes.append(parse(item))
        except Reject as e:
            counter.drop("boxes", e.reason)
        except MALFORMED_ERRORS:
            counter.drop("boxes", "malformed")
    return boxes


def example(
    image: CheckedImage,
    image_id: int,
    caption: str,
    boxes: list[tuple[np.ndarray, str, np.ndarray, float]],
    counter: DropCounter,
    *,
    boxed: bool = True,
) -> dict[str, Any]:
    """The TFDS example of one record from its checked image and (bbox, category,
    spans, score) boxes; counts the boxes written and the repairs/notes (no_boxes only
    for a `boxed` source)."""
    counter.write("boxes", len(boxes))
    if image.reencoded:
        counter.repaired["reencoded"] += 1
    if boxed and not boxes:
        counter.noted["no_boxes"] += 1
    return {
        "image": image.data,
        "image_id": image_id,
        "caption": caption,
        "objects": {
            "bbox": np.asarray([b[0] for b in boxes], np.float32).reshape(-1, 4),
            "category": [b[1] for b in boxes],
            "spans": [b[2] for b in boxes],
            "score": np.asarray([b[3] for b in boxes], np.float32),
        },
    }


def record_or_skip(
    counter: DropCounter, raw_boxes: int, build: Callable[[DropCounter], dict[str, Any]]
) -> dict[str, Any] | None:
    """Runs `build` (one record's parser) with a fresh counter. On success its counts
    join `counter` and the example is returned; when it raises Reject or a malformed-
    input error the record is counted as skipped, with its `raw_boxes` boxes as
    boxes/record_skipped, and None is returned."""
    local = DropCounter()
    try:
        record = build(local)
    except Reject as e:
        reason = e.reason
    except MALFORMED_ERRORS:
        reason = "malformed_record"
    else:
        counter.merge(local)
        counter.write("records")
        return record
    counter.drop("records", reason)
    counter.drop("boxes", "record_skipped", raw_boxes)
    return None


# ----------------------------------------------------------------------------------
# Input files


def read_json(path: pathlib.Path) -> Any:
    """The parsed JSON file; a file that is not JSON stops with a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file: {e}") from e


def read_jsonl(path: pathlib.Path) -> Iterator[Any]:
    """The JSON value of each non-blank line of `path`; a line that does not parse
    gives a Reject(malformed_record) in its place."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                yield Reject("malformed_record")


# ----------------------------------------------------------------------------------
# Builders


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
    """One build: the split to write, the input paths and the builder's options."""

    split: str = "train"
    paths: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()


class SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder of the common record schema from local files. Subclasses set
    `PATHS` (name -> required), `OPTIONS` (name -> default) and write `_records`."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "First release."}
    KIND: ClassVar[str]  # its key in KINDS
    PATHS: ClassVar[Mapping[str, bool]] = {"annotations": True, "images": True}
    OPTIONS: ClassVar[Mapping[str, Any]] = {}

    @property
    def paths(self) -> dict[str, pathlib.Path]:
        return {k: pathlib.Path(v) for k, v in self.builder_config.paths}

    @property
    def images_dir(self) -> pathlib.Path:
        """The `images` path, else the directory of the annotations file."""
        paths = self.paths
        return paths.get("images", paths["annotations"].parent)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.builder_config.options)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(self.__doc__ or "").strip(),
            features=record_features(),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # everything is local
        return {self.builder_config.split: self._generate_examples()}

    def read_image(self, path: pathlib.Path) -> CheckedImage:
        """`read_image` with the last IMAGE_CACHE_SIZE good reads kept: grounding files
        list an image once per caption, usually one after another."""
        cached = self._image_cache.get(path)
        if cached is None:
            cached = read_image(path)
            if len(self._image_cache) >= IMAGE_CACHE_SIZE:
                del self._image_cache[next(iter(self._image_cache))]
            self._image_cache[path] = cached
        return cached

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        self._image_cache: dict[pathlib.Path, CheckedImage] = {}
        counter = DropCounter()
        extra: dict[str, Any] = {"class_names": [], "category_ids": []}
        for key, record in enumerate(self._records(counter, extra)):
            if record is not None:
                yield key, record
        counts = counter.as_dict()
        if not counter.written["records"]:
            paths = dict(self.builder_config.paths)
            raise ValueError(f"{self.name}: no record of {paths} passed the bad-data rules: {counts}")
        for group in GROUPS:
            c = counts[group]
            if c["read"] != c["written"] + sum(c["dropped"].values()):
                raise RuntimeError(f"{self.name}: {group} counts do not add up: {c}")
        cfg = self.builder_config
        self.info.metadata.update(
            kind=self.KIND,
            split=cfg.split,
            paths=dict(cfg.paths),
            options=dict(cfg.options),
            counts=counts,
            **extra,
        )

    @abc.abstractmethod
    def _records(self, counter: DropCounter, extra: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
        """One example (or None for a skipped record) per source record, in source
        order; may set extra["class_names"] and extra["category_ids"]."""

    @classmethod
    def make_config(cls, split: str, paths: Mapping[str, Any], options: Mapping[str, Any]) -> SourceConfig:
        """The config for these inputs, named by a hash of everything that defines the
        build. Missing inputs and unknown or bad options raise ValueError."""
        if not isinstance(split, str) or not split.isidentifier():
            raise ValueError(f"split must be a plain name such as 'train', got {split!r}.")
        unknown = sorted(set(paths) - set(cls.PATHS))
        if unknown:
            raise ValueError(f"{cls.name}: unknown path argument(s) {unknown}; known: {sorted(cls.PATHS)}.")
        resolved: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for key, required in cls.PATHS.items():
            value = paths.get(key)
            if value is None or value == "":  # "": a config's field left unset
                if required:
                    raise ValueError(f"{cls.name}: {key} is not set (a required path).")
                continue
            path = pathlib.Path(value).expanduser().resolve()
            if key == "images":
                if not path.is_dir():
                    raise ValueError(f"{cls.name}: images directory not found: {value}")
            elif not path.is_file():
                raise ValueError(f"{cls.name}: {key} file not found: {value}")
            else:
                sizes[key] = path.stat().st_size
            resolved[key] = os.fspath(path)
        opts = cls.check_options(options)
        key_text = json.dumps([cls.name, split, resolved, sizes, opts], sort_keys=True)
        digest = hashlib.sha256(key_text.encode("utf-8")).hexdigest()[:16]
        return SourceConfig(
            name=f"{split}_{digest}",
            version=VERSION,
            description=f"{cls.name} {split} from {resolved} with options {opts}",
            split=split,
            paths=tuple(sorted(resolved.items())),
            options=tuple(sorted(opts.items())),
        )

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """`options` completed with the defaults; unknown names raise ValueError."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(f"{cls.name}: unknown option(s) {unknown}; known: {sorted(cls.OPTIONS)}.")
        return {**cls.OPTIONS, **options}


def builder_class(kind: str) -> type[SourceBuilder]:
    """The builder class of a source kind (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown source kind {kind!r}; choose one of {sorted(KINDS)}.")
    module, name = KINDS[kind]
    return getattr(importlib.import_module(module), name)


def build_source(kind: str, data_dir: str | os.PathLike, *, split: str = "train", **args: Any) -> SourceBuilder:
    """Builds the `kind` source from its local files into `data_dir` unless it is
    already there, and returns the prepared builder. `args` are the kind's paths
    (annotations=..., images=...) and options."""
    cls = builder_class(kind)
    unknown = sorted(set(args) - set(cls.PATHS) - set(cls.OPTIONS))
    if unknown:
        raise ValueError(
            f"{kind} source: unknown argument(s) {unknown}; paths: {sorted(cls.PATHS)}, options: {sorted(cls.OPTIONS)}."
        )
    paths = {k: v for k, v in args.items() if k in cls.PATHS}
    options = {k: v for k, v in args.items() if k not in cls.PATHS}
    builder = cls(config=cls.make_config(split, paths, options), data_dir=os.fspath(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    )
    return builder


def source_metadata(builder: SourceBuilder) -> dict[str, Any]:
    """The builder's metadata as a plain dict, with "drops" ({"group/reason": n})."""
    meta = {k: builder.info.metadata[k] for k in builder.info.metadata.keys()}
    meta["drops"] = flat_drops(meta["counts"])
    return meta


def load_source(
    kind: str,
    *,
    data_dir: str | os.PathLike,
    split: str = "train",
    part: Any = None,
    decoders: Mapping[str, Any] | None = None,
    shuffle_files: bool = False,
    read_config: tfds.ReadConfig | None = None,
    **args: Any,
) -> tuple[tf.data.Dataset, dict[str, Any]]:
    """The records of a local source (built into `data_dir` first if needed) and its
    metadata: kind, split, paths, options, class_names and category_ids (detection),
    counts, drops, and num_examples (of what is read).

    `part` is a TFDS split spec over `split` to read instead of all of it, e.g.
    "train[:10%]" or an entry of tfds.even_splits("train", n).
    """
    builder = build_source(kind, data_dir, split=split, **args)
    spec = split if part is None else part
    ds = builder.as_dataset(split=spec, decoders=decoders, shuffle_files=shuffle_files, read_config=read_config)
    meta = source_metadata(builder)
    meta["num_examples"] = builder.info.splits[spec].num_examples
    return ds, meta
