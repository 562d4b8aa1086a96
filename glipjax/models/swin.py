"""Swin Transformer backbone with the semantics of the Microsoft detection code that
GLIP uses (maskrcnn_benchmark/modeling/backbone/swint.py).

Facts kept exactly: the image is padded to a multiple of the patch size; every block
pads its feature map to a multiple of the window (padded tokens are not masked);
odd blocks shift by window // 2 at every resolution, with the -100 mask between
regions of the cyclic shift; relative position bias; PatchMerging pads odd sizes and
concatenates (0::2,0::2), (1::2,0::2), (0::2,1::2), (1::2,1::2) before its LayerNorm
and bias-free reduction; drop path rates are linspace(0, rate) over all blocks.
Parameter paths mirror the checkpoint ("backbone.body." keys), e.g. torch
"layers.2.blocks.1.attn.qkv.weight" -> layers_2/blocks_1/attn/qkv/kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glipjax.models.layers import Dtype, conv, dense, layer_norm, scan_layers, torch_bias_init

SHIFT_MASK_VALUE = -100.0


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Swin sizes; out_norm_stages lists the stages (0-based) whose output gets a
    LayerNorm named norm{stage} (GLIP: C3..C5, i.e. 1, 2, 3; C2 is returned as is)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    patch_size: int = 4
    qkv_bias: bool = True
    out_norm_stages: tuple[int, ...] = (1, 2, 3)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length.")
        for s, heads in enumerate(self.num_heads):
            if self.stage_dim(s) % heads:
                raise ValueError(f"Stage {s} width {self.stage_dim(s)} is not a multiple of {heads} heads.")
        if any(not 0 <= s < len(self.depths) for s in self.out_norm_stages):
            raise ValueError(f"out_norm_stages {self.out_norm_stages} outside 0..{len(self.depths) - 1}.")

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @classmethod
    def swin_t(cls) -> "SwinConfig":
        return cls()

    @classmethod
    def swin_l(cls) -> "SwinConfig":
        return cls(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
                   drop_path_rate=0.4)

    @classmethod
    def tiny(cls) -> "SwinConfig":
        """The small model of the official golden test case."""
        return cls(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def window_partition(x: jnp.ndarray, ws: int) -> jnp.ndarray:
    """(B, H, W, C) with H, W multiples of ws -> (B * nW, ws * ws, C), windows row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: jnp.ndarray, ws: int, h: int, w: int) -> jnp.ndarray:
    """Inverse of window_partition."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


@functools.lru_cache(maxsize=None)
def relative_position_index(ws: int) -> np.ndarray:
    """(ws*ws, ws*ws) index into the (2ws-1)^2 bias table for every query/key pair."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


