"""The training/evaluation input pipeline: configured sources -> fixed-shape global
batches, mixed by weight, sharded per host, deterministic and resumable.

Stages, per source (c.data.sources, one named entry each):
  records in the common schema (glipjax.data.builders; the shapes dataset is adapted
  here), read per host: host i of n reads the i-th of n even parts of the split
  (record level, disjoint) -> repeat -> shuffle (seeded) -> enumerate (the example
  index) -> the captions of the records read just before (negatives for caption
  prompts; a tf.data scan, no extra reads) -> decode -> prompt and positive map
  (tf.numpy_function calling glipjax.data.prompts with a per-example seed) ->
  transforms (glipjax.data.transforms)
then: weighted mix (tf.data.Dataset.sample_from_datasets, seeded) -> batch of
global_batch / process_count -> prefetch -> a global jax.Array per field
(jax.make_array_from_process_local_data, batch axis over the mesh's data axes).

Randomness: every per-example draw (prompt negatives and order, scale, flip) comes
from a stateless seed fold_in(fold_in((seed, 0), source), index); the shuffles and the
mix take fixed seeds. The same config and seed give the same batches.

Resume: tf.data iterator checkpointing (tf.train.Checkpoint(iterator=...)), which
stores the position of every stage, the shuffle buffers (of encoded records) and the
prefetched batches; `DataLoader.save(dir)` writes it with the runtime drop counts,
`DataLoader.restore(dir)` on a freshly built loader (same config, data and host)
continues with exactly the batches that would have come next. The state holds the
shuffle buffers' encoded images and the prefetched batches, so it grows with
c.data.shuffle_buffer x image file size plus two host batches. Sources are read
without TFDS's in-memory cache of small splits: a cache is iterator state too, and it
made the demo's saved pipeline state hold its whole training split twice.

Config (c.data): sources (named entries: kind, weight, prompt, split and the kind's
paths/options for glipjax.data.builders.common.load_source), batch_size (global),
canvas, short_sides, max_size, eval_short_side, eval_max_size, flip_prob, max_boxes,
max_text_len, tokenizer, shuffle_buffer, num_negative_captions, full_negative_prob
(detection prompts: the probability of drawing every class as a negative; default the
reference's); c.seed.

Batch fields: images (B, H, W, 3) float32, input_ids / attention_mask (B, L) int32,
gt_boxes (B, G, 4) float32 (xyxy, +1 convention, input pixels), gt_mask (B, G) bool,
positive_map (B, G, L) float32, image_sizes (B, 2) int32 (height, width before
padding), image_id (B,) int64, source (B,) int32 (index into `source_names`).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import os
import pathlib
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from glipjax import paths, sharding
from glipjax.data import prompts, shapes, tokenizer, transforms
from glipjax.data.builders import common
from glipjax.data.builders import shapes as shapes_builder

SOURCE_KINDS = ("shapes", "coco", "mdetr", "pseudo_labels", "image_text")
PROMPTS = ("caption", "detection", "fixed")
BATCH_FIELDS = (
    "images", "input_ids", "attention_mask", "gt_boxes", "gt_mask", "positive_map",
    "image_sizes", "image_id", "source",
)
# Runtime drops, per example: boxes bound to no token (their class cut from a detection
# prompt, or their spans past the truncated text), boxes degenerate after the
# transforms, boxes beyond max_boxes.
RUNTIME_DROPS = ("dropped_prompt", "dropped_degenerate", "dropped_max_boxes")
_STATE_PREFIX = "iterator"
_COUNTS_FILE = "drop_counts.json"


@dataclasses.dataclass(frozen=True)
class Source:
    """One configured source as this host reads it."""

    name: str
    kind: str
    weight: float
    prompt: str  # one of PROMPTS
    records: Callable[[], tf.data.Dataset]  # common-schema records of this host's part, image undecoded
    class_names: tuple[str, ...]  # detection class names in category-id order
    size: int  # records in this host's part
    build_drops: Mapping[str, int]  # builder drop counts by reason (whole dataset)


def _shapes_record(record: Mapping[str, Any]) -> dict[str, tf.Tensor]:
    """A shapes record in the common schema: pixel-edge boxes (x1, y1 exclusive) become
    +1-convention boxes, each object gets its one span and score 1."""
    objects = record["objects"]
    x0, y0, x1, y1 = tf.unstack(tf.reshape(objects["bbox"], [-1, 4]), axis=-1)
    count = tf.shape(objects["span_start"])[0]
    return {
        "image": record["image"],
        "image_id": record["image_id"],
        "caption": record["caption"],
        "boxes": tf.stack([x0, y0, x1 - 1.0, y1 - 1.0], axis=-1),
        "category": objects["category_name"],
        "span_values": tf.stack([objects["span_start"], objects["span_end"]], axis=-1),
        "span_lengths": tf.ones([count], tf.int32),
        "score": tf.ones([count], tf.float32),
    }


def _host_split(split: str, process_index: int, process_count: int) -> str:
    """The process_index-th of process_count even, disjoint record ranges of `split`."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    return tfds.even_splits(split, n=process_count)[process_index]


