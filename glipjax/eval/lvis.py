"""LVIS box AP with the fixed-AP protocol (Dave et al. 2021, as MDETR and GLIP report it).

Protocol:
  - at most `max_per_image` (300) detections per image, the best by score;
  - no per-image limit at evaluation, but at most `top_per_class` (10,000)
    detections per category over the whole evaluated set, the best by score;
  - the LVIS federated rules: a detection of category c on image i counts only when
    c is annotated on i (has a box there) or is in i's neg_category_ids; unmatched
    detections of a category in i's not_exhaustive_category_ids are ignored;
  - AP over IoU 0.50:0.95 and 101 recall points (pycocotools' matching and
    interpolation, as the lvis package), plus APr / APc / APf over the categories of
    each frequency group ("r", "c", "f" in the categories' "frequency" field).

The lvis package itself does not run on NumPy 2 (it uses np.float), so this is
pycocotools' COCOeval with the federated filtering added. Ground truth comes from the
LVIS JSON as it is (xywh boxes, the annotations' own "area"); detections come in the
"+1" xyxy convention and become xywh with w = x2 - x1 + 1 (glipjax.eval.coco).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Mapping

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from glipjax.eval.coco import _check, xyxy_to_xywh

MAX_PER_IMAGE = 300
TOP_PER_CLASS = 10_000
FREQUENCIES = ("r", "c", "f")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


class _FederatedEval(COCOeval):
    """COCOeval whose unmatched detections of a not-exhaustively annotated category
    (per image) are ignored instead of counted as false positives."""

    def __init__(self, gt: COCO, dt: COCO, not_exhaustive: Mapping[int, set[int]]):
        super().__init__(gt, dt, iouType="bbox")
        self.not_exhaustive = not_exhaustive

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802 (pycocotools' name)
        out = super().evaluateImg(imgId, catId, aRng, maxDet)
        if out is not None and catId in self.not_exhaustive.get(imgId, ()):
            out["dtIgnore"] = np.logical_or(out["dtIgnore"], out["dtMatches"] == 0)
        return out


def top_per_class(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the detections kept when each category keeps its k best scores
    (ties broken by position), in input order."""
    labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores).reshape(-1)
    order = np.lexsort((np.arange(len(labels)), -scores, labels))  # by label, then best score first
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - starts
    return np.sort(order[rank < k])


