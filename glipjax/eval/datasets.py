"""Running a GLIP model over an evaluation set: COCO-format detection (COCO, LVIS,
ODinW, a user's own) and MDETR-format grounding (Flickr30k entities).

Data: records come from the set's TFDS builder (glipjax.data.builders), built under
data_dir on first use, and are resized and padded as the trainer's evaluation does
(glipjax.data.transforms, training=False). Ground truth for AP is read from the
annotation JSON itself (crowd regions and unclipped boxes included); Flickr's comes
from the records (boxes with identical spans form a phrase).

Prompts: detection sets use the full class prompt, split into chunks that fit the
text length (and, with classes_per_chunk, hold at most that many classes, as the
reference's 40-class LVIS chunks). Each batch's images are encoded once and each
chunk's text once, the head runs per chunk (glipjax.inference), and the chunks'
detections are merged per image to the best max_detections. Grounding sets ask each
caption for its own phrases, one whole forward pass per batch of queries.

Devices and hosts: every process reads its own contiguous part of the set (the
parts differ by at most one record) and runs it in fixed-size batches on its own
devices (load_run's mesh), each batch split over the mesh's batch axes; the last
batch is padded with blank images whose results are dropped. The per-image results
are gathered to every process (glipjax.eval.hosts.gather); Flickr gathers its hit
counts. Progress lines (images/s, ETA) go to stderr from process 0.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import transformers

from glipjax import sharding
from glipjax.data import transforms
from glipjax.data.builders import coco as coco_builder
from glipjax.data.builders import common
from glipjax.data.prompts import chunk_classes, positive_map
from glipjax.data.tokenizer import encode
from glipjax.eval.coco import coco_box_metrics
from glipjax.eval.flickr import FlickrRecallEvaluator, group_phrases
from glipjax.eval.hosts import Progress, gather, host_bounds
from glipjax.eval.lvis import MAX_PER_IMAGE, TOP_PER_CLASS, LvisEvaluator
from glipjax.inference import PromptChunk, build_prompt_chunks, make_forward
from glipjax.models.glip import GLIP, GLIPConfig, detect
from glipjax.models.postprocess import Detections

SPLIT = "eval"  # the split name the builders write an evaluation set under
MAX_PHRASES = 16  # phrases per grounding query; a caption with more is asked in several queries
PHRASE_BUCKET = 16  # class prompts are padded to a multiple of this many phrases


# ---------------------------------------------------------------------------- model


class Detector:
    """The jitted GLIP forward pass plus post-processing on a process-local mesh.

    Called with host batches of per-row prompts (images (B, H, W, 3), input_ids and
    attention_mask (B, L), positive_map (B, P, L), phrase_mask (B, P), image_sizes
    (B, 2)), it returns Detections as numpy arrays; `detect_chunks` runs a batch of
    images against every chunk of one class prompt. B is fixed (`batch_size`), a
    multiple of the mesh's batch shards."""

    def __init__(self, model: GLIP, glip_config: GLIPConfig, params: Any, mesh: jax.sharding.Mesh,
                 rules: Sequence[Sequence[Any]] = sharding.DEFAULT_RULES, *, batch_size: int,
                 max_detections: int | None = None):
        if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
            raise ValueError("evaluation runs each process on its own devices: give a mesh of jax.local_devices()")
        self.mesh, self.rules, self.params, self.batch_size = mesh, sharding.normalize_rules(rules), params, batch_size
        self.batch_sharding = sharding.batch_sharding(mesh, self.rules)
        shards = math.prod(mesh.shape[a] for a in _axes(self.batch_sharding.spec[0])) if self.batch_sharding.spec else 1
        if batch_size < 1 or batch_size % shards:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of the mesh's {shards} batch shards "
                             f"({dict(mesh.shape)})")
        if max_detections is not None:
            glip_config = dataclasses.replace(
                glip_config, postprocess=dataclasses.replace(glip_config.postprocess, max_detections=max_detections))
        self.glip_config = glip_config
        self.max_detections = glip_config.postprocess.max_detections
        dtype = model.dtype

        def forward(params, images, input_ids, attention_mask, pmap, phrase_mask, image_sizes):
            outputs = model.apply({"params": params}, images.astype(dtype), input_ids, attention_mask)
            return detect(glip_config, outputs, pmap, phrase_mask, image_sizes, images.shape[1:3])

        self._forward = jax.jit(forward, out_shardings=self.batch_sharding)
        self._split = make_forward(model, glip_config)

    def _check_rows(self, *inputs: np.ndarray) -> None:
        if any(len(x) != self.batch_size for x in inputs):
            raise ValueError(f"every input needs {self.batch_size} rows, got {[len(x) for x in inputs]}")

    def __call__(self, images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
                 pmap: np.ndarray, phrase_mask: np.ndarray, image_sizes: np.ndarray) -> Detections:
        batch = (images, input_ids, attention_mask, pmap, phrase_mask, image_sizes)
        self._check_rows(*batch)
        placed = jax.device_put(batch, self.batch_sharding)
        with sharding.sharding_context(self.mesh, self.rules):
            out = self._forward(self.params, *placed)
        return Detections(*(np.asarray(x) for x in jax.device_get(out)))

    def detect_chunks(self, images: np.ndarray, image_sizes: np.ndarray,
                      chunks: Sequence[PromptChunk]) -> list[Detections]:
        """The Detections of each chunk: the images are encoded once, each chunk's text
        once, and the head runs per chunk."""
        self._check_rows(images, image_sizes)
        placed = jax.device_put((images, image_sizes), self.batch_sharding)
        with sharding.sharding_context(self.mesh, self.rules):
            return self._split(self.params, *placed, chunks)


