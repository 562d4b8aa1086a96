"""Pseudo-labels for image-caption pairs: a teacher grounds each caption's noun phrases.

    python -m glipjax.pseudo_label --config configs/demo_selftrain.py --teacher runs/demo \\
        --captions runs/captions/captions.jsonl --out runs/pseudo [--config.pseudo_label.score_threshold=0.5]

Input: an image-text JSONL file (one {"image": path, "caption": text} per line, paths
relative to --images, by default the file's folder). Per caption, the noun phrases
(glipjax.phrases) are the queries: the caption is the prompt and each phrase is asked
through its own tokens, as in phrase grounding, at most pseudo_label.max_phrases per
forward pass. The teacher (a training workdir or an export; its own config gives the
model, the eval resize and the tokenizer) keeps, per phrase, the boxes scoring above
pseudo_label.score_threshold; NMS at pseudo_label.nms_threshold then runs over all of
an image's boxes, as the pseudo-label source's screening does (reference values 0.9
and 0.9); an image left with fewer than pseudo_label.min_boxes boxes gets no record.

Output (--out):
  pseudo_labels.jsonl  one v1 record per kept image (glip-reference section 3):
                       file_name (relative to --out), image_id, caption, img_h, img_w,
                       bboxes (absolute xyxy), scores, tokens_positive ([[start, end]] per box)
  summary.json         images, records, boxes per image, phrases, score histogram
  scores.png           histogram of every candidate box's score, with the threshold
  parts/               finished parts of pseudo_label.part_size input lines each

Resumable: a part is written whole (temporary file, then rename) once its images are
done, and a rerun skips the parts that exist, so a killed run continues without
duplicating or losing records. Parts go round-robin to the processes of a multi-host
run, each on its own devices; process 0 writes the merged files once all parts exist.
Plug the result into a training mix as a source of kind "pseudo_labels" with
annotations=<out>/pseudo_labels.jsonl.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the command may re-execute itself once (glipjax/allocator.py)
    from glipjax import allocator

    allocator.use_huge_pages()

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from glipjax import draw, logs, paths, phrases, preprocess, sharding
from glipjax.config import parse_command_line
from glipjax.data.builders.pseudo_labels import nms_keep
from glipjax.data.prompts import positive_map
from glipjax.data.tokenizer import encode, load_tokenizer
from glipjax.eval.datasets import Detector, batches, pad_rows
from glipjax.eval.hosts import Progress
from glipjax.runs import RunError, load_run
from glipjax.train import _initialize_hosts

RECORDS_FILE = "pseudo_labels.jsonl"
SUMMARY_FILE = "summary.json"
HISTOGRAM_FILE = "scores.png"
PARTS_DIR = "parts"
HISTOGRAM_BINS = 20  # equal bins over [0, 1]
log = logging.getLogger("glipjax.pseudo_label")


def default_fields() -> ml_collections.ConfigDict:
    """The `pseudo_label` fields this command reads, with their defaults."""
    p = ml_collections.ConfigDict()
    p.score_threshold = 0.9  # keep boxes scoring strictly above
    p.nms_threshold = 0.9  # <= 0 turns NMS off
    p.min_boxes = 1  # an image with fewer kept boxes gets no record
    p.max_phrases = 16  # phrases per forward pass; more are asked in further passes
    p.phrases = "auto"  # auto (spaCy when installed, else rules), spacy or rules
    p.batch_size = 0  # images per forward pass over this process's devices; 0: data.batch_size
    p.part_size = 256  # input lines per resumable part
    return ml_collections.ConfigDict({"pseudo_label": p})


@dataclasses.dataclass
class Pair:
    """One input line: its index, the image path as given and the caption."""

    index: int
    image: str
    caption: str


def read_pairs(path: epath.Path) -> Iterator[Pair | str]:
    """The pairs of an image-text JSONL file, or a reason string for each unusable line."""
    with path.open() as f:
        for index, line in enumerate(f):
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                yield "not_json"
                continue
            if not isinstance(raw, dict) or not isinstance(raw.get("image"), str):
                yield "no_image"
            elif not isinstance(raw.get("caption"), str) or not raw["caption"].strip():
                yield "no_caption"
            else:
                yield Pair(index, raw["image"], raw["caption"])


def count_lines(path: epath.Path) -> int:
    with path.open() as f:
        return sum(1 for _ in f)


def screen(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, nms_threshold: float) -> np.ndarray:
    """Indices of the boxes that survive: score > threshold, then class-agnostic NMS."""
    keep = np.flatnonzero(scores > score_threshold)
    if nms_threshold > 0 and len(keep):
        keep = keep[nms_keep(boxes[keep], scores[keep], nms_threshold)]
    return keep[np.argsort(-scores[keep], kind="stable")]


class Labeller:
    """The teacher's grounding of caption phrases, batched over this process's devices."""

    def __init__(self, run: Any, settings: ml_collections.ConfigDict, batch_size: int):
        self.run, self.settings = run, settings
        data = run.config.data
        self.short_side, self.max_size, self.canvas = data.eval_short_side, data.eval_max_size, tuple(data.canvas)
        self.text_len = run.glip_config.max_text_len
        self.tokenizer = load_tokenizer(data.tokenizer or None)
        self.detector = Detector(run.model, run.glip_config, run.params, run.mesh,
                                 sharding.rules_from_config(run.config), batch_size=batch_size)

    def queries(self, pair: Pair, image: np.ndarray) -> Iterator[dict[str, Any]]:
        """Model inputs of one pair: one query per max_phrases of its noun phrases."""
        spans = phrases.noun_phrases(pair.caption, self.settings.phrases)
        prepared, size = preprocess.prepare(image, self.short_side, self.max_size, self.canvas)
        input_ids, attention_mask, encoding = encode(self.tokenizer, pair.caption, self.text_len)
        step = self.settings.max_phrases
        for first in range(0, len(spans), step):
            group = spans[first: first + step]
            pmap = np.zeros((step, self.text_len), np.float32)
            mask = np.zeros(step, bool)
            pmap[: len(group)], mask[: len(group)] = positive_map(encoding, [[s] for s in group], self.text_len)
            yield {"pair": pair, "image": prepared, "size": np.asarray(size, np.int32), "input_ids": input_ids,
                   "attention_mask": attention_mask, "positive_map": pmap, "phrase_mask": mask,
                   "spans": group, "scale": np.asarray(image.shape[:2], np.float32) / np.asarray(size, np.float32)}

    def candidates(self, queries: Sequence[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray,
                                                                                 list[tuple[int, int]]]]:
        """Per query: its boxes in original pixels, scores and the span of each box."""
        names = ("image", "input_ids", "attention_mask", "positive_map", "phrase_mask", "size")
        for batch in batches(queries, self.detector.batch_size):
            dets = self.detector(*(pad_rows([q[n] for q in batch], self.detector.batch_size) for n in names))
            for b, query in enumerate(batch):
                valid = dets.valid[b] & (dets.labels[b] >= 1) & (dets.labels[b] <= len(query["spans"]))
                sy, sx = query["scale"]
                boxes = dets.boxes[b][valid] * np.asarray([sx, sy, sx, sy], np.float32)
                yield query, boxes, dets.scores[b][valid], [query["spans"][p - 1] for p in dets.labels[b][valid]]


def label_part(labeller: Labeller, pairs: Sequence[Pair | str], images_dir: epath.Path, out: epath.Path,
               progress: Progress) -> dict[str, Any]:
    """Pseudo-labels one part's pairs; returns {"records", "histogram", "phrases", "skipped"}."""
    settings = labeller.settings
    skipped: dict[str, int] = {}
    readable = []
    for pair in pairs:
        if isinstance(pair, str):
            skipped[pair] = skipped.get(pair, 0) + 1
            continue
        try:
            image = preprocess.read_image(_image_path(pair.image, images_dir))
        except OSError:
            skipped["unreadable_image"] = skipped.get("unreadable_image", 0) + 1
            continue
        readable.append((pair, image))
    queries = [q for pair, image in readable for q in labeller.queries(pair, image)]
    found: dict[int, list[tuple[np.ndarray, float, tuple[int, int]]]] = {}
    histogram = np.zeros(HISTOGRAM_BINS, np.int64)
    for query, boxes, scores, spans in labeller.candidates(queries):
        histogram += np.histogram(scores, HISTOGRAM_BINS, (0.0, 1.0))[0]
        found.setdefault(query["pair"].index, []).extend(zip(boxes, scores.tolist(), spans))
    progress.update(len(pairs))
    records = []
    for pair, image in readable:
        boxes = found.get(pair.index, [])
        keep = screen(np.asarray([b for b, _, _ in boxes], np.float32).reshape(-1, 4),
                      np.asarray([s for _, s, _ in boxes], np.float32), settings.score_threshold, settings.nms_threshold) if boxes else []
        if len(keep) < max(settings.min_boxes, 1):
            skipped["too_few_boxes"] = skipped.get("too_few_boxes", 0) + 1
            continue
        records.append({
            "file_name": _relative_to(_image_path(pair.image, images_dir), out),
            "image_id": pair.index, "caption": pair.caption,
            "img_h": int(image.shape[0]), "img_w": int(image.shape[1]),
            "bboxes": [[round(float(v), 2) for v in boxes[k][0]] for k in keep],
            "scores": [round(float(boxes[k][1]), 4) for k in keep],
            "tokens_positive": [[list(boxes[k][2])] for k in keep],
        })
    num_phrases = sum(len(q["spans"]) for q in queries)
    return {"records": records, "histogram": histogram.tolist(), "phrases": num_phrases, "skipped": skipped,
            "images": len(readable)}


