"""COCO box AP with pycocotools, from ground truth and detections held in memory.

Boxes come in the reference's "+1" xyxy convention (a box covers pixel columns
x1..x2 inclusive) and become COCO xywh with w = x2 - x1 + 1, h = y2 - y1 + 1, for
ground truth and detections alike. pycocotools' console output is captured.
Figures that COCO leaves undefined (-1: no ground truth in that category or area
range) are returned as NaN.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The order of COCOeval.stats for boxes.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) +1-convention xyxy -> COCO xywh (width x2 - x1 + 1, height y2 - y1 + 1)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2] + 1.0], axis=1)


def _check(name: str, boxes: np.ndarray, *per_box: np.ndarray) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: boxes must be (N, 4) xyxy, got shape {boxes.shape}")
    if any(len(v) != len(boxes) for v in per_box):
        raise ValueError(f"{name}: every per-box array needs {len(boxes)} rows")
    if len(boxes) and np.any(boxes[:, 2:] < boxes[:, :2] - 1.0):
        raise ValueError(f"{name}: boxes need x2 >= x1 - 1 and y2 >= y1 - 1 (+1-convention xyxy)")


class CocoBoxEvaluator:
    """Collects ground truth and detections image by image; `result()` runs COCOeval.

    categories: the category ids (or (id, name) pairs) of the dataset; ground truth or
    detections with other ids raise ValueError.
    """

    def __init__(self, categories: Sequence[int] | Sequence[tuple[int, str]]):
        pairs = [c if isinstance(c, tuple) else (int(c), str(c)) for c in categories]
        if not pairs:
            raise ValueError("categories is empty")
        self.categories = [{"id": int(i), "name": str(n)} for i, n in pairs]
        self._category_ids = {c["id"] for c in self.categories}
        if len(self._category_ids) != len(pairs):
            raise ValueError("category ids must be distinct")
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []
        self._image_ids: set[int] = set()

    def _check_labels(self, name: str, labels: np.ndarray) -> None:
        unknown = sorted(set(int(v) for v in labels) - self._category_ids)
        if unknown:
            raise ValueError(f"{name}: unknown category ids {unknown[:10]}")

    def add_image(
        self,
        image_id: int,
        gt_boxes: np.ndarray,
        gt_labels: np.ndarray,
        det_boxes: np.ndarray,
        det_scores: np.ndarray,
        det_labels: np.ndarray,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        """One image's ground truth (boxes (G, 4) +1 xyxy, category ids (G,)) and
        detections (boxes (D, 4), scores (D,), category ids (D,))."""
        image_id = int(image_id)
        if image_id in self._image_ids:
            raise ValueError(f"image {image_id} was added twice")
        gt_boxes, gt_labels = np.asarray(gt_boxes, np.float64).reshape(-1, 4), np.asarray(gt_labels).reshape(-1)
        det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
        det_scores, det_labels = np.asarray(det_scores).reshape(-1), np.asarray(det_labels).reshape(-1)
        _check(f"image {image_id} ground truth", gt_boxes, gt_labels)
        _check(f"image {image_id} detections", det_boxes, det_scores, det_labels)
        self._check_labels(f"image {image_id} ground truth", gt_labels)
        self._check_labels(f"image {image_id} detections", det_labels)
        self._image_ids.add(image_id)
        image = {"id": image_id}
        if height is not None and width is not None:
            image.update(height=int(height), width=int(width))
        self.images.append(image)
        for box, label in zip(xyxy_to_xywh(gt_boxes), gt_labels):
            self.annotations.append({
                "id": len(self.annotations) + 1, "image_id": image_id, "category_id": int(label),
                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0,
            })
        for box, score, label in zip(xyxy_to_xywh(det_boxes), det_scores, det_labels):
            self.detections.append({
                "image_id": image_id, "category_id": int(label),
                "bbox": [float(v) for v in box], "score": float(score),
            })

    def ground_truth_json(self) -> dict[str, Any]:
        """The ground truth as a COCO annotation dict (images, annotations, categories)."""
        return {"images": list(self.images), "annotations": list(self.annotations),
                "categories": list(self.categories)}

    def result(self, category_ids: Sequence[int] | None = None, per_category: bool = False) -> dict[str, float]:
        """COCO box metrics (STAT_NAMES) over `category_ids` (default: all); with
        per_category, also "AP/<name>" for each category with ground truth."""
        return coco_box_metrics(self.ground_truth_json(), self.detections, category_ids, per_category)


def coco_box_metrics(
    ground_truth: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    category_ids: Sequence[int] | None = None,
    per_category: bool = False,
) -> dict[str, float]:
    """COCOeval box metrics for a COCO ground-truth dict and a list of COCO result
    dicts (xywh boxes). Returns STAT_NAMES -> value (NaN where undefined), plus
    "AP/<category name>" per category when per_category."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {k: list(v) for k, v in ground_truth.items()}
        gt.createIndex()
        if detections:
            dt = gt.loadRes([dict(d) for d in detections])
        else:  # loadRes cannot take an empty list
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                          "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if category_ids is not None:
            evaluator.params.catIds = sorted(int(c) for c in category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    out = {name: _defined(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
    if per_category:
        # precision: (iou thresholds, recall points, categories, area ranges, max dets)
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        for k, cat_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, k]
            values = values[values > -1]
            if values.size:
                out[f"AP/{gt.cats[cat_id]['name']}"] = float(values.mean())
    return out


def _defined(value: float) -> float:
    return float("nan") if value < 0 else float(value)