def _axes(target: Any) -> tuple[str, ...]:
    if target is None:
        return ()
    return tuple(target) if isinstance(target, (tuple, list)) else (target,)


# ---------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Where evaluation sets are built and how their images are prepared."""

    data_dir: os.PathLike
    transform: transforms.TransformConfig
    tokenizer: transformers.PreTrainedTokenizerBase
    max_images: int | None = None  # the first N records of a set (before splitting over hosts)
    progress: bool = True


def open_records(kind: str, data: EvalData, annotations: str | os.PathLike, images: str | os.PathLike,
                 ) -> tuple[tf.data.Dataset, dict[str, Any], list[int]]:
    """This process's records of a local set (built first if needed), the set's
    metadata and every process's record count."""
    if not annotations or not images:
        raise ValueError(f"{kind} evaluation needs both an annotations file and an images directory "
                         f"(got {str(annotations)!r}, {str(images)!r})")
    builder = common.build_source(kind, data.data_dir, split=SPLIT, annotations=annotations, images=images)
    total = builder.info.splits[SPLIT].num_examples
    if data.max_images is not None:
        total = min(total, data.max_images)
    count = jax.process_count()
    sizes = [end - start for start, end in (host_bounds(total, p, count) for p in range(count))]
    start, end = host_bounds(total)
    ds = builder.as_dataset(split=f"{SPLIT}[{start}:{end}]", shuffle_files=False)
    return ds, common.source_metadata(builder), sizes