class LvisEvaluator:
    """Collects detections image by image against an LVIS annotation dict (or file);
    `result()` applies the per-class cap and the federated rules and returns METRICS
    (NaN where a figure has no ground truth), num_images and num_detections. Only the
    images added are evaluated."""

    def __init__(
        self,
        ground_truth: Mapping[str, Any] | str | os.PathLike,
        *,
        max_per_image: int = MAX_PER_IMAGE,
        top_per_class: int = TOP_PER_CLASS,
    ):
        if not isinstance(ground_truth, Mapping):
            with open(ground_truth, encoding="utf-8") as f:
                ground_truth = json.load(f)
        missing = [k for k in ("images", "annotations", "categories") if k not in ground_truth]
        if missing:
            raise ValueError(f"LVIS ground truth lacks {missing}")
        if max_per_image < 1 or top_per_class < 1:
            raise ValueError(f"max_per_image ({max_per_image}) and top_per_class ({top_per_class}) must be >= 1")
        self.max_per_image, self.top_per_class = max_per_image, top_per_class
        self.images = {int(im["id"]): im for im in ground_truth["images"]}
        self.categories = list(ground_truth["categories"])
        bad = [c.get("id") for c in self.categories if c.get("frequency") not in FREQUENCIES]
        if bad:
            raise ValueError(f"LVIS categories need a frequency in {FREQUENCIES}; not so for ids {bad[:10]}")
        self.category_ids = {int(c["id"]) for c in self.categories}
        self.annotations = list(ground_truth["annotations"])
        self._positives: dict[int, set[int]] = {}
        for ann in self.annotations:
            self._positives.setdefault(int(ann["image_id"]), set()).add(int(ann["category_id"]))
        self._ids: list[np.ndarray] = []
        self._boxes: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._added: set[int] = set()

    def add_image(self, image_id: int, det_boxes: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray) -> None:
        """One image's detections: boxes (D, 4) +1 xyxy, scores (D,), category ids (D,);
        the best max_per_image by score are kept."""
        image_id = int(image_id)
        if image_id not in self.images:
            raise ValueError(f"image {image_id} is not in the LVIS ground truth")
        if image_id in self._added:
            raise ValueError(f"image {image_id} was added twice")
        boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
        scores, labels = np.asarray(det_scores, np.float64).reshape(-1), np.asarray(det_labels).reshape(-1)
        _check(f"image {image_id} detections", boxes, scores, labels)
        unknown = sorted(set(labels.tolist()) - self.category_ids)
        if unknown:
            raise ValueError(f"image {image_id} detections: unknown category ids {unknown[:10]}")
        keep = np.argsort(-scores, kind="stable")[: self.max_per_image]
        self._added.add(image_id)
        self._ids.append(np.full(len(keep), image_id, np.int64))
        self._boxes.append(boxes[keep])
        self._scores.append(scores[keep])
        self._labels.append(labels[keep].astype(np.int64))

    def _detections(self) -> list[dict[str, Any]]:
        """The capped detections that the federated rules let count, as COCO results."""
        ids, boxes = np.concatenate(self._ids), np.concatenate(self._boxes)
        scores, labels = np.concatenate(self._scores), np.concatenate(self._labels)
        keep = top_per_class(labels, scores, self.top_per_class)
        out = []
        for i in keep:
            image_id, label = int(ids[i]), int(labels[i])
            image = self.images[image_id]
            if label not in self._positives.get(image_id, ()) and label not in image.get("neg_category_ids", ()):
                continue
            out.append({"image_id": image_id, "category_id": label, "score": float(scores[i]),
                        "bbox": [float(v) for v in xyxy_to_xywh(boxes[i])[0]]})
        return out

    def result(self) -> dict[str, float | int]:
        if not self._added:
            raise ValueError("no images were added")
        images = [self.images[i] for i in sorted(self._added)]
        annotations = [
            dict(a, id=k + 1, iscrowd=0, ignore=0)  # fresh ids from 1: pycocotools reads id 0 as "unmatched"
            for k, a in enumerate(x for x in self.annotations if int(x["image_id"]) in self._added)
        ]
        detections = self._detections()
        not_exhaustive = {i: {int(c) for c in self.images[i].get("not_exhaustive_category_ids", ())}
                          for i in self._added}
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": images, "annotations": annotations, "categories": self.categories}
            gt.createIndex()
            dt = gt.loadRes(detections) if detections else _empty_results(gt)
            evaluator = _FederatedEval(gt, dt, not_exhaustive)
            evaluator.params.imgIds = sorted(self._added)
            evaluator.params.catIds = sorted(self.category_ids)
            evaluator.params.maxDets = [max(1, len(detections))]  # no per-image limit
            evaluator.evaluate()
            evaluator.accumulate()
        # precision: (IoU thresholds, recall points, categories, area ranges, max dets)
        precision = evaluator.eval["precision"][..., 0]
        cat_index = {c: k for k, c in enumerate(evaluator.params.catIds)}
        groups = {f: [cat_index[int(c["id"])] for c in self.categories if c["frequency"] == f] for f in FREQUENCIES}
        out = {
            "AP": _mean(precision[:, :, :, 0]),
            "AP50": _mean(precision[0, :, :, 0]),
            "AP75": _mean(precision[5, :, :, 0]),
            "APs": _mean(precision[:, :, :, 1]),
            "APm": _mean(precision[:, :, :, 2]),
            "APl": _mean(precision[:, :, :, 3]),
        }
        for f in FREQUENCIES:
            out[f"AP{f}"] = _mean(precision[:, :, groups[f], 0])
        out["num_images"] = len(self._added)
        out["num_detections"] = len(detections)
        return out


def _empty_results(gt: COCO) -> COCO:
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                  "annotations": []}
    dt.createIndex()
    return dt


def _mean(values: np.ndarray) -> float:
    """Mean over the defined (> -1) entries; NaN when there are none."""
    values = values[values > -1]
    return float(values.mean()) if values.size else float("nan")