def _image_path(name: str, images_dir: epath.Path) -> epath.Path:
    return paths.as_path(name) if paths.is_uri(name) or os.path.isabs(name) else images_dir / name


def _relative_to(path: epath.Path, out: epath.Path) -> str:
    """`path` relative to the output folder (the pseudo-label source's default image root)."""
    if paths.is_uri(path) or paths.is_uri(out):
        return os.fspath(path)
    return os.path.relpath(os.fspath(path), os.fspath(out))


def _part_name(first: int, end: int) -> str:
    return f"{first:09d}-{end:09d}.json"


def _write_atomic(path: epath.Path, text: str) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def merge(out: epath.Path, part_names: Sequence[str], settings: ml_collections.ConfigDict,
          method: str) -> dict[str, Any]:
    """pseudo_labels.jsonl, summary.json and scores.png from the finished parts."""
    histogram = np.zeros(HISTOGRAM_BINS, np.int64)
    totals = {"lines": 0, "images": 0, "records": 0, "boxes": 0, "phrases": 0}
    skipped: dict[str, int] = {}
    tmp = out / (RECORDS_FILE + ".tmp")
    with tmp.open("w") as f:
        for name in part_names:
            part = json.loads((out / PARTS_DIR / name).read_text())
            for record in part["records"]:
                f.write(json.dumps(record) + "\n")
            histogram += np.asarray(part["histogram"], np.int64)
            totals["lines"] += part["end"] - part["first"]
            totals["images"] += part["images"]
            totals["records"] += len(part["records"])
            totals["boxes"] += sum(len(r["bboxes"]) for r in part["records"])
            totals["phrases"] += part["phrases"]
            for reason, n in part["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
    tmp.rename(out / RECORDS_FILE)
    summary = dict(totals, skipped=skipped, phrase_method=method,
                   boxes_per_record=totals["boxes"] / max(totals["records"], 1),
                   boxes_per_image=totals["boxes"] / max(totals["images"], 1),
                   score_threshold=settings.score_threshold, nms_threshold=settings.nms_threshold,
                   score_histogram={"bin_edges": np.linspace(0, 1, HISTOGRAM_BINS + 1).round(3).tolist(),
                                    "counts": histogram.tolist()})
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    picture = draw.histogram(histogram, (0.0, 1.0), marker=settings.score_threshold,
                             title=f"candidate box scores ({int(histogram.sum())} boxes); "
                                   f"kept above {settings.score_threshold}")
    with (out / HISTOGRAM_FILE).open("wb") as f:
        picture.save(f, format="PNG")
    return summary


def pseudo_label(config: ml_collections.ConfigDict, teacher: str, captions: str, images: str | None, out: str,
                 max_images: int | None = None) -> dict[str, Any] | None:
    """Labels every pair of `captions` (or the first max_images lines); returns the
    summary on process 0 (None elsewhere)."""
    settings = config.pseudo_label
    method = phrases.phrase_method() if settings.phrases == "auto" else settings.phrases
    phrases.noun_phrases("a check", method)  # fails early when spaCy was asked for and is missing
    captions_path = paths.as_path(captions)
    images_dir = paths.as_path(images) if images else captions_path.parent
    out_dir = paths.as_path(out)
    run = load_run(teacher)
    (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    global_batch = settings.batch_size or run.config.data.batch_size
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} is not divisible by the {jax.process_count()} processes")
    labeller = Labeller(run, settings, global_batch // jax.process_count())

    total = count_lines(captions_path)
    if max_images is not None:
        total = min(total, max_images)
    size = settings.part_size
    bounds = [(first, min(first + size, total)) for first in range(0, total, size)]
    names = [_part_name(*b) for b in bounds]
    mine = [k for k in range(len(bounds)) if k % jax.process_count() == jax.process_index()]
    todo = [k for k in mine if not (out_dir / PARTS_DIR / names[k]).exists()]
    log.info("teacher step %d; %d lines in %d parts, %d left for this process; phrases by %s",
             run.step, total, len(bounds), len(todo), method)
    progress = Progress("pseudo_label", sum(bounds[k][1] - bounds[k][0] for k in todo), unit="images")
    wanted = {k: bounds[k] for k in todo}
    part: list[Pair | str] = []
    for index, pair in enumerate(read_pairs(captions_path)):
        if index >= total:
            break
        k = index // size
        if k not in wanted:
            continue
        part.append(pair)
        first, end = wanted[k]
        if index + 1 == end:
            result = label_part(labeller, part, images_dir, out_dir, progress)
            _write_atomic(out_dir / PARTS_DIR / names[k], json.dumps(dict(result, first=first, end=end)))
            part = []
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("pseudo_label parts written")
    if jax.process_index() != 0:
        return None
    missing = [n for n in names if not (out_dir / PARTS_DIR / n).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} parts are missing after labelling (first: {missing[0]})")
    return merge(out_dir, names, settings, method)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher: a training workdir or an export")
    parser.add_argument("--captions", required=True, help='image-text JSONL: {"image": path, "caption": text} per line')
    parser.add_argument("--images", help="folder the image paths are relative to (default: the JSONL's folder)")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same one to resume)")
    parser.add_argument("--max-images", type=int, help="label the first N lines only")
    parser.add_argument("--coordinator", help="multi-host: address:port of process 0")
    parser.add_argument("--num-processes", type=int, default=0, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=0, help="multi-host: this process's index")
    args, config = parse_command_line(parser, argv, default_fields())
    settings = config.pseudo_label
    problems = []
    if not paths.as_path(args.captions).is_file():
        problems.append(f"--captions {args.captions}: no such file")
    if args.max_images is not None and args.max_images < 1:
        problems.append(f"--max-images must be at least 1, got {args.max_images}")
    if not 0 <= settings.score_threshold < 1:
        problems.append(f"pseudo_label.score_threshold must be in [0, 1), got {settings.score_threshold}")
    if settings.nms_threshold > 1:
        problems.append(f"pseudo_label.nms_threshold must be <= 1 (<= 0: off), got {settings.nms_threshold}")
    if settings.max_phrases < 1 or settings.part_size < 1:
        problems.append("pseudo_label.max_phrases and pseudo_label.part_size must be at least 1")
    if settings.phrases not in ("auto", "spacy", "rules"):
        problems.append(f"pseudo_label.phrases must be auto, spacy or rules, got {settings.phrases!r}")
    if problems:
        parser.error("; ".join(problems))
    logs.to_console()
    _initialize_hosts(args)
    paths.enable_compilation_cache()
    try:
        summary = pseudo_label(config, args.teacher, args.captions, args.images, args.out, args.max_images)
    except (RunError, RuntimeError) as e:
        parser.error(str(e))
    if summary is not None:
        shown = {k: v for k, v in summary.items() if k != "score_histogram"}
        print(json.dumps(shown, indent=2), file=sys.stdout, flush=True)
    return summary


if __name__ == "__main__":
    main()