# No in-memory cache of small splits (see the module docstring: it is saved with the state).
_READ_CONFIG = tfds.ReadConfig(try_autocache=False)


def _shapes_source(
    name: str, src: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
    data_dir: os.PathLike, process_index: int, process_count: int,
) -> Source:
    split = src.get("split", "train")
    if split not in shapes.SPLITS:
        raise ValueError(f"data.sources.{name}.split: unknown shapes split {split!r}; choose one of {shapes.SPLITS}.")
    builder = shapes_builder.build_shapes(data.shapes, data_dir)
    part = _host_split(split, process_index, process_count)
    size = builder.info.splits[part].num_examples

    def records() -> tf.data.Dataset:
        ds = builder.as_dataset(split=part, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
                                read_config=_READ_CONFIG)
        return ds.map(_shapes_record)

    categories = shapes.CATEGORIES if split == "novel" else shapes.BASE_CATEGORIES
    names = tuple(c.name for c in categories)
    return Source(name, "shapes", float(src.weight), src.get("prompt", "caption"), records, names, size, {})


def _common_record(record: Mapping[str, Any]) -> dict[str, tf.Tensor]:
    """A record of the common schema (glipjax.data.builders.common) with its per-object
    spans flattened: span_values (M, 2) and span_lengths (N,)."""
    objects = record["objects"]
    spans = objects["spans"]
    if not isinstance(spans, tf.RaggedTensor):
        spans = tf.RaggedTensor.from_tensor(spans)
    return {
        "image": record["image"],
        "image_id": record["image_id"],
        "caption": record["caption"],
        "boxes": tf.reshape(objects["bbox"], [-1, 4]),
        "category": objects["category"],
        "span_values": tf.reshape(tf.cast(spans.flat_values, tf.int32), [-1, 2]),
        "span_lengths": tf.cast(spans.row_lengths(), tf.int32),
        "score": objects["score"],
    }


_DEFAULT_PROMPTS = {"coco": "detection", "mdetr": "caption", "pseudo_labels": "caption", "image_text": "caption"}
_SOURCE_FIELDS = ("kind", "weight", "prompt", "split")  # the rest are the builder's paths and options


def _built_source(
    name: str, src: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
    data_dir: os.PathLike, process_index: int, process_count: int,
) -> Source:
    """A source written by a glipjax.data.builders builder from local files (built on
    first use); the source's other fields are the builder's paths and options."""
    split = src.get("split", "train")
    args = {k: src[k] for k in src if k not in _SOURCE_FIELDS}
    part = _host_split(split, process_index, process_count)

    def records() -> tf.data.Dataset:
        ds, _ = common.load_source(src.kind, data_dir=data_dir, split=split, part=part,
                                   decoders={"image": tfds.decode.SkipDecoding()}, read_config=_READ_CONFIG,
                                   **args)
        return ds.map(_common_record)

    try:
        _, meta = common.load_source(src.kind, data_dir=data_dir, split=split, part=part, **args)  # builds once
    except ValueError as error:  # name the source: a missing file, an unknown option
        raise ValueError(f"data.sources.{name}: {error}") from error
    prompt = src.get("prompt", _DEFAULT_PROMPTS[src.kind])
    return Source(name, src.kind, float(src.weight), prompt, records, tuple(meta.get("class_names", ())),
                  int(meta["num_examples"]), dict(meta["drops"]))