def _examples(ds: tf.data.Dataset, tcfg: transforms.TransformConfig) -> tf.data.Dataset:
    """Records -> the eval-transformed image, its size before and after resizing, and
    the record's caption, boxes (+1 xyxy, original pixels) and flattened spans."""

    def prepare(record):
        image = record["image"]
        out = transforms.transform(image, tf.zeros([0, 4]), {}, tf.zeros([2], tf.int64), tcfg, training=False)
        spans = record["objects"]["spans"]
        if not isinstance(spans, tf.RaggedTensor):
            spans = tf.RaggedTensor.from_tensor(spans)
        return {
            "image": out["image"], "image_size": out["image_size"], "original_size": tf.shape(image)[:2],
            "image_id": record["image_id"], "caption": record["caption"],
            "boxes": tf.reshape(record["objects"]["bbox"], [-1, 4]),
            "span_values": tf.reshape(tf.cast(spans.flat_values, tf.int32), [-1, 2]),
            "span_lengths": tf.cast(spans.row_lengths(), tf.int32),
        }

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def pad_rows(rows: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Stacks rows and pads to `size` by repeating the last (a valid blank input)."""
    stacked = np.stack(rows)
    return np.concatenate([stacked, np.repeat(stacked[-1:], size - len(rows), axis=0)]) if len(rows) < size else stacked


def _to_original(boxes: np.ndarray, example: dict[str, Any]) -> np.ndarray:
    """Boxes in resized-input pixels -> the original image's pixels."""
    (rh, rw), (oh, ow) = example["image_size"], example["original_size"]
    return boxes * np.asarray([ow / rw, oh / rh, ow / rw, oh / rh], np.float32)


# ---------------------------------------------------------------------------- detection sets


def class_chunks(names: Sequence[str], category_ids: Sequence[int], tokenizer: transformers.PreTrainedTokenizerBase,
                 text_len: int, classes_per_chunk: int = 0) -> list[PromptChunk]:
    """The class prompt in chunks that fit text_len tokens and, when classes_per_chunk
    > 0, hold at most that many classes. Every chunk is padded to the same number of
    phrases, a multiple of PHRASE_BUCKET, so sets of similar size share one compiled
    forward pass."""
    step = classes_per_chunk if classes_per_chunk > 0 else len(names)
    groups: list[list[int]] = []
    for start in range(0, len(names), step):
        run = list(range(start, min(start + step, len(names))))
        groups += [[run[i] for i in g] for g in chunk_classes([names[i] for i in run], tokenizer, text_len)]
    width = -(-max(len(g) for g in groups) // PHRASE_BUCKET) * PHRASE_BUCKET
    return [chunk for g in groups for chunk in build_prompt_chunks(
        [names[i] for i in g], [category_ids[i] for i in g], tokenizer, text_len, num_phrases=width)]


@dataclasses.dataclass(frozen=True)
class Detected:
    """Per-image detections in original-image pixels, padded to max_detections:
    boxes (N, D, 4) +1 xyxy, scores (N, D), labels (N, D) category ids, valid (N, D)."""

    image_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    valid: np.ndarray

    def per_image(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        for i, image_id in enumerate(self.image_ids):
            keep = self.valid[i]
            yield int(image_id), self.boxes[i][keep], self.scores[i][keep], self.labels[i][keep]


def detect_set(detector: Detector, data: EvalData, chunks: Sequence[PromptChunk], ds: tf.data.Dataset,
               sizes: Sequence[int], name: str) -> Detected:
    """Runs every chunk on this process's records and gathers every process's merged
    detections (the best detector.max_detections per image)."""
    if not chunks:
        raise ValueError("no prompt chunks")
    batch_size, keep = detector.batch_size, detector.max_detections
    local = sizes[jax.process_index()]
    ids = np.zeros(local, np.int64)
    boxes, scores = np.zeros((local, keep, 4), np.float32), np.zeros((local, keep), np.float32)
    labels, valid = np.zeros((local, keep), np.int64), np.zeros((local, keep), bool)
    progress = Progress(f"eval {name}", sum(sizes), data.progress)
    row = 0
    for batch in batches(tfds.as_numpy(_examples(ds, data.transform)), batch_size):
        images = pad_rows([e["image"] for e in batch], batch_size)
        image_sizes = pad_rows([e["image_size"].astype(np.int32) for e in batch], batch_size)
        per_chunk = [(dets.boxes, dets.scores, chunk.category_ids[np.maximum(dets.labels - 1, 0)], dets.valid)
                     for chunk, dets in zip(chunks, detector.detect_chunks(images, image_sizes, chunks))]
        all_boxes, all_scores, all_labels, all_valid = (np.concatenate(x, axis=1) for x in zip(*per_chunk))
        order = np.argsort(-np.where(all_valid, all_scores, -np.inf), axis=1, kind="stable")[:, :keep]
        for b, example in enumerate(batch):
            top = order[b]
            ids[row] = example["image_id"]
            boxes[row, : len(top)] = _to_original(all_boxes[b, top], example)
            scores[row, : len(top)], labels[row, : len(top)] = all_scores[b, top], all_labels[b, top]
            valid[row, : len(top)] = all_valid[b, top]
            row += 1
        progress.update(len(batch))
    if row != local:
        raise RuntimeError(f"{name}: read {row} records, expected {local}")
    return Detected(*gather((ids, boxes, scores, labels, valid), local, sizes))


def read_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """A COCO-format annotation JSON for pycocotools: images, annotations (with
    iscrowd and area filled in where missing) and categories."""
    images, annotations, categories = coco_builder.read_coco_json(pathlib.Path(path))
    annotations = [dict({"iscrowd": 0, "area": float(a["bbox"][2]) * float(a["bbox"][3])}, **a) for a in annotations]
    return {"images": images, "annotations": annotations, "categories": categories}


def _image_ids(ground_truth: dict[str, Any]) -> dict[int, Any]:
    """The records' int64 image_id -> the JSON's own image id."""
    return {common.record_id(im["id"]): im["id"] for im in ground_truth["images"]}


def _prompt_names(categories: Sequence[dict[str, Any]], names: Sequence[str] = ()) -> tuple[list[str], list[int]]:
    """(prompt names, category ids) in category-id order; `names` replaces the
    categories' own names (same order and length)."""
    ordered = sorted(categories, key=lambda c: c["id"])
    if names and len(names) != len(ordered):
        raise ValueError(f"{len(names)} prompt names for {len(ordered)} categories")
    return list(names) if names else [c["name"] for c in ordered], [int(c["id"]) for c in ordered]


def evaluate_coco(detector: Detector, data: EvalData, annotations: str | os.PathLike, images: str | os.PathLike, *,
                  class_names: Sequence[str] = (), classes_per_chunk: int = 0, name: str = "coco") -> dict[str, Any]:
    """COCO box AP (glipjax.eval.coco.STAT_NAMES) of a COCO-format set over the
    images evaluated, plus num_images, num_chunks and dropped (what the builder's
    bad-data rules skipped, {"group/reason": n}). class_names replaces the
    categories' names in the prompt (in category-id order)."""
    gt = read_ground_truth(annotations)
    prompt, category_ids = _prompt_names(gt["categories"], class_names)
    chunks = class_chunks(prompt, category_ids, data.tokenizer, detector.glip_config.max_text_len, classes_per_chunk)
    ds, meta, sizes = open_records("coco", data, annotations, images)
    found = detect_set(detector, data, chunks, ds, sizes, name)
    to_json = _image_ids(gt)
    evaluated = {to_json[int(i)] for i in found.image_ids}
    detections = [
        {"image_id": to_json[image_id], "category_id": int(label), "bbox": [float(v) for v in box],
         "score": float(score)}
        for image_id, boxes, scores, labels in found.per_image()
        for box, score, label in zip(_xywh(boxes), scores, labels)
    ]
    subset = dict(gt, images=[im for im in gt["images"] if im["id"] in evaluated],
                  annotations=[a for a in gt["annotations"] if a["image_id"] in evaluated])
    report: dict[str, Any] = coco_box_metrics(subset, detections)
    report.update(num_images=len(evaluated), num_chunks=len(chunks), dropped=meta["drops"])
    return report


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2] + 1.0], axis=1)


