"""GLIP's vision-language dynamic head (VLDyHead) and its DyConv layer.

The tower is one flat sequence of modules named like the checkpoint:
with fusion, layer i is dyhead_tower_{3i} (VLFuse), dyhead_tower_{3i+1}
(BertLayer on the text) and dyhead_tower_{3i+2} (DyConv); without fusion
(GLIP-T(A)) layer i is dyhead_tower_{i} (DyConv). Box regression, centerness
and token (alignment) logits read the last DyConv output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glipjax.models import layers
from glipjax.models.bert import BertConfig, BertLayer
from glipjax.models.dcn import ModulatedDeformConv3x3, conv_output_size
from glipjax.models.fusion import VLFuse
from glipjax.models.layers import Dtype, scan_layers

Array = jax.Array
VISUAL_AXES = ("batch", "height", "width", "embed")
TEXT_AXES = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Sizes and switches of the head (defaults: GLIP-T)."""

    channels: int = 256
    num_layers: int = 6
    # The head's BERT layers use the language model's config; its width is the text width.
    text: BertConfig = dataclasses.field(default_factory=BertConfig)
    use_fusion: bool = True
    # Align regions with the head's fused text (the reference's
    # FUSE_CONFIG.USE_FUSED_FEATURES_DOT_PRODUCT) or, when False, with the language
    # model's masked output; the fusion still makes the visual features text-aware.
    align_fused_text: bool = True
    fusion_embed_dim: int = 2048
    fusion_heads: int = 8
    fusion_dropout: float = 0.1
    # Modulated deformable 3x3 convs with one `offset` conv per layer (the reference's
    # DYHEAD.USE_DFCONV, on in the released models); False: plain 3x3 convs.
    deformable: bool = True
    group_norm_groups: int = 16
    group_norm_eps: float = 1e-5
    num_levels: int = 5
    # Classes of the frozen, unused cls_logits conv kept for checkpoint parity.
    num_classes: int = 80
    prior_prob: float = 0.01
    log_scale_init: float = 0.0
    remat: bool = False
    # Apply the layers as one scan over their stacked params (same params and results;
    # the compiled program holds one layer instead of num_layers).
    scan_layers: bool = False

    def __post_init__(self):
        if self.channels % self.group_norm_groups:
            raise ValueError(f"channels {self.channels} not divisible by {self.group_norm_groups} groups")
        if self.channels % 4:
            raise ValueError(f"channels {self.channels} must be a multiple of 4 (DyReLU squeeze)")
        if self.fusion_embed_dim % self.fusion_heads:
            raise ValueError(f"fusion_embed_dim {self.fusion_embed_dim} not divisible by {self.fusion_heads}")
        if self.num_layers < 1 or self.num_levels < 1:
            raise ValueError("num_layers and num_levels must be positive")

    @property
    def text_width(self) -> int:
        return self.text.hidden_size

    @classmethod
    def glip_t(cls) -> "HeadConfig":
        return cls()

    @classmethod
    def glip_t_a(cls) -> "HeadConfig":
        """GLIP-T(A): DyConv-only tower, aligned against the plain BERT output."""
        return cls(use_fusion=False)

    @classmethod
    def glip_l(cls) -> "HeadConfig":
        return cls(num_layers=8)

    @classmethod
    def golden_tiny(cls) -> "HeadConfig":
        """The tiny random model of the official golden data (width 64, text 128)."""
        text = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=512)
        return cls(channels=64, num_layers=2, text=text)


def hard_sigmoid(x: Array) -> Array:
    """relu6(x + 3) / 6."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def _align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) bilinear weights with align_corners=True, in float32 as torch computes them."""
    scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
    src = scale * np.arange(out_size, dtype=np.float32)
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), i0), np.float32(1) - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


