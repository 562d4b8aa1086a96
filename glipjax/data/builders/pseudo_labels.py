"""Pseudo-labelled image-caption records (JSONL, one record per image, the fields of
the reference's caption data) -> the common record schema
(glipjax.data.builders.common).

A record: "file_name" (or "image"): the image path, relative to `images` (by default
the JSONL file's directory); "caption"; "bboxes": absolute xyxy boxes; "scores";
"tokens_positive": character spans into the caption; optional "img_w"/"img_h", the
image size the boxes were predicted for (boxes are scaled to the file's size when it
differs, as the reference's resize does); optional "image_id". Two layouts, told apart
by the scores:
  v1 (per box):    bboxes[box], scores[box], tokens_positive[box] = [[start, end], ...]
  v2 (per entity): bboxes[entity][box], scores[entity][box],
                   tokens_positive[entity] = [[start, end], ...] shared by its boxes

Options (the reference's defaults; screening is off by default):
  screen           keep boxes with score > score_threshold, then NMS
  score_threshold  0.9
  nms_threshold    0.9; NMS suppresses boxes overlapping a higher-scored kept box with
                   IoU > nms_threshold; <= 0 turns NMS off
  min_boxes        1; a record left with fewer boxes is skipped (too_few_boxes)
Each box keeps its score; category is "".
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np

from glipjax.data.builders import common

Candidate = tuple[np.ndarray, float, Any]  # raw xyxy box (float64), score, raw spans


def flatten(record: Mapping[str, Any]) -> list[tuple[Any, Any, Any]]:
    """(raw box, raw score, raw spans) per box of a v1 or v2 record; missing entries are
    None. Raises TypeError/KeyError when bboxes or scores is not a list."""
    bboxes, scores, spans = record["bboxes"], record["scores"], record.get("tokens_positive")
    if not isinstance(bboxes, list) or not isinstance(scores, list):
        raise TypeError("bboxes and scores must be lists")
    spans = spans if isinstance(spans, list) else []

    def at(items: Any, i: int) -> Any:
        return items[i] if isinstance(items, list) and i < len(items) else None

    if not any(isinstance(s, list) for s in scores):  # v1
        return [(box, at(scores, i), at(spans, i)) for i, box in enumerate(bboxes)]
    out = []
    for e, entity in enumerate(bboxes):
        if not isinstance(entity, list):
            out.append((entity, None, None))
            continue
        out.extend((box, at(at(scores, e), j), at(spans, e)) for j, box in enumerate(entity))
    return out


def count_boxes(record: Any) -> int:
    """The number of raw boxes `flatten` finds in a record (0 when it cannot)."""
    try:
        return len(flatten(record))
    except (TypeError, KeyError, AttributeError):
        return 0


def nms_keep(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS over xyxy boxes (IoU of areas (x2 - x1) * (y2 - y1)): which boxes
    survive, suppressing any with IoU > threshold against a higher-scored survivor."""
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep = np.zeros(len(boxes), bool)
    suppressed = np.zeros(len(boxes), bool)
    for i in np.argsort(-scores, kind="stable"):
        if suppressed[i]:
            continue
        keep[i] = True
        w = np.maximum(np.minimum(x2, x2[i]) - np.maximum(x1, x1[i]), 0)
        h = np.maximum(np.minimum(y2, y2[i]) - np.maximum(y1, y1[i]), 0)
        inter = w * h
        union = areas + areas[i] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        suppressed |= iou > threshold
    return keep