def evaluate_lvis(detector: Detector, data: EvalData, annotations: str | os.PathLike, images: str | os.PathLike, *,
                  classes_per_chunk: int = 40, top_per_class: int = TOP_PER_CLASS) -> dict[str, Any]:
    """LVIS fixed AP (glipjax.eval.lvis) over the images evaluated; the detector
    should keep lvis.MAX_PER_IMAGE boxes per image. Adds num_chunks and dropped."""
    gt = read_ground_truth(annotations)
    evaluator = LvisEvaluator(gt, max_per_image=MAX_PER_IMAGE, top_per_class=top_per_class)
    prompt, category_ids = _prompt_names(gt["categories"])
    chunks = class_chunks(prompt, category_ids, data.tokenizer, detector.glip_config.max_text_len, classes_per_chunk)
    ds, meta, sizes = open_records("coco", data, annotations, images)
    found = detect_set(detector, data, chunks, ds, sizes, "lvis")
    to_json = _image_ids(gt)
    for image_id, boxes, scores, labels in found.per_image():
        evaluator.add_image(to_json[image_id], boxes, scores, labels)
    report: dict[str, Any] = evaluator.result()
    report.update(num_chunks=len(chunks), dropped=meta["drops"])
    return report


# ---------------------------------------------------------------------------- grounding sets