@functools.lru_cache(maxsize=None)
def shift_attention_mask(hp: int, wp: int, ws: int, shift: int) -> np.ndarray:
    """(nW, ws*ws, ws*ws) additive mask: -100 between tokens from different regions of
    the cyclically shifted (padded) map, 0 within a region."""
    def regions(n: int) -> np.ndarray:
        return (np.arange(n) >= n - ws).astype(np.int32) + (np.arange(n) >= n - shift)

    img = (regions(hp)[:, None] * 3 + regions(wp)[None, :])[None, :, :, None]
    windows = np.asarray(window_partition(img, ws))[..., 0]
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def drop_path(x: jnp.ndarray, rate: float | jax.Array, rng: jax.Array) -> jnp.ndarray:
    """Stochastic depth: zeroes whole samples with probability `rate`, rescales the rest."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias."""

    dim: int
    num_heads: int
    window_size: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, windows: jnp.ndarray, mask: np.ndarray | None) -> jnp.ndarray:
        ws, heads = self.window_size, self.num_heads
        n, c = ws * ws, self.dim
        head_dim = c // heads
        table = self.param(
            "relative_position_bias_table",
            nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, None)),
            ((2 * ws - 1) ** 2, heads),
            jnp.float32,
        )
        qkv = dense(3 * c, ("embed", "heads"), name="qkv", use_bias=self.qkv_bias, dtype=self.dtype)(windows)
        # Channel layout of the fused projection: (q|k|v, head, head_dim).
        q, k, v = jnp.moveaxis(qkv.reshape(-1, n, 3, heads, head_dim), 2, 0)
        scores = jnp.einsum("bnhd,bmhd->bhnm", q * head_dim**-0.5, k).astype(jnp.float32)
        bias = table[relative_position_index(ws).reshape(-1)].reshape(n, n, heads).transpose(2, 0, 1)
        scores = scores + bias[None]
        if mask is not None:
            nw = mask.shape[0]
            scores = (scores.reshape(-1, nw, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
        probs = nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhnm,bmhd->bnhd", probs, v).reshape(-1, n, c)
        return dense(c, ("heads", "embed"), name="proj", dtype=self.dtype)(out)


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP, both with drop-path residuals."""

    config: SwinConfig
    dim: int
    num_heads: int
    shift: int
    drop_path_rate: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool = True,
                 drop_path_rate: jax.Array | None = None) -> jnp.ndarray:
        """`drop_path_rate`, when given, replaces the field's (a scan passes each block's)."""
        cfg = self.config
        ws = cfg.window_size
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        _, h, w, c = x.shape
        y = layer_norm(cfg.layer_norm_eps, name="norm1", dtype=self.dtype)(x)
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        mask = None
        if self.shift:
            y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
            mask = shift_attention_mask(hp, wp, ws, self.shift)
        attn = WindowAttention(c, self.num_heads, ws, cfg.qkv_bias, self.dtype, name="attn")
        y = window_reverse(attn(window_partition(y, ws), mask), ws, hp, wp)
        if self.shift:
            y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
        x = x + self._drop_path(y[:, :h, :w], rate, deterministic)
        y = layer_norm(cfg.layer_norm_eps, name="norm2", dtype=self.dtype)(x)
        y = MLP(int(c * cfg.mlp_ratio), c, self.dtype, name="mlp")(y)
        x = x + self._drop_path(y, rate, deterministic)
        return nn.with_logical_constraint(x, ("batch", "height", "width", "embed"))

    def _drop_path(self, y: jnp.ndarray, rate: float | jax.Array, deterministic: bool) -> jnp.ndarray:
        if deterministic or (isinstance(rate, float) and rate == 0.0):
            return y
        return drop_path(y, rate, self.make_rng("dropout"))


class MLP(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    hidden: int
    out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = dense(self.hidden, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        x = nn.gelu(x, approximate=False)
        return dense(self.out, ("mlp", "embed"), name="fc2", dtype=self.dtype)(x)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (odd sizes padded) -> LayerNorm -> bias-free Linear(4C, 2C)."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        _, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )
        x = layer_norm(self.eps, name="norm", dtype=self.dtype)(x)
        x = dense(2 * c, (None, "embed"), name="reduction", use_bias=False, dtype=self.dtype)(x)
        return nn.with_logical_constraint(x, ("batch", "height", "width", "embed"))


class SwinStage(nn.Module):
    """The blocks of one stage (blocks_{b}); returns (stage output, merged input of the
    next stage or None for the last stage). With `scan`, a stage of two or more pairs of
    blocks (unshifted, shifted) runs them as one scan over the pairs (same params; see
    layers.scan_layers)."""

    config: SwinConfig
    stage: int
    drop_path_rates: tuple[float, ...]
    downsample: bool
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        cfg = self.config
        depth = len(self.drop_path_rates)
        if self.scan and depth >= 4 and depth % 2 == 0 and not self.is_initializing():
            x = self._scanned_blocks(x, deterministic)
        else:
            block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
            for b, rate in enumerate(self.drop_path_rates):
                x = self._block(block_cls, b, rate, name=f"blocks_{b}")(x, deterministic)
        down = PatchMerging(cfg.layer_norm_eps, self.dtype, name="downsample")(x) if self.downsample else None
        return x, down

    def _block(self, block_cls: type[nn.Module], b: int, rate: float, **kwargs) -> nn.Module:
        shift = self.config.window_size // 2 if b % 2 else 0
        return block_cls(self.config, self.config.stage_dim(self.stage), self.config.num_heads[self.stage], shift,
                         rate, self.dtype, **kwargs)

    def _scanned_blocks(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        pairs = len(self.drop_path_rates) // 2
        blocks = [self._block(SwinBlock, b, 0.0, parent=None) for b in (0, 1)]
        rates = jnp.asarray(self.drop_path_rates, jnp.float32).reshape(pairs, 2)
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), pairs)

        def body(params: tuple, h: jnp.ndarray, xs: tuple) -> tuple[jnp.ndarray, None]:
            pair_rates, key = xs
            for j, (block, block_params) in enumerate(zip(blocks, params)):
                rngs = None if key is None else {"dropout": jax.random.fold_in(key, j)}
                h = block.apply({"params": block_params}, h, deterministic, pair_rates[j], rngs=rngs)
            return h, None

        names = [(f"blocks_{2 * i}", f"blocks_{2 * i + 1}") for i in range(pairs)]
        return scan_layers(self, names, body, x, (rates, keys), self.remat)[0]


class PatchEmbed(nn.Module):
    """Pads the image to a multiple of the patch size, patchifies with a strided conv,
    then LayerNorm."""

    config: SwinConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        p = cfg.patch_size
        _, h, w, _ = images.shape
        images = jnp.pad(images, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
        # PyTorch's default Conv2d bias init, kept by the reference: with a zero bias, the
        # LayerNorm of a zero-padded patch divides by sqrt(eps) in the backward pass.
        x = conv(cfg.embed_dim, (p, p), strides=p, padding="VALID", name="proj", dtype=self.dtype,
                 bias_init=torch_bias_init(p * p * images.shape[-1]))(images)
        return layer_norm(cfg.layer_norm_eps, name="norm", dtype=self.dtype)(x)


class SwinTransformer(nn.Module):
    """NHWC images -> the stage outputs [C2, C3, C4, C5] (NHWC, strides 4..32), each
    stage in out_norm_stages through its LayerNorm norm{stage}."""

    config: SwinConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False  # stages of two or more block pairs as one scan each (SwinStage)

    @nn.compact
    def __call__(self, images: jnp.ndarray, deterministic: bool = True) -> list[jnp.ndarray]:
        cfg = self.config
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC, got shape {images.shape}.")
        x = PatchEmbed(cfg, self.dtype, name="patch_embed")(images.astype(self.dtype))
        x = nn.with_logical_constraint(x, ("batch", "height", "width", "embed"))
        rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        outs, start = [], 0
        for s, depth in enumerate(cfg.depths):
            last = s == len(cfg.depths) - 1
            out, x = SwinStage(cfg, s, tuple(rates[start:start + depth]), not last, self.dtype,
                               self.remat, self.scan, name=f"layers_{s}")(x, deterministic)
            start += depth
            if s in cfg.out_norm_stages:
                out = layer_norm(cfg.layer_norm_eps, name=f"norm{s}", dtype=self.dtype)(out)
            outs.append(out)
        return outs
