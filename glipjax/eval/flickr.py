"""Flickr30k entities phrase grounding: Recall@K (K = 1, 5, 10) at IoU >= 0.5.

Each phrase of a caption is a query. Its predicted boxes are ranked by score; the
phrase is a hit at K when one of its K best boxes matches its ground truth:
  any_box     IoU >= 0.5 with any one of the phrase's ground-truth boxes (the
              "separate GT" protocol of MDETR and GLIP);
  merged_box  IoU >= 0.5 with the union box enclosing all of its ground-truth
              boxes (the "merged GT" protocol).
A phrase with fewer than K predictions is judged on those it has; one with none is
a miss. Recall@K is hits / phrases over the whole set. Boxes are "+1" xyxy (a box
covers columns x1..x2), as everywhere in glipjax. NumPy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KS = (1, 5, 10)
IOU_THRESHOLD = 0.5
PROTOCOLS = ("any_box", "merged_box")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) +1-convention xyxy boxes -> (N, M) IoU."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt + 1.0, 0.0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2] + 1.0, axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2] + 1.0, axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def union_box(boxes: np.ndarray) -> np.ndarray:
    """The (1, 4) box enclosing all of `boxes` (N, 4)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2].min(0), boxes[:, 2:].max(0)])[None]


def group_phrases(spans_per_box: Sequence[np.ndarray]) -> list[tuple[np.ndarray, list[int]]]:
    """The phrases of a grounding record: boxes whose character spans are identical
    belong to one phrase. Returns (spans (k, 2), box indices) per phrase, in order of
    first appearance."""
    phrases: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for i, spans in enumerate(spans_per_box):
        key = tuple(sorted(tuple(int(v) for v in s) for s in np.asarray(spans).reshape(-1, 2)))
        if key:
            phrases.setdefault(key, []).append(i)
    return [(np.asarray(key, np.int32), boxes) for key, boxes in phrases.items()]


class FlickrRecallEvaluator:
    """Accumulates phrase hits; `result()` gives "<protocol>/R@<k>" and num_phrases.

    counts: [phrases, any_box hits at each k, merged_box hits at each k] (int64), so
    the counts of several hosts add up (see `add_counts`)."""

    def __init__(self, ks: Sequence[int] = KS, iou_threshold: float = IOU_THRESHOLD):
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be positive, got {tuple(ks)}")
        self.ks = tuple(int(k) for k in ks)
        self.iou_threshold = float(iou_threshold)
        self.counts = np.zeros(1 + 2 * len(self.ks), np.int64)

    def phrase_hits(self, gt_boxes: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray) -> np.ndarray:
        """Hits (2, len(ks)) bool of one phrase under (any_box, merged_box)."""
        gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
        pred = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(pred_scores, np.float64).reshape(-1)
        if not len(gt):
            raise ValueError("a phrase needs at least one ground-truth box")
        if len(scores) != len(pred):
            raise ValueError(f"{len(pred)} predicted boxes but {len(scores)} scores")
        ranked = pred[np.argsort(-scores, kind="stable")]
        hits = np.zeros((2, len(self.ks)), bool)
        if not len(ranked):
            return hits
        for row, targets in enumerate((gt, union_box(gt))):
            good = (box_iou(ranked, targets) >= self.iou_threshold).any(axis=1)
            if good.any():
                first = int(np.argmax(good))  # the best-ranked matching box
                hits[row] = [first < k for k in self.ks]
        return hits

    def add_phrase(self, gt_boxes: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray) -> None:
        """One phrase: its ground-truth boxes (G, 4) and its predicted boxes (D, 4)
        with scores (D,)."""
        hits = self.phrase_hits(gt_boxes, pred_boxes, pred_scores)
        self.counts += np.concatenate([[1], hits.reshape(-1)]).astype(np.int64)

    def add_counts(self, counts: np.ndarray) -> None:
        """Adds counts gathered elsewhere (another host's `counts`)."""
        counts = np.asarray(counts, np.int64)
        if counts.shape != self.counts.shape:
            raise ValueError(f"counts must have shape {self.counts.shape}, got {counts.shape}")
        self.counts += counts

    def result(self) -> dict[str, float | int]:
        phrases = int(self.counts[0])
        if not phrases:
            raise ValueError("no phrases were added")
        hits = self.counts[1:].reshape(2, len(self.ks))
        out = {f"{p}/R@{k}": float(hits[row, j]) / phrases
               for row, p in enumerate(PROTOCOLS) for j, k in enumerate(self.ks)}
        out["num_phrases"] = phrases
        return out