class PseudoLabels(common.SourceBuilder):
    """Pseudo-labelled image-caption records (v1 per box or v2 per entity)."""

    name = "pseudo_labels"
    KIND = "pseudo_labels"
    PATHS: ClassVar[Mapping[str, bool]] = {"annotations": True, "images": False}
    OPTIONS: ClassVar[Mapping[str, Any]] = {
        "screen": False,
        "score_threshold": 0.9,
        "nms_threshold": 0.9,
        "min_boxes": 1,
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        opts = super().check_options(options)
        if not isinstance(opts["screen"], bool):
            raise ValueError(f"pseudo_labels: screen must be a bool, got {opts['screen']!r}.")
        for key in ("score_threshold", "nms_threshold"):
            value = opts[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value <= 1:
                raise ValueError(f"pseudo_labels: {key} must be a number <= 1, got {value!r}.")
            opts[key] = float(value)
        if isinstance(opts["min_boxes"], bool) or not isinstance(opts["min_boxes"], int) or opts["min_boxes"] < 0:
            raise ValueError(f"pseudo_labels: min_boxes must be an int >= 0, got {opts['min_boxes']!r}.")
        return opts

    def _records(self, counter: common.DropCounter, extra: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
        for raw in common.read_jsonl(self.paths["annotations"]):
            yield common.record_or_skip(counter, count_boxes(raw), functools.partial(self._record, raw=raw))

    def _record(self, counter: common.DropCounter, raw: Any) -> dict[str, Any]:
        if isinstance(raw, common.Reject):
            raise raw
        if not isinstance(raw, dict):
            raise common.Reject("malformed_record")
        opts = self.options
        caption = common.clean_caption(raw.get("caption"))
        name = raw.get("file_name", raw.get("image"))
        checked = self.read_image(common.image_path(name, self.images_dir))
        image_id = common.record_id(raw.get("image_id", name))
        scale = self._scale(raw, checked, counter)

        candidates: list[Candidate] = []
        for box, score, spans in flatten(raw):
            try:
                if not isinstance(box, list) or len(box) != 4:
                    raise common.Reject("malformed")
                values = np.asarray([common.number(v) for v in box], np.float64) * np.tile(scale, 2)
                candidates.append((values, common.number(score), spans))
            except common.Reject as e:
                counter.drop("boxes", e.reason)
        if opts["screen"]:
            candidates = self._screen(candidates, counter)

        def parse(candidate: Candidate) -> tuple[np.ndarray, str, np.ndarray, float]:
            values, score, raw_spans = candidate
            box, clipped = common.clean_box(values.tolist(), "xyxy", checked.width, checked.height)
            spans = common.clean_spans(raw_spans, caption, counter)
            if not len(spans):
                raise common.Reject("no_span")
            counter.repaired["clipped"] += int(clipped)
            counter.repaired["rescaled"] += int(bool((scale != 1).any()))
            return box, "", spans, score

        boxes = common.collect_boxes(candidates, parse, counter)
        if len(boxes) < opts["min_boxes"]:
            raise common.Reject("too_few_boxes")
        return common.example(checked, image_id, caption, boxes, counter)

    def _scale(self, raw: Mapping[str, Any], image: common.CheckedImage, counter: common.DropCounter) -> np.ndarray:
        """(sx, sy) from the record's img_w/img_h to the file's size ((1, 1) without
        them); a non-positive or non-numeric size makes the record malformed."""
        if "img_w" not in raw or "img_h" not in raw:
            return np.ones(2)
        try:
            width, height = common.number(raw["img_w"]), common.number(raw["img_h"])
        except common.Reject as e:
            raise common.Reject("malformed_record") from e
        if width <= 0 or height <= 0:
            raise common.Reject("malformed_record")
        common.note_size(counter, image, raw, ("img_w", "img_h"))
        return np.asarray([image.width / width, image.height / height])

    def _screen(self, candidates: list[Candidate], counter: common.DropCounter) -> list[Candidate]:
        """The reference's further screening: score > threshold, then NMS."""
        opts = self.options
        kept = [c for c in candidates if c[1] > opts["score_threshold"]]
        counter.drop("boxes", "low_score", len(candidates) - len(kept))
        if opts["nms_threshold"] > 0 and kept:
            survive = nms_keep(np.stack([c[0] for c in kept]), np.asarray([c[1] for c in kept]), opts["nms_threshold"])
            counter.drop("boxes", "nms", int((~survive).sum()))
            kept = [c for c, s in zip(kept, survive) if s]
        return kept
