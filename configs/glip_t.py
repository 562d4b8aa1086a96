"""GLIP-T pre-training as in the reference (glip_Swin_T_O365_GoldG.yaml and the paper).

Check the memory of a mesh before booking it (nothing is allocated):
  python -m glipjax.aot --config configs/glip_t.py --mesh data=1,fsdp=8,tensor=1 --devices 8 --hbm 16GiB

Train (paths below are placeholders: point them at your copies):
  python -m glipjax.train --config configs/glip_t.py --workdir gs://BUCKET/glip_t \
    --config.data.sources.objects365.annotations=/data/objects365/train.json \
    --config.data.sources.objects365.images=/data/objects365/train \
    --config.model.text_encoder=/models/bert-base-uncased

Variants (the paper's GLIP-T data ablations):
  configs/glip_t.py           GLIP-T (C): Objects365 + GoldG (the released glip_tiny_model_o365_goldg)
  configs/glip_t.py:o365      GLIP-T (B): Objects365 only
  configs/glip_t.py:cap4m     GLIP-T: Objects365 + GoldG + Cap4M pseudo-labelled image-caption pairs
docs/scaling.md gives the measured mesh and batch per slice.
"""

from __future__ import annotations

import ml_collections

from glipjax import optim

VARIANTS = ("o365_goldg", "o365", "cap4m")
EPOCHS = 30
# Sampling weights are the sources' sizes in millions of records, so the mix samples in
# proportion to size as the reference's concatenation does (GLIP paper: Objects365
# 0.66M images, GoldG 0.8M, of which Flickr30k entities about 0.15M captions; Cap4M 4M).
# Set them to your copies' record counts.
SIZES = {"objects365": 0.66, "goldg": 0.65, "flickr30k": 0.15, "cap4m": 4.0}


def _source(kind: str, weight: float, **fields: object) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(kind=kind, split="train", weight=weight, **fields))


def data_sources(variant: str) -> ml_collections.ConfigDict:
    """The training mix of a variant (shared by configs/glip_l.py)."""
    s = ml_collections.ConfigDict()
    # Detection in COCO format: the prompt is the shuffled class names with sampled negatives.
    s.objects365 = _source("coco", SIZES["objects365"], prompt="detection",
                           annotations="data/objects365/annotations/train.json", images="data/objects365/train")
    if variant == "o365":
        return s
    # GoldG (MDETR annotations): GQA/Visual Genome captions, and Flickr30k entities.
    s.goldg = _source("mdetr", SIZES["goldg"], prompt="caption",
                      annotations="data/mdetr_annotations/final_mixed_train_no_coco.json", images="data/gqa/images")
    s.flickr30k = _source("mdetr", SIZES["flickr30k"], prompt="caption",
                          annotations="data/mdetr_annotations/final_flickr_separateGT_train.json",
                          images="data/flickr30k/flickr30k_images")
    if variant == "cap4m":
        s.cap4m = _source("pseudo_labels", SIZES["cap4m"], prompt="caption",
                          annotations="data/cap4m/pseudo_labels.jsonl", images="data/cap4m/images")
    return s


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "o365_goldg"
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/glip_t.py; choose one of {VARIANTS}.")

    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = f"glip_{variant}"
    # Where TFDS writes the built sources; relative paths are under the workdir. Use a
    # local or gs:// path shared by all hosts when the workdir is per run.
    c.data.data_dir = "tfds"
    c.data.sources = data_sources(variant)
    c.data.batch_size = 64  # global: the reference's 2 images on each of 32 V100s
    c.data.canvas = (800, 1344)  # (height, width): 800 x 1333 padded to a multiple of 32
    c.data.short_sides = (480, 560, 640, 720, 800)
    c.data.max_size = 1333
    c.data.eval_short_side = 800
    c.data.eval_max_size = 1333
    c.data.flip_prob = 0.5
    c.data.max_boxes = 100
    c.data.max_text_len = 256
    c.data.tokenizer = ""  # "" for the bundled bert-base-uncased vocabulary, else a local path
    c.data.shuffle_buffer = 1000
    # Caption negatives are the reference's packing for pseudo-labelled captions only.
    c.data.num_negative_captions = 20 if variant == "cap4m" else 0
    # Detection prompts: probability of drawing every class as a negative (else 1..all).
    c.data.full_negative_prob = 0.5  # the reference's

    c.model = ml_collections.ConfigDict()
    c.model.preset = "glip_t"
    c.model.text_encoder = ""  # "" for a randomly initialised BERT-base; a local HF bert-base-uncased folder to start from it
    c.model.text_layers = 0  # the text encoder's first N layers only; 0 keeps them all
    c.model.head_layers = 0  # 0 keeps the preset's (6)
    c.model.fpn_channels = 0  # 0 keeps the preset's (256); also the head's width
    c.model.fusion_embed_dim = 0  # 0 keeps the preset's (2048)
    c.model.fusion_heads = 0  # 0 keeps the preset's (8)
    c.model.align_fused_text = True  # align regions with the head's fused text, as the reference
    c.model.head_deformable = True  # the head's DyConv layers use modulated deformable 3x3 convs
    c.model.anchor_sizes = ()  # () keeps the preset's (64, 128, 256, 512, 1024)
    c.model.dtype = "bfloat16"  # compute dtype; params stay float32
    c.model.dropout = True  # False turns off every dropout and Swin's stochastic depth
    c.model.remat = True
    c.model.scan_layers = True  # BERT, head and Swin-stage layers as one scan each: a faster compile, same params

    c.optim = optim.default_optim_config()  # AdamW 1e-4, warmup 2000, x0.1 at 67% and 89%, EMA 0.999

    total_records = sum(c.data.sources[name].weight for name in c.data.sources) * 1e6
    c.train = ml_collections.ConfigDict()
    c.train.steps = int(EPOCHS * total_records / c.data.batch_size)
    c.train.log_every = 50
    c.train.max_bad_steps = 20

    c.sharding = ml_collections.ConfigDict()
    c.sharding.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding.rules = ()  # () for glipjax.sharding.DEFAULT_RULES

    # The trainer's built-in evaluation reads the shapes splits only; evaluate COCO/LVIS
    # from the checkpoints instead.
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    c.eval.splits = ()
    c.eval.prompt_modes = ()
    c.eval.max_images = 0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 2500
    c.checkpoint.keep = 3
    # Also keep the keep_best evaluated steps with the best value of this eval metric
    # (e.g. "validation/true/AP50"; needs evaluations: eval.every). "" turns it off.
    c.checkpoint.best_metric = ""
    c.checkpoint.best_mode = "max"
    c.checkpoint.keep_best = 1
    return c
