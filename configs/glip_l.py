"""GLIP-L pre-training as in the reference (glip_Swin_L.yaml): GLIP-T's config with
Swin-L, 8 head layers, weight decay 0.01, 1M steps, no EMA, and Cap24M pseudo-labels
(per-entity format, screened at score 0.5 without NMS) instead of Cap4M.

Check the memory of a mesh before booking it (nothing is allocated):
  python -m glipjax.aot --config configs/glip_l.py --mesh data=1,fsdp=8,tensor=1 --devices 8 --hbm 80GB

Train (data paths as in configs/glip_t.py; Cap24M under data.sources.cap24m):
  python -m glipjax.train --config configs/glip_l.py --workdir gs://BUCKET/glip_l \
    --config.model.text_encoder=/models/bert-base-uncased

The reference trains GLIP-L in float32 (no AMP); this config computes in bfloat16 like
GLIP-T (float32 params): --config.model.dtype=float32 for the reference's precision.
"""

from __future__ import annotations

import pathlib

import ml_collections

from glipjax.config import load_config

CAP24M_RECORDS = 24e6


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/glip_l.py has no variants, got {arg!r}.")
    c = load_config(f"{pathlib.Path(__file__).with_name('glip_t.py')}:cap4m")
    with c.unlocked():
        c.variant = "default"
        c.data.name = "glip_l"
        c.data.sources.cap24m = ml_collections.ConfigDict(dict(
            kind="pseudo_labels", split="train", weight=CAP24M_RECORDS / 1e6, prompt="caption",
            annotations="data/cap24m/pseudo_labels.jsonl", images="data/cap24m/images",
            screen=True, score_threshold=0.5, nms_threshold=1.0))  # nms_threshold 1.0: NMS off
        del c.data.sources["cap4m"]
        c.model.preset = "glip_l"
        c.optim.weight_decay = 0.01
        c.optim.ema_decay = 0.0
        c.train.steps = 1_000_000
    return c