def _queries(example: dict[str, Any], tokenizer: transformers.PreTrainedTokenizerBase, text_len: int,
             max_phrases: int) -> Iterator[dict[str, Any]]:
    """The grounding queries of one record: its caption with up to max_phrases of its
    phrases each, and each phrase's ground-truth boxes."""
    starts = np.concatenate([[0], np.cumsum(example["span_lengths"])])
    spans = [example["span_values"][a:b] for a, b in zip(starts[:-1], starts[1:])]
    phrases = group_phrases(spans)
    if not phrases:
        return
    input_ids, attention_mask, encoding = encode(tokenizer, example["caption"], text_len)
    for first in range(0, len(phrases), max_phrases):
        group = phrases[first: first + max_phrases]
        pmap = np.zeros((max_phrases, text_len), np.float32)
        mask = np.zeros(max_phrases, bool)
        pmap[: len(group)], mask[: len(group)] = positive_map(encoding, [s for s, _ in group], text_len)
        yield {"example": example, "input_ids": input_ids, "attention_mask": attention_mask, "positive_map": pmap,
               "phrase_mask": mask, "gt": [example["boxes"][idx] for _, idx in group]}


# A grounding query's model inputs, in the Detector's argument order.
_QUERY_INPUTS = (
    lambda q: q["example"]["image"], lambda q: q["input_ids"], lambda q: q["attention_mask"],
    lambda q: q["positive_map"], lambda q: q["phrase_mask"], lambda q: q["example"]["image_size"].astype(np.int32),
)


def evaluate_flickr(detector: Detector, data: EvalData, annotations: str | os.PathLike, images: str | os.PathLike,
                    *, max_phrases: int = MAX_PHRASES) -> dict[str, Any]:
    """Flickr30k entities Recall@1/5/10 (any-box and merged-box, glipjax.eval.flickr)
    of an MDETR-format set (one record per caption), plus num_records and dropped. A phrase is
    the boxes sharing the same spans; its predictions are the boxes labelled with it."""
    ds, meta, sizes = open_records("mdetr", data, annotations, images)
    text_len = detector.glip_config.max_text_len
    evaluator = FlickrRecallEvaluator()
    progress = Progress("eval flickr", sum(sizes), data.progress, unit="captions")

    def queries():
        for example in tfds.as_numpy(_examples(ds, data.transform)):
            yield from _queries(example, data.tokenizer, text_len, max_phrases)
            progress.update(1)

    for batch in batches(queries(), detector.batch_size):
        dets = detector(*(pad_rows([get(q) for q in batch], detector.batch_size) for get in _QUERY_INPUTS))
        for b, query in enumerate(batch):
            boxes = _to_original(dets.boxes[b], query["example"])
            for p, gt in enumerate(query["gt"]):
                mine = dets.valid[b] & (dets.labels[b] == p + 1)
                evaluator.add_phrase(gt, boxes[mine], dets.scores[b][mine])
    counts = gather(evaluator.counts[None], 1, [1] * jax.process_count())
    total = FlickrRecallEvaluator()
    for row in counts:
        total.add_counts(row)
    report: dict[str, Any] = total.result()
    report.update(num_records=sum(sizes), dropped=meta["drops"])
    return report