def _example_seed(seed: int, source_index: int, index: tf.Tensor) -> tf.Tensor:
    """The (2,) int64 stateless seed of example `index` of source `source_index`."""
    base = tf.constant([seed, 0], tf.int64)
    folded = tf.random.experimental.stateless_fold_in(base, source_index)
    return tf.cast(tf.random.experimental.stateless_fold_in(folded, index), tf.int64)


def _source_stream(
    source: Source, source_index: int, encoder: "PromptEncoder", tcfg: transforms.TransformConfig,
    *, seed: int, training: bool, shuffle_buffer: int, num_negatives: int,
) -> tf.data.Dataset:
    """The transformed, fixed-shape examples of one source (endless when training)."""
    ds = source.records()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed + 2 * source_index, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate()
    if source.prompt == "caption" and num_negatives > 0 and training:
        # Negatives: the captions of the num_negatives records read before this one.
        def roll(recent: tf.Tensor, item: tuple[tf.Tensor, Mapping[str, tf.Tensor]]):
            index, record = item
            return tf.concat([recent[1:], record["caption"][None]], 0), (index, record, recent)

        ds = ds.scan(tf.fill([num_negatives], ""), roll)
    else:
        ds = ds.map(lambda i, r: (i, r, tf.zeros([0], tf.string)))
    max_len = encoder.max_len

    def prepare(index: tf.Tensor, record: Mapping[str, tf.Tensor], negatives: tf.Tensor) -> dict[str, tf.Tensor]:
        prompt_seed, transform_seed = tf.unstack(
            tf.random.experimental.stateless_split(_example_seed(seed, source_index, index), 2))
        input_ids, attention_mask, positive_map, box_index, dropped = tf.numpy_function(
            encoder.bind(source.prompt, source.class_names),
            [record["caption"], record["category"], record["span_values"], record["span_lengths"], negatives,
             prompt_seed],
            [tf.int32, tf.int32, tf.float32, tf.int32, tf.int32],
            stateful=False,
        )
        input_ids = tf.ensure_shape(input_ids, [max_len])
        positive_map = tf.ensure_shape(positive_map, [None, max_len])
        image = tf.io.decode_image(record["image"], channels=3, expand_animations=False)
        boxes = tf.gather(record["boxes"], box_index)
        out = transforms.transform(image, boxes, {"positive_map": positive_map}, transform_seed, tcfg,
                                   training=training)
        return {
            "images": out["image"],
            "input_ids": input_ids,
            "attention_mask": tf.ensure_shape(attention_mask, [max_len]),
            "gt_boxes": out["boxes"],
            "gt_mask": out["box_mask"],
            "positive_map": out["positive_map"],
            "image_sizes": out["image_size"],
            "image_id": tf.cast(record["image_id"], tf.int64),
            "source": tf.constant(source_index, tf.int32),
            "dropped_prompt": tf.ensure_shape(dropped, []),
            "dropped_degenerate": out["dropped_degenerate"],
            "dropped_max_boxes": out["dropped_max_boxes"],
        }

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _padding_example(element_spec: Mapping[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
    """A zero example with source -1 and image_id -1 that fills an evaluation batch."""
    out = {k: tf.zeros(s.shape, s.dtype) for k, s in element_spec.items()}
    out["source"] = tf.constant(-1, tf.int32)
    out["image_id"] = tf.constant(-1, tf.int64)
    return out


def transform_config(data: ml_collections.ConfigDict) -> transforms.TransformConfig:
    """The transform sizes of c.data."""
    return transforms.TransformConfig(
        canvas=tuple(data.canvas), short_sides=tuple(data.short_sides), max_size=data.max_size,
        eval_short_side=data.eval_short_side, eval_max_size=data.eval_max_size,
        flip_prob=data.flip_prob, max_boxes=data.max_boxes,
    )


def open_sources(
    cfg: ml_collections.ConfigDict, data_dir: str | os.PathLike, *, process_index: int, process_count: int
) -> list[Source]:
    """The sources of c.data.sources (in name order) as host `process_index` of
    `process_count` reads them."""
    data = cfg.data
    if not data.sources:
        raise ValueError("data.sources is empty; configure at least one source.")
    for name in data.sources:  # every source's fields before any is opened (opening may build a dataset)
        src = data.sources[name]
        if src.kind not in SOURCE_KINDS:
            raise ValueError(f"data.sources.{name}.kind: unknown kind {src.kind!r}; choose one of {SOURCE_KINDS}.")
        if not src.weight > 0:
            raise ValueError(f"data.sources.{name}.weight must be positive, got {src.weight}.")
    sources = []
    for name in data.sources:
        src = data.sources[name]
        source = _OPENERS[src.kind](name, src, data, paths.as_path(data_dir), process_index, process_count)
        if source.prompt not in PROMPTS:
            raise ValueError(f"data.sources.{name}.prompt: unknown prompt {source.prompt!r}; choose one of {PROMPTS}.")
        if source.prompt != "caption" and not source.class_names:
            raise ValueError(f"data.sources.{name}: a {source.prompt!r} prompt needs class names; the source has none.")
        if source.size == 0:
            raise ValueError(f"data.sources.{name}: host {process_index} of {process_count} has no records.")
        sources.append(source)
    return sources


def build_dataset(
    cfg: ml_collections.ConfigDict, data_dir: str | os.PathLike, *, process_index: int = 0,
    process_count: int = 1, training: bool = True,
) -> tuple[tf.data.Dataset, list[Source]]:
    """The host's batches (numpy-ready dicts of BATCH_FIELDS plus RUNTIME_DROPS counts)
    and its sources. Training: endless weighted mix. Evaluation: each source once, in
    order, the last batch filled with padding examples (source -1)."""
    data = cfg.data
    if data.batch_size % process_count:
        raise ValueError(f"data.batch_size {data.batch_size} is not divisible by {process_count} processes.")
    local_batch = data.batch_size // process_count
    sources = open_sources(cfg, data_dir, process_index=process_index, process_count=process_count)
    # Configs saved before data.full_negative_prob existed used the reference's value.
    encoder = PromptEncoder(data.tokenizer or None, data.max_text_len,
                            data.get("full_negative_prob", prompts.FULL_NEGATIVE_PROB))
    tcfg = transform_config(data)
    streams = [
        _source_stream(s, i, encoder, tcfg, seed=cfg.seed, training=training,
                       shuffle_buffer=data.shuffle_buffer, num_negatives=data.num_negative_captions)
        for i, s in enumerate(sources)
    ]
    if training:
        weights = np.asarray([s.weight for s in sources], np.float64)
        ds = tf.data.Dataset.sample_from_datasets(
            streams, weights=(weights / weights.sum()).tolist(), seed=cfg.seed, stop_on_empty_dataset=True)
    else:
        ds = streams[0]
        for stream in streams[1:]:
            ds = ds.concatenate(stream)
        padding = tf.data.Dataset.from_tensors(_padding_example(ds.element_spec)).repeat(local_batch - 1)
        ds = ds.concatenate(padding)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(2)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options), sources


def _release(state: dict[str, Any]) -> None:
    state.clear()
    gc.collect()


class DataLoader:
    """Iterates global batches (or host numpy batches without a mesh); save/restore
    its position beside a model checkpoint.

    process_index / process_count default to jax.process_index() / process_count();
    tests pass them to simulate several hosts in one process.
    """

    def __init__(
        self, cfg: ml_collections.ConfigDict, data_dir: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
        rules: Sequence[Sequence[Any]] = sharding.DEFAULT_RULES, process_index: int | None = None,
        process_count: int | None = None, training: bool = True,
    ):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.dataset, self.sources = build_dataset(
            cfg, data_dir, process_index=self.process_index, process_count=self.process_count, training=training)
        self.mesh = mesh
        self.rules = rules
        self.runtime_drops: collections.Counter[str] = collections.Counter()
        iterator = iter(self.dataset)
        # The iterator lives only in this dict, which the finalizer empties at exit: its
        # worker threads, still calling the prompt function (Python) while the
        # interpreter shuts down, would otherwise hang the exit.
        self._state = {"iterator": iterator, "checkpoint": tf.train.Checkpoint(iterator=iterator)}
        self._finalizer = weakref.finalize(self, _release, self._state)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def next_host_batch(self) -> dict[str, np.ndarray]:
        """The next process-local batch as numpy arrays (BATCH_FIELDS); runtime drops
        are added to `runtime_drops`."""
        if not self._state:
            raise RuntimeError("the DataLoader is closed")
        batch = {k: v.numpy() for k, v in next(self._state["iterator"]).items()}
        for key in RUNTIME_DROPS:
            self.runtime_drops[key] += int(batch.pop(key).sum())
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.next_host_batch()
        return batch if self.mesh is None else sharding.shard_batch(batch, self.mesh, self.rules)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the iterator position and the runtime drop counts into `directory`."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._state["checkpoint"].write(str(directory / _STATE_PREFIX))
        (directory / _COUNTS_FILE).write_text(json.dumps(dict(self.runtime_drops), sort_keys=True))

    def restore(self, directory: str | os.PathLike) -> None:
        """Continues from a position written by `save` (same config and host)."""
        directory = pathlib.Path(directory)
        if not (directory / _COUNTS_FILE).is_file():
            raise FileNotFoundError(f"no data-pipeline state in {directory}")
        self._state["checkpoint"].read(str(directory / _STATE_PREFIX)).assert_consumed()
        self.runtime_drops = collections.Counter(json.loads((directory / _COUNTS_FILE).read_text()))

    def close(self) -> None:
        """Stops the input threads; the loader cannot be iterated afterwards."""
        self._finalizer()

    def drop_report(self) -> dict[str, dict[str, int]]:
        """Drop counts by reason: each source's build-time counts and the runtime ones."""
        report = {s.name: dict(s.build_drops) for s in self.sources}
        report["runtime"] = {k: self.runtime_drops.get(k, 0) for k in RUNTIME_DROPS}
        return report


class PromptEncoder:
    """Prompt text, tokens and positive map of a record (numpy, for tf.numpy_function),
    with glipjax.data.prompts and glipjax.data.tokenizer.

    Prompts: "caption" packs negatives from other captions around the record's caption;
    "detection" builds the reference's shuffled class prompt with sampled negatives
    (boxes of classes cut off by the token budget are dropped); "fixed" uses every
    class in order. Boxes whose spans map to no token are dropped as well.
    """

    def __init__(self, tokenizer_name: str | None, max_len: int, full_negative_prob: float):
        if not 0.0 <= full_negative_prob <= 1.0:
            raise ValueError(f"data.full_negative_prob must be in [0, 1], got {full_negative_prob}")
        self.tokenizer = tokenizer.load_tokenizer(tokenizer_name)
        self.max_len = int(max_len)
        self.full_negative_prob = float(full_negative_prob)

    def bind(self, prompt: str, class_names: Sequence[str]) -> Callable[..., tuple[np.ndarray, ...]]:
        """The numpy function (caption, categories, span_values, span_lengths,
        negatives, seed) -> (input_ids, attention_mask, positive_map of the kept boxes,
        kept box indices, number of boxes dropped)."""
        if prompt not in PROMPTS:
            raise ValueError(f"Unknown prompt {prompt!r}; choose one of {PROMPTS}.")
        names = tuple(class_names)
        index = {n: i for i, n in enumerate(names)}
        fixed = prompts.class_prompt(names) if prompt == "fixed" else None

        def encode(caption, categories, span_values, span_lengths, negatives, seed):
            rng = np.random.default_rng(np.asarray(seed, np.int64).view(np.uint64))
            count = len(categories)
            if prompt in ("detection", "fixed"):
                unknown = [c.decode() for c in categories if c.decode() not in index]
                if unknown:
                    raise ValueError(f"categories {unknown[:3]} are not in the source's class names")
                labels = [index[c.decode()] for c in categories]
            if prompt == "caption":
                box_spans = np.split(span_values, np.cumsum(span_lengths)[:-1]) if count else []
                own = caption.decode()
                others = [n for n in negatives if n and n.decode() != own]
                text, box_spans = prompts.add_caption_negatives(
                    caption, box_spans, others, rng, self.tokenizer, self.max_len)
            elif prompt == "detection":
                text, box_spans, _ = prompts.detection_to_grounding(
                    labels, names, rng, self.tokenizer, self.max_len,
                    full_negative_prob=self.full_negative_prob)
            else:
                text, spans = fixed
                box_spans = [[spans[label]] for label in labels]
            input_ids, attention_mask, encoding = tokenizer.encode(self.tokenizer, text, self.max_len)
            pmap, mapped = prompts.positive_map(encoding, box_spans, self.max_len)
            kept = np.flatnonzero(mapped).astype(np.int32)
            return input_ids, attention_mask, pmap[kept], kept, np.int32(count - len(kept))

        return encode


_OPENERS: dict[str, Callable[..., Source]] = {"shapes": _shapes_source, **{k: _built_source for k in _DEFAULT_PROMPTS}}
