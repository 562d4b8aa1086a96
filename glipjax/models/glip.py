"""The GLIP model: Swin + FPN image encoder, BERT text encoder, VLDyHead, ATSS anchors.

Parameter tree (mirrors the released checkpoints, see convert.py):
  backbone/body (Swin), backbone/fpn, language_backbone (BERT), head (VLDyHead).
Images are NHWC, normalised as the reference does (BGR, 0..255, mean/std below) and
padded to a multiple of 32; the text is (B, L) token ids with a 0/1 mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glipjax.losses import glip_losses
from glipjax.models.atss import ANCHOR_SIZES, STRIDES, atss_assign, feature_sizes, generate_anchors
from glipjax.models.bert import BertConfig, BertModel
from glipjax.models.dyhead import HeadConfig, VLDyHead
from glipjax.models.fpn import FPN
from glipjax.models.layers import Dtype
from glipjax.models.postprocess import Detections, postprocess
from glipjax.models.swin import SwinConfig, SwinTransformer

# Pixel normalisation of the reference (BGR order, 0..255 scale).
PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
PIXEL_STD_BGR = (57.375, 57.12, 58.395)
SIZE_DIVISIBILITY = 32


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """ATSS inference settings of the reference (glip-reference section 1)."""

    pre_nms_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    max_detections: int = 100


@dataclasses.dataclass(frozen=True)
class GLIPConfig:
    """A whole GLIP model. The language model's config is `head.text` (one source)."""

    swin: SwinConfig = dataclasses.field(default_factory=SwinConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    fpn_channels: int = 256
    strides: tuple[int, ...] = STRIDES
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES
    max_text_len: int = 256
    postprocess: PostprocessConfig = dataclasses.field(default_factory=PostprocessConfig)
    remat: bool = False  # rematerialise each Swin block, BERT layer and head layer
    # Run each BERT's layers, the head's layers and each Swin stage of two or more block
    # pairs as one scan over stacked params: the same params and results, a several
    # times smaller program to compile.
    scan_layers: bool = False
    # Prompt tuning (reference section 4): a zero-initialised (max_text_len, hidden)
    # offset "prompt_offset" added to the text encoder's output embeddings.
    prompt_tuning: bool = False

    def __post_init__(self):
        if self.head.channels != self.fpn_channels:
            raise ValueError(f"head.channels ({self.head.channels}) must equal fpn_channels ({self.fpn_channels})")
        if len(self.strides) != len(self.anchor_sizes) or len(self.strides) != self.head.num_levels:
            raise ValueError("strides, anchor_sizes and head.num_levels must agree")

    @property
    def text(self) -> BertConfig:
        return self.head.text

    def anchors(self, height: int, width: int) -> list[np.ndarray]:
        """Per-level (h*w, 4) anchors for a padded (height, width) input."""
        sizes = feature_sizes(height, width, self.strides)
        return generate_anchors(sizes, self.strides, self.anchor_sizes)


def glip_t() -> GLIPConfig:
    """GLIP-T: Swin-T, 6 fused head layers, BERT-base."""
    return GLIPConfig()


def glip_t_a() -> GLIPConfig:
    """GLIP-T(A): no fusion, the head aligns against the plain BERT output."""
    return GLIPConfig(head=HeadConfig.glip_t_a())


def glip_l() -> GLIPConfig:
    """GLIP-L: Swin-L (window 12), 8 head layers, BERT-base."""
    return GLIPConfig(swin=SwinConfig.swin_l(), head=HeadConfig.glip_l())


def glip_tiny(text: BertConfig | None = None) -> GLIPConfig:
    """A tiny GLIP for tests and the demo: the golden case's sizes (Swin embed 32,
    FPN/head width 64, 2 head layers) with any BERT (default: the golden 128-wide one)."""
    head = HeadConfig.golden_tiny()
    if text is not None:
        head = dataclasses.replace(head, text=text)
    return GLIPConfig(swin=SwinConfig.tiny(), head=head, fpn_channels=64)


PRESETS = {"glip_t": glip_t, "glip_t_a": glip_t_a, "glip_l": glip_l, "glip_tiny": glip_tiny}


class Backbone(nn.Module):
    """Swin body + FPN: images -> ([C2..C5], [P3..P7])."""

    config: GLIPConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> tuple[list[jax.Array], list[jax.Array]]:
        cfg = self.config
        stages = SwinTransformer(cfg.swin, self.dtype, cfg.remat, cfg.scan_layers, name="body")(
            images, deterministic
        )
        pyramid = FPN(self.config.fpn_channels, dtype=self.dtype, name="fpn")(stages[1:], deterministic)
        return stages, pyramid


class GLIP(nn.Module):
    """images (B, H, W, 3) normalised and padded to a multiple of 32, input_ids and
    attention_mask (B, L) -> the head's per-level outputs (see VLDyHead) plus
    "swin" (C3..C5), "fpn" (P3..P7) and "lang_hidden".

    The three parts also run alone (`apply(..., method=...)`): encode_images and
    encode_text do not depend on each other, so a prompt shared by many images is
    encoded once (glipjax.inference), and fuse runs the head on their outputs."""

    config: GLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.backbone = Backbone(cfg, self.dtype)
        self.language_backbone = BertModel(cfg.text, self.dtype, cfg.remat, cfg.scan_layers)
        if cfg.prompt_tuning:
            self.prompt_offset = self.param(
                "prompt_offset", nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
                (cfg.max_text_len, cfg.text.hidden_size))
        head = dataclasses.replace(cfg.head, remat=cfg.remat or cfg.head.remat,
                                   scan_layers=cfg.scan_layers or cfg.head.scan_layers)
        self.head = VLDyHead(head, self.dtype)

    def __call__(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        deterministic: bool = True,
        return_intermediates: bool = False,
    ) -> dict[str, Any]:
        stages, pyramid = self.encode_images(images, deterministic)
        lang_hidden = self.encode_text(input_ids, attention_mask, deterministic)
        out = self.fuse(pyramid, lang_hidden, attention_mask, deterministic, return_intermediates)
        if return_intermediates:
            out.update(swin=stages[1:], fpn=pyramid, lang_hidden=lang_hidden)
        return out

    def encode_images(self, images: jax.Array, deterministic: bool = True) -> tuple[list[jax.Array], list[jax.Array]]:
        """Swin and FPN: ([C2..C5], [P3..P7])."""
        h, w = images.shape[1:3]
        if h % SIZE_DIVISIBILITY or w % SIZE_DIVISIBILITY:
            raise ValueError(f"image size {h}x{w} must be padded to a multiple of {SIZE_DIVISIBILITY}")
        return self.backbone(images, deterministic)

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """BERT's last hidden state (B, L, D), plus the prompt-tuning offset."""
        lang_hidden = self.language_backbone(input_ids, attention_mask, deterministic=deterministic)
        if self.config.prompt_tuning:
            length = input_ids.shape[1]
            if length > self.config.max_text_len:
                raise ValueError(f"text of {length} tokens exceeds max_text_len {self.config.max_text_len}")
            lang_hidden = lang_hidden + self.prompt_offset[:length].astype(lang_hidden.dtype)
        return lang_hidden

    def fuse(self, pyramid: Sequence[jax.Array], lang_hidden: jax.Array, attention_mask: jax.Array,
             deterministic: bool = True, return_intermediates: bool = False) -> dict[str, Any]:
        """The head (fusion, towers, alignment) on encode_images' pyramid and
        encode_text's output, batched alike."""
        return self.head(list(pyramid), lang_hidden, attention_mask, deterministic, return_intermediates)


def detect(
    config: GLIPConfig,
    outputs: dict[str, Any],
    positive_map: jax.Array,
    phrase_mask: jax.Array,
    image_sizes: jax.Array,
    padded_hw: Sequence[int],
    **overrides: Any,
) -> Detections:
    """Post-processed detections from GLIP outputs (settings from config.postprocess,
    `overrides` replace any of them)."""
    settings = dataclasses.asdict(config.postprocess) | overrides
    anchors = [jnp.asarray(a) for a in config.anchors(*padded_hw)]
    return postprocess(
        outputs["dot_product_logits"], outputs["bbox_reg"], outputs["centerness"], anchors,
        positive_map, phrase_mask, image_sizes, **settings,
    )


def losses(
    config: GLIPConfig,
    outputs: dict[str, Any],
    gt_boxes: jax.Array,
    gt_mask: jax.Array,
    gt_positive_map: jax.Array,
    text_mask: jax.Array,
    padded_hw: Sequence[int],
    **loss_options: Any,
) -> dict[str, jax.Array]:
    """Training losses: ATSS targets for padded ground truth (gt_boxes (B, G, 4) xyxy
    in input pixels, gt_mask (B, G), gt_positive_map (B, G, L)) and the token focal,
    GIoU and centerness losses (`loss_options` go to glipjax.losses.glip_losses)."""
    anchors_per_level = config.anchors(*padded_hw)
    anchors = jnp.asarray(np.concatenate(anchors_per_level))
    targets = atss_assign(anchors, [len(a) for a in anchors_per_level], gt_boxes, gt_mask, gt_positive_map)
    batch = gt_boxes.shape[0]
    token_logits = jnp.concatenate(outputs["dot_product_logits"], axis=1)
    box_regression = jnp.concatenate([r.reshape(batch, -1, 4) for r in outputs["bbox_reg"]], axis=1)
    centerness = jnp.concatenate([c.reshape(batch, -1) for c in outputs["centerness"]], axis=1)
    return glip_losses(token_logits, box_regression, centerness, anchors, targets, text_mask, **loss_options)


def config_from_fields(model: Any, text: BertConfig | None = None, max_text_len: int | None = None) -> GLIPConfig:
    """A GLIPConfig from a run config's `model` fields: preset (a PRESETS name) and
    optional changes (0, () or an absent field keeps the preset's value):
    head_layers, fpn_channels (also the head's width), fusion_embed_dim, fusion_heads,
    log_scale_init, align_fused_text, head_deformable, anchor_sizes, remat, scan_layers, prompt_tuning,
    text_layers (the text encoder's first N layers only); dropout=False turns off every
    dropout and Swin's stochastic depth.
    `text` replaces the language model's config."""
    if model.preset not in PRESETS:
        raise ValueError(f"unknown model preset {model.preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[model.preset]()
    head = config.head
    if text is not None:
        head = dataclasses.replace(head, text=text)
    if model.get("text_layers"):
        layers = int(model.text_layers)
        if not 0 < layers <= head.text.num_hidden_layers:
            raise ValueError(f"model.text_layers must be in 1..{head.text.num_hidden_layers} (the text "
                             f"encoder's layers), got {layers}")
        head = dataclasses.replace(head, text=dataclasses.replace(head.text, num_hidden_layers=layers))
    if model.get("head_layers"):
        head = dataclasses.replace(head, num_layers=int(model.head_layers))
    if model.get("fpn_channels"):
        head = dataclasses.replace(head, channels=int(model.fpn_channels))
    if model.get("fusion_embed_dim"):
        head = dataclasses.replace(head, fusion_embed_dim=model.fusion_embed_dim)
    if model.get("fusion_heads"):
        head = dataclasses.replace(head, fusion_heads=model.fusion_heads)
    if model.get("log_scale_init"):
        head = dataclasses.replace(head, log_scale_init=float(model.log_scale_init))
    if model.get("align_fused_text") is not None:
        head = dataclasses.replace(head, align_fused_text=bool(model.align_fused_text))
    if model.get("head_deformable") is not None:
        head = dataclasses.replace(head, deformable=bool(model.head_deformable))
    swin = config.swin
    if not model.get("dropout", True):
        head = dataclasses.replace(head, fusion_dropout=0.0, text=dataclasses.replace(
            head.text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        swin = dataclasses.replace(swin, drop_path_rate=0.0)
    changes: dict[str, Any] = {"head": head, "swin": swin, "remat": bool(model.get("remat", False)),
                               "scan_layers": bool(model.get("scan_layers", False)),
                               "prompt_tuning": bool(model.get("prompt_tuning", False))}
    if model.get("anchor_sizes"):
        changes["anchor_sizes"] = tuple(model.anchor_sizes)
    if model.get("fpn_channels"):
        changes["fpn_channels"] = int(model.fpn_channels)
    if max_text_len:
        changes["max_text_len"] = max_text_len
    return dataclasses.replace(config, **changes)
