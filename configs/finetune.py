"""Fine-tune a trained GLIP on your own COCO-format detection dataset.

  python -m glipjax.train --config configs/finetune.py --workdir runs/finetune \\
      --config.train.init_from=runs/demo \\
      --config.data.sources.train.annotations=my/train.json --config.data.sources.train.images=my/images

`train.init_from` is a training workdir, an export (python -m glipjax.export) or an
official GLIP .pth checkpoint (then also set train.init_yaml to its config yaml). The
model fields (preset, text encoder, sizes) must describe the same model: the trainer
names every field that differs from the init run's config.

Variants:
  full    (default) every parameter trains, with the fixed class prompt of the dataset
  prompt  prompt tuning (reference section 4): everything frozen except a
          zero-initialised offset on the text embeddings, trained at lr 0.05
"""

from __future__ import annotations

import ml_collections

from glipjax import optim

VARIANTS = ("full", "prompt")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "full"
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r} of configs/finetune.py; choose one of {VARIANTS}.")
    prompt_tuning = variant == "prompt"

    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "tfds"  # built datasets; relative paths are under the workdir
    c.data.sources = ml_collections.ConfigDict()
    # A COCO-format dataset: the instances JSON and its image folder. "fixed": every
    # class of the dataset in one prompt, in order, as the reference fine-tunes.
    c.data.sources.train = ml_collections.ConfigDict(
        dict(kind="coco", annotations="", images="", split="train", prompt="fixed", weight=1.0))
    c.data.batch_size = 8
    c.data.canvas = (800, 1344)
    c.data.short_sides = (480, 560, 640, 720, 800)
    c.data.max_size = 1333
    c.data.eval_short_side = 800
    c.data.eval_max_size = 1333
    c.data.flip_prob = 0.5
    c.data.max_boxes = 100
    c.data.max_text_len = 256
    c.data.tokenizer = ""
    c.data.shuffle_buffer = 1000
    c.data.num_negative_captions = 0
    # Detection prompts: probability of drawing every class as a negative (else 1..all).
    c.data.full_negative_prob = 0.5  # the reference's

    # Must match the init checkpoint's model.
    c.model = ml_collections.ConfigDict()
    c.model.preset = "glip_t"
    c.model.text_encoder = ""
    c.model.text_layers = 0  # the text encoder's first N layers only; 0 keeps them all
    c.model.head_layers = 0  # 0 keeps the preset's (6)
    c.model.fpn_channels = 0  # 0 keeps the preset's (256); also the head's width
    c.model.fusion_embed_dim = 0
    c.model.fusion_heads = 0
    c.model.align_fused_text = True  # False to start from a configs/demo.py run
    c.model.head_deformable = True
    c.model.anchor_sizes = ()
    c.model.dtype = "float32"
    c.model.dropout = True  # False turns off every dropout and Swin's stochastic depth
    c.model.remat = False
    c.model.scan_layers = True  # BERT, head and Swin-stage layers as one scan each: a faster compile, same params
    c.model.prompt_tuning = prompt_tuning

    c.optim = optim.default_optim_config()
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.0
    if prompt_tuning:
        c.optim.lr = 0.05
        c.optim.weight_decay = 0.0
        c.optim.frozen = (r"^(?!prompt_offset$)",)  # every param but the offset

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000
    c.train.log_every = 20
    c.train.max_bad_steps = 20
    c.train.init_from = ""
    c.train.init_yaml = ""

    c.sharding = ml_collections.ConfigDict()
    c.sharding.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding.rules = ()

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    # The evaluator's sets evaluated every eval.every steps and at the end, e.g. ("coco",)
    # with eval.coco.annotations and eval.coco.images: your validation set.
    c.eval.datasets = ()
    c.eval.splits = ()
    c.eval.prompt_modes = ()
    c.eval.max_images = 0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 500
    c.checkpoint.keep = 2
    # Also keep the keep_best evaluated steps with the best value of this eval metric
    # (e.g. "coco/AP"; needs evaluations: eval.every). "" turns it off.
    c.checkpoint.best_metric = ""
    c.checkpoint.best_mode = "max"
    c.checkpoint.keep_best = 1
    return c
