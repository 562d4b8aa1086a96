"""Demo: the tiny GLIP on the bundled, locally generated "shapes" dataset.

Build the dataset and draw samples, the input mix and its drop counts:
  python -m glipjax.data.inspect --config configs/demo.py --workdir runs/demo

Train, then evaluate (eval.json) and draw predictions (predictions_<split>.png):
  python -m glipjax.train --config configs/demo.py --workdir runs/demo

Variants: `configs/demo.py` (default size) and `configs/demo.py:tiny` (a few dozen
small images, for tests). Any field can be overridden: --config.data.shapes.seed=3
"""

from __future__ import annotations

import ml_collections

from glipjax import optim

VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/demo.py; choose one of {VARIANTS}.")
    tiny = variant == "tiny"

    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes"
    # Where TFDS writes built datasets; relative paths are under the workdir.
    c.data.data_dir = "tfds"
    c.data.shapes = ml_collections.ConfigDict()
    c.data.shapes.seed = 0
    c.data.shapes.image_size = 96 if tiny else 128
    # A full run sees 9,600 training images (2.4 epochs); 8,000 distinct ones gave
    # validation AP50 0.436 against 0.443, so the run is not limited by overfitting.
    c.data.shapes.num_train = 48 if tiny else 4000
    c.data.shapes.num_validation = 16 if tiny else 400
    c.data.shapes.num_captions = 16 if tiny else 1000
    c.data.shapes.num_novel = 16 if tiny else 400
    c.data.shapes.max_objects = 6

    # The training input (glipjax.data.pipeline): a weighted mix of named sources.
    # Each source: kind (shapes, coco, mdetr, pseudo_labels, image_text), weight,
    # prompt ("caption": the caption plus negatives from other captions; "detection":
    # shuffled class prompt with sampled negatives; "fixed": every class in order) and
    # the kind's own fields (shapes: split).
    c.data.sources = ml_collections.ConfigDict()
    # Mostly detection prompts: the evaluation scores class prompts, and only detection
    # prompts put an object's same-colour, other-shape classes beside it as negatives (a
    # caption names only what the image holds). Full runs: validation AP50 0.335
    # (swapped colours 0.017) against 0.306 (0.015) with captions 0.6, detection 0.4.
    c.data.sources.shapes_captions = ml_collections.ConfigDict(
        dict(kind="shapes", split="train", prompt="caption", weight=0.2))
    c.data.sources.shapes_detection = ml_collections.ConfigDict(
        dict(kind="shapes", split="train", prompt="detection", weight=0.8))
    # Global; each host reads batch_size / hosts. With two head layers, 1400 steps of 6
    # images fit the 15 minutes where 1400 of 8 did not (see model.head_layers), and
    # reached validation AP50 0.516 against 0.497 for 1000 steps of 8, in 13.5 against
    # 12.8 minutes (the reference's lr milestones in both). Batch 4 (2400 steps, one
    # head layer) learnt little faster per image: the box loss left its plateau after
    # 2,000-2,400 images against 3,200 at batch 8, but ran at 16.5 against 18 images/s.
    c.data.batch_size = 8 if tiny else 6
    c.data.canvas = (96, 96) if tiny else (160, 160)  # (height, width), multiples of 32
    # The default upscales the drawn 128 px images to 160 px, in training and evaluation:
    # the shapes' corners and points then span more of Swin's 4 px patches, and shape is
    # what the model learns slowest. Full runs (deformable head convs, 1200 steps):
    # validation AP50 0.478 (swapped colours 0.028), novel pairs 0.667 against 0.443
    # (0.023), 0.646 at 128 px, at 14.9 against 20.5 images/s on the same day. Drawing
    # the images at 160 px instead (data.shapes.image_size=160, other validation images)
    # gave 0.493 against 0.497 upscaled (plain head convs, 1400 steps). Smaller scales
    # shrank the small shapes: at 128 px, 0.354 (0.018), 0.579 with short sides
    # (96, 112, 128) against 0.430 (0.021), 0.665 with 128 alone.
    c.data.short_sides = (64, 80, 96) if tiny else (160,)
    c.data.max_size = 96 if tiny else 160
    c.data.eval_short_side = 96 if tiny else 160
    c.data.eval_max_size = 96 if tiny else 160
    c.data.flip_prob = 0.0  # captions state "left of" / "right of": a flip would make them false
    c.data.max_boxes = 8
    c.data.max_text_len = 64
    c.data.tokenizer = ""  # "" for the bundled bert-base-uncased vocabulary, else a local path
    c.data.shuffle_buffer = 64 if tiny else 1000
    # No negatives from other captions: with only 36 classes they nearly always name
    # classes present in the image, training the same words as positive and negative.
    # The detection prompts carry the negatives.
    c.data.num_negative_captions = 0
    # Detection prompts: probability of drawing every class as a negative (else 1..all).
    # The reference's 0.5. Full run at 1.0: validation AP50 0.431 (shape_right 0.412),
    # novel pairs 0.653, against 0.430 (0.402), 0.665: more negatives per prompt did not
    # speed up learning shapes.
    c.data.full_negative_prob = 0.5

    # The model: the tiny GLIP with the bundled MiniLM as its text encoder.
    c.model = ml_collections.ConfigDict()
    c.model.preset = "glip_tiny"
    c.model.text_encoder = "minilm"  # "" for the preset's randomly initialised BERT, or a local HF BERT folder
    # MiniLM's first four of six layers only (0 keeps them all; the preset's random BERT
    # has two): its forward pass was a third of the step's FLOPs. Full runs training the
    # top two layers: validation AP50 0.443 (swapped colours 0.023), novel pairs 0.646,
    # against 0.426 (0.023), 0.662 with all six; on one day the progress lines showed
    # 12.5-13.1 images/s against 11.3-11.9 for a run with all six.
    c.model.text_layers = 4
    # One head layer instead of the preset's two (0 keeps the preset's). Trained from
    # scratch, the head's layers are what delays reading the class: with the fixed
    # 30-class prompt, a linear readout of the FPN features learnt to 16% accuracy in 100
    # steps while the head's own outputs stayed at chance (3-5%) for 200. Full runs:
    # validation AP50 0.124 (swapped colours 0.028) with one layer against 0.094 (0.040)
    # with two, at a 27% faster step. Later, with plain head convs at 160 px, two layers
    # won: 1400 steps of 8 images gave 0.603 (0.029), novel pairs 0.730, shape right 53%
    # against 0.497 (0.023), 0.657, 46% with one layer, but took 17.2 minutes (12.0-12.3
    # against 16.8-17.0 images/s), so the demo takes two layers with smaller batches
    # (data.batch_size) and a later lr decay (optim.decay_milestones). The tests' tiny
    # variant keeps one layer, a cheaper step.
    c.model.head_layers = 1 if tiny else 2
    # FPN and head width 128 instead of the preset's 64. The FPN's random 3x3 convs mix
    # each position with its neighbours (and the coarser levels), and at width 64 they
    # lose most of the colour that the Swin stages hold: a linear probe of colour at the
    # positive anchors reads 86% from Swin's C3 at init but 61/60/28% from P3/P4/P5
    # (71/67/40% at width 128), and 62/40/17% after 1200 steps at width 64. Full runs:
    # validation AP50 0.226 (swapped colours 0.036) at width 128 against 0.124 (0.028) at 64.
    c.model.fpn_channels = 0 if tiny else 128  # the tests' tiny variant keeps the preset's 64, a cheaper step
    c.model.fusion_embed_dim = 256  # 0 keeps the preset's (2048)
    c.model.fusion_heads = 8
    # Token logits are (region . token) / exp(log_scale). The reference starts log_scale
    # at 0 and lets it learn, far too slowly for a run of minutes; -2.3 multiplies the
    # logits by 10 from the start (on 8 training images, 300 steps: AP50 0.51 vs 0.18).
    c.model.log_scale_init = -2.3
    # Align regions with MiniLM's own token features instead of the head's fused text
    # (the reference's USE_FUSED_FEATURES_DOT_PRODUCT=False); the deep fusion still makes
    # the visual features text-aware. The head's language layers start from random
    # weights and blur the pretrained token features: on one fixed batch of 8 images,
    # 100 Adam steps tell apart the objects of an image 99% of the time this way and
    # 50% with the fused text. Full runs with two head layers: validation AP50 0.094
    # (swapped colours 0.040) against 0.086 (0.051) with the fused text.
    c.model.align_fused_text = False
    # Plain 3x3 convs in the head's DyConv layer (the reference's DYHEAD.USE_DFCONV off;
    # the released models turn it on): the deformable convs' offset conv and bilinear
    # gathers were 18% of the step's op time. Full runs at 128 px: validation AP50 0.436
    # (swapped colours 0.023), novel pairs 0.659 against 0.443 (0.023), 0.646 deformable;
    # the progress lines showed 19.8 images/s against 17.0 for a deformable run that day.
    c.model.head_deformable = False
    # No dropout (Swin's stochastic depth, MiniLM's and the fusion's dropout): a run of
    # minutes from scratch is far from overfitting, and MiniLM's dropout perturbs, in
    # training only, the token features that regions align with. Full runs: validation
    # AP50 0.306 (swapped colours 0.015), novel pairs 0.514, against 0.275 (0.023), 0.422.
    c.model.dropout = False
    # Objects of 10-75 px on the 160 px canvas. At 128 px, sizes (32, ..., 512), which put
    # most objects on P3, gave validation AP50 0.424 (swapped colours 0.024) against 0.443.
    c.model.anchor_sizes = (16, 32, 64, 128, 256)
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.scan_layers = False  # BERT, head and Swin-stage layers as one scan each: a faster compile, same params

    c.optim = optim.default_optim_config()
    c.optim.warmup_steps = 2 if tiny else 100
    # Full runs: validation AP50 0.426 at 4e-4 against 0.388 at 2e-4 and 0.295 at 1e-3;
    # with the settings below, 0.445 at 6e-4 against 0.443, and 0.440 with the rest of
    # Swin at 2x lr as well (position biases at 100x). The reference's loss weights stay
    # (token 1, GIoU 2, centerness 1): a token weight of 2 gave 0.418, of 0.5 gave 0.428.
    c.optim.lr = 4e-4
    c.optim.ema_decay = 0.0  # a run this short evaluates its raw params
    # The lr falls 10x at 90% and again at 97% of the steps, later than the reference's
    # (0.67, 0.89): a run this short is still learning shapes at full lr. Full runs with
    # the settings here: validation AP50 0.580 (swapped colours 0.025), novel pairs
    # 0.713, against 0.548 (0.023), 0.713 at (0.8, 0.95) and 0.516 (0.024), 0.659 at
    # the reference's; still later, (0.95, 0.99), gave 0.583 (0.021), 0.711. Runs with
    # the settings here after changes of the fusion's rounding gave 0.572 (0.032), 0.704
    # and 0.583 (0.039), 0.714.
    c.optim.decay_milestones = (0.9, 0.97)
    # MiniLM's embeddings and lower layers stay fixed; its top two layers (of the four
    # kept) train (at optim.text_lr_factor x lr), so the token features can adapt to the
    # prompts. Full runs with all six layers: validation AP50 0.275 (swapped colours
    # 0.023) training the top two against 0.226 (0.036) with all of MiniLM fixed, at the
    # same step time: the backward pass stops at the first trained layer. Training every
    # layer (frozen="()") costs about a third more step time.
    c.optim.frozen = (r"^language_backbone/(embeddings|encoder/layer_[0-1])/",)
    # Swin's relative position biases start near 0 and move about lr a step: at the base
    # lr they stayed below 0.3 after 1200 steps, so window attention hardly depended on
    # position; at 20x they reach 1 to 4. Full runs: validation AP50 0.354 against 0.335;
    # at 128 px, 0.451 at 100x against 0.443 at 20x, but 0.467 against 0.465 with
    # train.steps=1600; at 160 px with one head layer and batch 8, 0.479 at 100x against
    # 0.485 and 0.497 at 20x (two runs that differ only in rounding, see train.steps).
    c.optim.lr_factors = ((r"relative_position_bias_table$", 20.0),)

    c.train = ml_collections.ConfigDict()
    # With the settings here, README's first command took 12.0 minutes on a fresh clone
    # (11.0 for the training command, at 14.0-14.7 images/s). With one head layer, batch 8 and the reference's lr
    # milestones, 1400 steps gave validation AP50 0.497 (swapped colours 0.023), and a
    # run that differs only in rounding (GELU computed through erf instead of erfc) gave
    # 0.485 (0.023), which shows the run-to-run spread; 1600 steps of that run gave
    # 0.496 (0.024).
    c.train.steps = 4 if tiny else 1400
    c.train.log_every = 1 if tiny else 50
    c.train.max_bad_steps = 20  # consecutive non-finite steps before training stops

    c.sharding = ml_collections.ConfigDict()
    c.sharding.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding.rules = ()  # () for glipjax.sharding.DEFAULT_RULES

    # Evaluation on the shapes splits (periodic every N steps, 0: only at the end): AP50
    # on held-out images, on novel colour-shape pairs found only through the prompt's
    # words, and with every colour word of the prompt swapped (a model that reads the
    # words must fall far below the true prompt).
    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    c.eval.splits = ("validation", "novel")
    c.eval.prompt_modes = ("true", "swapped_colors")
    c.eval.max_images = 8 if tiny else 200  # 0: the whole split

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 2 if tiny else 500
    c.checkpoint.keep = 2
    # Also keep the keep_best evaluated steps with the best value of this eval metric
    # (e.g. "validation/true/AP50"; needs evaluations: eval.every). "" turns it off.
    c.checkpoint.best_metric = ""
    c.checkpoint.best_mode = "max"
    c.checkpoint.keep_best = 1
    return c