def resize_bilinear_align_corners(x: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of (B, h, w, C) to (B, H, W, C) with align_corners=True."""
    ry = jnp.asarray(_align_corners_matrix(size[0], x.shape[1]), x.dtype)
    rx = jnp.asarray(_align_corners_matrix(size[1], x.shape[2]), x.dtype)
    hp = jax.lax.Precision.HIGHEST
    return jnp.einsum("Ww,bHwc->bHWc", rx, jnp.einsum("Hh,bhwc->bHwc", ry, x, precision=hp), precision=hp)


def _group_norm(config: HeadConfig, dtype: Dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=config.group_norm_groups,
        epsilon=config.group_norm_eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class Conv3x3Norm(nn.Module):
    """3x3 conv (`conv`: modulated deformable with the given offsets and masks, or
    plain when the config is not deformable) followed by GroupNorm (`bn`), in float32."""

    config: HeadConfig
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array, offset: Array | None, mask: Array | None) -> Array:
        if self.config.deformable:
            y = ModulatedDeformConv3x3(self.config.channels, self.strides, name="conv")(x, offset, mask)
        else:  # the reference initialises these convs from N(0, 0.01)
            y = layers.conv(self.config.channels, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
                            kernel_init=nn.initializers.normal(0.01), name="conv")(x.astype(jnp.float32))
        return _group_norm(self.config, jnp.float32, "bn")(y)


class DyReLU(nn.Module):
    """Dynamic ReLU: y = hard_sigmoid(fc_2(relu(fc_0(avgpool(x))))) split into
    [a1, b1, a2, b2]; a1 = 2(a1 - 0.5) + 1, a2 = 2(a2 - 0.5), b = b - 0.5;
    out = max(x a1 + b1, x a2 + b2), coefficients per image and channel."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        y = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        y = layers.dense(c // 4, ("embed", "mlp"), name="fc_0", bias_init=layers.torch_bias_init(c))(y)
        y = nn.relu(y)
        y = layers.dense(4 * c, ("mlp", None), name="fc_2", bias_init=layers.torch_bias_init(c // 4))(y)
        y = hard_sigmoid(y)[:, None, None, :]
        a1, b1, a2, b2 = jnp.split(y, 4, axis=-1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        x = x.astype(jnp.float32)
        return jnp.maximum(x * a1 + b1, x * a2 + b2).astype(self.dtype)


class DyConv(nn.Module):
    """One DyConv layer over all pyramid levels (finest first).

    Level l mixes DyConv_1(x_l), DyConv_2(x_{l-1}) (stride 2) and the bilinear
    (align_corners) upsampling of DyConv_0(x_{l+1}), all (when deformable) with the
    offsets and masks of one `offset` conv on x_l; each branch is weighted by the
    scale-aware attention hard_sigmoid(relu(AttnConv_1(avgpool(branch)))), the
    weighted branches are averaged and passed through a per-level DyReLU.
    Everything up to the DyReLU runs in float32 (as the reference's deformable
    op does); the output is cast to `dtype`.
    """

    config: HeadConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[Array]) -> list[Array]:
        cfg = self.config
        c = cfg.channels
        branch_convs = [
            Conv3x3Norm(cfg, strides, name=f"DyConv_{k}") for k, strides in enumerate((1, 1, 2))
        ]
        attn_conv = layers.conv(1, (1, 1), name="AttnConv_1",
                                kernel_init=nn.initializers.normal(0.01))
        offset_conv = layers.conv(27, (3, 3), padding=((1, 1), (1, 1)), name="offset",
                                  bias_init=layers.torch_bias_init(9 * c)) if cfg.deformable else None
        dyrelu = DyReLU(self.dtype, name="relu")

        for finer, coarser in zip(levels[:-1], levels[1:]):
            halved = tuple(conv_output_size(n, 2) for n in finer.shape[1:3])
            if halved != tuple(coarser.shape[1:3]):
                raise ValueError(
                    f"a level of size {finer.shape[1:3]} must be followed by one of size {halved} "
                    f"(3x3 stride-2 output), got {coarser.shape[1:3]}"
                )
        outputs = []
        for level, x in enumerate(levels):
            h, w = x.shape[1:3]
            offset = mask = None
            if offset_conv is not None:
                offset_mask = offset_conv(x).astype(jnp.float32)
                offset = offset_mask[..., :18]
                mask = jax.nn.sigmoid(offset_mask[..., 18:])
            branches = [branch_convs[1](x, offset, mask)]
            if level > 0:
                branches.append(branch_convs[2](levels[level - 1], offset, mask))
            if level < len(levels) - 1:
                coarser = branch_convs[0](levels[level + 1], offset, mask)
                branches.append(resize_bilinear_align_corners(coarser, (h, w)))
            weighted = []
            for branch in branches:
                pooled = jnp.mean(branch, axis=(1, 2), keepdims=True)
                weight = hard_sigmoid(nn.relu(attn_conv(pooled)))
                weighted.append(branch * weight)
            mixed = sum(weighted[1:], weighted[0]) / len(weighted)
            outputs.append(nn.with_logical_constraint(dyrelu(mixed), VISUAL_AXES))
        return outputs


class Scale(nn.Module):
    """Learnable scalar multiplier `scale` (init 1.0)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,),
                           jnp.float32)
        return x * scale


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) over the last axis (zero rows stay zero, with a finite
    gradient: the maximum is taken before the square root)."""
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


class VLDyHead(nn.Module):
    """The GLIP head: fusion / BERT / DyConv tower and the box, centerness and
    token-alignment predictors.

    __call__(features, text_hidden, text_mask) with features the pyramid levels
    (B, H_l, W_l, channels), finest first; text_hidden (B, L, text_width) the
    language model's last hidden state (padded positions included) and text_mask
    (B, L) 0/1. Returns a dict of per-level lists:
      bbox_reg (B, H, W, 4) after the level's Scale; centerness (B, H, W, 1);
      dot_product_logits (B, H*W, L) (row-major locations, clamped to +-50000);
      cls_logits (B, H, W, num_classes) (unused by GLIP's losses); features, the
      last DyConv output; and text, the text the logits were aligned against.
    With return_intermediates, "intermediates" holds for each layer a dict with
    fusion_visual, fusion_text, bert_text (with fusion) and dyconv.

    Alignment: e = l2norm(text); t = dot_product_projection_text(e / 2);
    logit = (v . t) / exp(log_scale) + (e . bias_lang + bias0). With fusion and
    align_fused_text the text is the last head BERT layer's output; otherwise (and in
    GLIP-T(A)) it is text_hidden * text_mask, the reference's masked "embedded" features.
    With config.scan_layers the layers run as one scan over their stacked params.
    """

    config: HeadConfig
    dtype: Dtype = jnp.float32

    def _check_inputs(self, features: Sequence[Array], text_hidden: Array, text_mask: Array) -> None:
        cfg = self.config
        if len(features) != cfg.num_levels:
            raise ValueError(f"expected {cfg.num_levels} feature levels, got {len(features)}")
        batch = text_hidden.shape[0]
        for i, f in enumerate(features):
            if f.ndim != 4 or f.shape[0] != batch or f.shape[-1] != cfg.channels:
                raise ValueError(f"level {i} must be ({batch}, H, W, {cfg.channels}), got {f.shape}")
        if text_hidden.ndim != 3 or text_hidden.shape[-1] != cfg.text_width:
            raise ValueError(f"text_hidden must be (B, L, {cfg.text_width}), got {text_hidden.shape}")
        if text_mask.shape != text_hidden.shape[:2]:
            raise ValueError(f"text_mask must be {text_hidden.shape[:2]}, got {text_mask.shape}")

    @nn.compact
    def __call__(
        self,
        features: Sequence[Array],
        text_hidden: Array,
        text_mask: Array,
        deterministic: bool = True,
        return_intermediates: bool = False,
    ) -> dict[str, Any]:
        cfg = self.config
        self._check_inputs(features, text_hidden, text_mask)
        visual = [nn.with_logical_constraint(f.astype(self.dtype), VISUAL_AXES) for f in features]
        text = nn.with_logical_constraint(text_hidden.astype(self.dtype), TEXT_AXES)
        tower = self._scanned_tower if cfg.scan_layers and not self.is_initializing() else self._tower
        visual, text, intermediates = tower(visual, text, text_mask, deterministic, return_intermediates)

        if not (cfg.use_fusion and cfg.align_fused_text):
            text = text_hidden * text_mask[..., None].astype(text_hidden.dtype)
        outputs = self._predict(visual, text.astype(jnp.float32))
        outputs["features"] = visual
        outputs["text"] = text
        if return_intermediates:
            outputs["intermediates"] = intermediates
        return outputs

    def _layer_modules(self, i: int, bound: bool = True) -> tuple[Any, Any, Any]:
        """Layer i's fusion, BERT layer (both None without fusion) and DyConv, named as in
        the released checkpoints: children of the head, or unbound for `apply`."""
        cfg = self.config
        remat = bound and cfg.remat
        unbound = {} if bound else {"parent": None}
        dyconv_cls = nn.remat(DyConv) if remat else DyConv
        if not cfg.use_fusion:
            return None, None, dyconv_cls(cfg, self.dtype, name=f"dyhead_tower_{i}", **unbound)
        fuse_cls = nn.remat(VLFuse, static_argnums=(4,)) if remat else VLFuse
        bert_cls = nn.remat(BertLayer, static_argnums=(3,)) if remat else BertLayer
        fuse = fuse_cls(cfg.fusion_embed_dim, cfg.fusion_heads, cfg.fusion_dropout, 1.0 / cfg.num_layers,
                        self.dtype, name=f"dyhead_tower_{3 * i}", **unbound)
        bert = bert_cls(cfg.text, clamp=True, dtype=self.dtype, name=f"dyhead_tower_{3 * i + 1}", **unbound)
        return fuse, bert, dyconv_cls(cfg, self.dtype, name=f"dyhead_tower_{3 * i + 2}", **unbound)

    @staticmethod
    def _layer(fuse: Callable | None, bert: Callable | None, dyconv: Callable, visual: list[Array], text: Array,
               text_mask: Array, deterministic: bool) -> tuple[list[Array], Array, dict[str, Any]]:
        """One tower layer: fusion and BERT (when given), then DyConv; and its record."""
        record: dict[str, Any] = {}
        if fuse is not None:
            visual, text = fuse(visual, text, text_mask, deterministic)
            record.update(fusion_visual=visual, fusion_text=text)
            text = bert(text, text_mask, deterministic)
            record["bert_text"] = text
        visual = dyconv(visual)
        record["dyconv"] = visual
        return visual, text, record

    def _tower(self, visual: list[Array], text: Array, text_mask: Array, deterministic: bool,
               return_intermediates: bool) -> tuple[list[Array], Array, list[dict[str, Any]]]:
        """The layers unrolled (this creates the params)."""
        intermediates = []
        for i in range(self.config.num_layers):
            visual, text, record = self._layer(*self._layer_modules(i), visual, text, text_mask, deterministic)
            intermediates.append(record)
        return visual, text, intermediates if return_intermediates else []

    def _scanned_tower(self, visual: list[Array], text: Array, text_mask: Array, deterministic: bool,
                       return_intermediates: bool) -> tuple[list[Array], Array, list[dict[str, Any]]]:
        """The layers as one scan over their stacked params (layers.scan_layers)."""
        cfg = self.config
        modules = [self._layer_modules(i, bound=False) for i in range(cfg.num_layers)]
        names = [tuple(m.name for m in layer if m is not None) for layer in modules]
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), cfg.num_layers)

        def body(params: tuple[Any, ...], carry: tuple[list[Array], Array], key: jax.Array | None):
            def call(module: Any, module_params: Any, salt: int) -> Callable:
                rngs = None if key is None else {"dropout": jax.random.fold_in(key, salt)}
                return lambda *args: module.apply({"params": module_params}, *args, rngs=rngs)

            fuse, bert, dyconv = modules[0]  # every layer has the same structure
            if fuse is not None:
                fuse, bert = call(fuse, params[0], 0), call(bert, params[1], 1)
            visual, text, record = self._layer(fuse, bert, call(dyconv, params[-1], 2), *carry, text_mask,
                                               deterministic)
            return (visual, text), record if return_intermediates else None

        (visual, text), records = scan_layers(self, names, body, (visual, text), keys, cfg.remat)
        if not return_intermediates:
            return visual, text, []
        return visual, text, [jax.tree.map(lambda a, i=i: a[i], records) for i in range(cfg.num_layers)]

    def _predict(self, visual: Sequence[Array], text: Array) -> dict[str, Any]:
        cfg = self.config
        bias_value = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        normal = nn.initializers.normal(0.01)
        cls_conv = layers.conv(cfg.num_classes, (1, 1), name="cls_logits", dtype=self.dtype,
                               kernel_init=normal, bias_init=nn.initializers.constant(bias_value))
        bbox_conv = layers.conv(4, (1, 1), name="bbox_pred", dtype=self.dtype, kernel_init=normal)
        ctr_conv = layers.conv(1, (1, 1), name="centerness", dtype=self.dtype, kernel_init=normal)

        def scalar(name: str, value: float) -> Array:
            init = nn.with_logical_partitioning(nn.initializers.constant(value), (None,))
            return self.param(name, init, (1,), jnp.float32)

        log_scale = scalar("log_scale", cfg.log_scale_init)
        bias0 = scalar("bias0", bias_value)
        bias_lang = self.param(
            "bias_lang", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            (cfg.text_width,), jnp.float32,
        )
        e = l2_normalize(text)
        tokens = layers.dense(cfg.channels, ("embed", None), name="dot_product_projection_text",
                              bias_init=layers.torch_bias_init(cfg.text_width))(e / 2.0)
        token_bias = e @ bias_lang + bias0  # (B, L)

        out: dict[str, list[Array]] = {
            "bbox_reg": [], "centerness": [], "dot_product_logits": [], "cls_logits": []
        }
        for level, v in enumerate(visual):
            b, h, w, c = v.shape
            out["cls_logits"].append(cls_conv(v).astype(jnp.float32))
            bbox = bbox_conv(v).astype(jnp.float32)
            out["bbox_reg"].append(Scale(name=f"scales_{level}")(bbox))
            out["centerness"].append(ctr_conv(v).astype(jnp.float32))
            queries = v.reshape(b, h * w, c).astype(jnp.float32)
            logits = jnp.einsum("bnc,blc->bnl", queries, tokens) / jnp.exp(log_scale) + token_bias[:, None, :]
            out["dot_product_logits"].append(layers.clamp(logits))
        return out
