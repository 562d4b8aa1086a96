"""Self-training on the shapes demo: a teacher trained on the labelled images
pseudo-labels the caption-only images, and a student trains on both.

  # 1. the teacher: the demo itself, on the labelled "train" split
  python -m glipjax.train --config configs/demo_selftrain.py:teacher --workdir runs/selftrain/teacher
  # 2. the caption-only split as image-caption pairs
  python -m glipjax.data.export_captions --config configs/demo_selftrain.py:teacher --out runs/selftrain/captions
  # 3. the teacher grounds the captions' noun phrases
  python -m glipjax.pseudo_label --config configs/demo_selftrain.py:teacher --teacher runs/selftrain/teacher \\
      --captions runs/selftrain/captions/captions.jsonl --out runs/selftrain/pseudo
  # 4. the student: the same recipe on the labelled images plus the pseudo-labels
  python -m glipjax.train --config configs/demo_selftrain.py:student --workdir runs/selftrain/student

Both runs end with AP50 on held-out images and on novel colour-shape pairs (eval.json).
`launch/local/selftrain_demo.sh` runs the four steps. The variants tiny_teacher and
tiny_student are the same on configs/demo.py:tiny, for tests.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

VARIANTS = ("teacher", "student", "tiny_teacher", "tiny_student")
PSEUDO_LABELS = "runs/selftrain/pseudo/pseudo_labels.jsonl"  # step 3's output, relative to the repository


def _demo_config(arg: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("demo_config", pathlib.Path(__file__).with_name("demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "teacher"
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/demo_selftrain.py; choose one of {VARIANTS}.")
    tiny = variant.startswith("tiny_")
    c = _demo_config("tiny" if tiny else "default")
    c.variant = variant

    # The teacher's screening of its own boxes (glip-reference section 3 uses 0.9 and
    # NMS 0.9 for a teacher trained for days; this one trains for minutes, so its
    # confident boxes score lower: see scores.png of step 3).
    c.pseudo_label = ml_collections.ConfigDict()
    c.pseudo_label.score_threshold = 0.5
    c.pseudo_label.nms_threshold = 0.9
    c.pseudo_label.min_boxes = 1
    c.pseudo_label.max_phrases = 16
    c.pseudo_label.phrases = "auto"
    c.pseudo_label.batch_size = 0
    c.pseudo_label.part_size = 16 if tiny else 256

    if variant.endswith("student"):
        # The labelled sources keep their 3:2 ratio; the pseudo-labelled captions (a
        # quarter as many images as the labelled split) get a fifth of the batches.
        c.data.sources.shapes_captions.weight = 0.48
        c.data.sources.shapes_detection.weight = 0.32
        c.data.sources.pseudo = ml_collections.ConfigDict(
            dict(kind="pseudo_labels", annotations=PSEUDO_LABELS, prompt="caption", weight=0.2))
    return c
