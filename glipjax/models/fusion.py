"""GLIP's early vision-language fusion: bidirectional multi-head cross-attention.

`BiMultiHeadAttention` computes one shared logit matrix between visual tokens
(queries) and text tokens (keys) and uses it both ways; `BiAttentionBlock`
adds the pre-LayerNorms and the per-channel layer scales, with the residual on
the normalised inputs; `VLFuse` flattens the feature pyramid into one visual
token sequence and splits the result back into levels.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from glipjax.models.layers import Dtype, clamp, dense, layer_norm

Array = jax.Array

# Added to the logits of padded text tokens when visual tokens attend to text.
MASKED_LOGIT = -9e15
LAYER_NORM_EPS = 1e-5

XAVIER_UNIFORM = nn.initializers.xavier_uniform()


class BiMultiHeadAttention(nn.Module):
    """Shared-logit attention image<-text and text<-image (params v_proj, l_proj,
    values_v_proj, values_l_proj, out_v_proj, out_l_proj).

    A = clamp((v_proj(v) * head_dim^-0.5) . l_proj(l)) per head;
    image<-text: softmax over text of A + m, m = +1 on valid tokens, -9e15 on padding;
    text<-image: softmax over visual tokens of clamp(A^T - rowmax(A^T)), unmasked.
    """

    embed_dim: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, v: Array, l: Array, text_mask: Array | None, deterministic: bool = True
    ) -> tuple[Array, Array]:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        b, v_dim, l_dim = v.shape[0], v.shape[2], l.shape[2]
        head_dim = self.embed_dim // self.num_heads
        # Per-head arrays are (B, heads, T, head_dim), without the batch axis when B is 1:
        # XLA:CPU's YNNPACK runs fused reductions about 40 times slower on arrays with an
        # axis of size 1 (GLIP-T's CPU training step at one image: 28.0 s against 36.8 s).
        lead = (b, self.num_heads) if b > 1 else (self.num_heads,)

        def proj(name: str, x: Array) -> Array:
            y = dense(self.embed_dim, ("embed", "heads"), name=name, dtype=self.dtype,
                      kernel_init=XAVIER_UNIFORM)(x)
            y = y.reshape(b, x.shape[1], self.num_heads, head_dim).swapaxes(1, 2)
            return y.reshape(*lead, x.shape[1], head_dim)

        def merge_heads(y: Array) -> Array:
            y = y.reshape(b, self.num_heads, y.shape[-2], head_dim).swapaxes(1, 2)
            return y.reshape(b, y.shape[1], self.embed_dim)

        query = proj("v_proj", v) * (head_dim ** -0.5)
        key = proj("l_proj", l)
        value_v = proj("values_v_proj", v)
        value_l = proj("values_l_proj", l)

        logits = jnp.einsum("...nd,...ld->...nl", query, key).astype(jnp.float32)
        logits = clamp(logits)

        # text<-image on the same (visual, text) layout: softmax over the visual axis.
        logits_l = logits - jnp.max(logits, axis=-2, keepdims=True)
        probs_l = jax.nn.softmax(clamp(logits_l), axis=-2)

        if text_mask is not None:
            mask = text_mask.astype(jnp.float32)
            mask = jnp.where(mask == 0, MASKED_LOGIT, mask)
            logits = logits + mask.reshape(*lead[:-1], 1, 1, mask.shape[-1])
        probs_v = jax.nn.softmax(logits, axis=-1)

        drop = nn.Dropout(self.dropout)
        probs_v = drop(probs_v, deterministic=deterministic).astype(self.dtype)
        probs_l = drop(probs_l, deterministic=deterministic).astype(self.dtype)

        out_v = merge_heads(jnp.einsum("...nl,...ld->...nd", probs_v, value_l))
        out_l = merge_heads(jnp.einsum("...nl,...nd->...ld", probs_l, value_v))
        out_v = dense(v_dim, ("heads", "embed"), name="out_v_proj", dtype=self.dtype,
                      kernel_init=XAVIER_UNIFORM)(out_v)
        out_l = dense(l_dim, ("heads", "embed"), name="out_l_proj", dtype=self.dtype,
                      kernel_init=XAVIER_UNIFORM)(out_l)
        return out_v, out_l


class BiAttentionBlock(nn.Module):
    """v' = LN_v(v), l' = LN_l(l); (dv, dl) = attn(v', l'); returns
    (v' + gamma_v * dv, l' + gamma_l * dl). Gammas start at `init_value`."""

    embed_dim: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    init_value: float = 1.0 / 6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, v: Array, l: Array, text_mask: Array | None, deterministic: bool = True
    ) -> tuple[Array, Array]:
        v = layer_norm(LAYER_NORM_EPS, name="layer_norm_v", dtype=self.dtype)(v)
        l = layer_norm(LAYER_NORM_EPS, name="layer_norm_l", dtype=self.dtype)(l)
        dv, dl = BiMultiHeadAttention(
            self.embed_dim, self.num_heads, self.dropout, self.dtype, name="attn"
        )(v, l, text_mask, deterministic)

        def gamma(name: str, width: int) -> Array:
            init = nn.initializers.constant(self.init_value)
            return self.param(name, nn.with_logical_partitioning(init, ("embed",)), (width,), jnp.float32)

        v = v + gamma("gamma_v", v.shape[-1]).astype(self.dtype) * dv
        l = l + gamma("gamma_l", l.shape[-1]).astype(self.dtype) * dl
        return v, l


def flatten_levels(levels: Sequence[Array]) -> Array:
    """[(B, H_i, W_i, C)] -> (B, sum H_i W_i, C), each level row-major."""
    return jnp.concatenate([x.reshape(x.shape[0], -1, x.shape[-1]) for x in levels], axis=1)


def split_levels(tokens: Array, shapes: Sequence[tuple[int, int]]) -> list[Array]:
    """Inverse of `flatten_levels` given the (H_i, W_i) of each level."""
    out, start = [], 0
    for h, w in shapes:
        out.append(tokens[:, start:start + h * w].reshape(tokens.shape[0], h, w, tokens.shape[-1]))
        start += h * w
    return out


class VLFuse(nn.Module):
    """Fusion step of the head tower (submodule `b_attn`): all pyramid levels
    (NHWC) attend jointly to the text and the text to all of them."""

    embed_dim: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    init_value: float = 1.0 / 6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, levels: Sequence[Array], text: Array, text_mask: Array | None, deterministic: bool = True
    ) -> tuple[list[Array], Array]:
        if text.ndim != 3 or (text_mask is not None and text_mask.shape != text.shape[:2]):
            raise ValueError(
                f"text must be (B, L, D) with text_mask (B, L); got {text.shape} and "
                f"{None if text_mask is None else text_mask.shape}"
            )
        tokens = nn.with_logical_constraint(flatten_levels(levels), ("batch", "length", "embed"))
        v, l = BiAttentionBlock(
            self.embed_dim, self.num_heads, self.dropout, self.init_value, self.dtype, name="b_attn"
        )(tokens, text, text_mask, deterministic)
        l = nn.with_logical_constraint(l, ("batch", "length", "embed"))
        out = split_levels(v, [x.shape[1:3] for x in levels])
        return [nn.with_logical_constraint(x, ("batch", "height", "width", "embed")) for x in out], l
