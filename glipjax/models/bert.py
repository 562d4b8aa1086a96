"""BERT text encoder (Hugging Face BertModel layout, no pooler) and the BERT layer
that GLIP's head reuses with value clamping.

Parameter paths mirror the Hugging Face names, e.g. torch
"encoder.layer.3.attention.self.query.weight" -> encoder/layer_3/attention/self/query/kernel.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from glipjax.models.layers import Dtype, clamp, dense, layer_norm, scan_layers

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT sizes with the Hugging Face field names; defaults are bert-base-uncased."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BertConfig":
        """Reads the known fields of a Hugging Face config dict; other entries (model_type,
        pad_token_id, ...) are ignored. Only absolute position embeddings are supported."""
        position_type = values.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"Unsupported position_embedding_type {position_type!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "BertConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def bert_base_uncased(cls) -> "BertConfig":
        return cls()


def extended_attention_mask(attention_mask: jnp.ndarray, dtype: Dtype = jnp.float32) -> jnp.ndarray:
    """(B, L) 0/1 mask -> (B, 1, 1, L) additive mask: 0 on kept keys, finfo.min on padding."""
    mask = attention_mask.astype(dtype)[:, None, None, :]
    return (1.0 - mask) * jnp.finfo(dtype).min


class BertSelfAttention(nn.Module):
    """Multi-head self-attention (HF "attention.self"); scores may be clamped to +-50000."""

    config: BertConfig
    clamp: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jnp.ndarray, mask_bias: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        cfg = self.config
        b, length, _ = hidden.shape

        def heads(name: str) -> jnp.ndarray:
            y = dense(cfg.hidden_size, ("embed", "heads"), name=name, dtype=self.dtype)(hidden)
            return y.reshape(b, length, cfg.num_attention_heads, cfg.head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(cfg.head_dim)
        if self.clamp:
            scores = clamp(scores)
        probs = nn.softmax(scores + mask_bias, axis=-1).astype(self.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, cfg.hidden_size)
        return nn.with_logical_constraint(context, ("batch", "length", "heads"))


class BertAddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual) (HF "attention.output" and "output").
    With clamp, the dense output and the normalised result are clamped to +-50000."""

    config: BertConfig
    in_axis: str
    clamp: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, residual: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        cfg = self.config
        y = dense(cfg.hidden_size, (self.in_axis, "embed"), name="dense", dtype=self.dtype)(x)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        if self.clamp:
            y = clamp(y)
        y = layer_norm(cfg.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(y + residual)
        if self.clamp:
            y = clamp(y)
        return y


class BertAttention(nn.Module):
    """HF "attention": self-attention followed by its output projection and LayerNorm."""

    config: BertConfig
    clamp: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jnp.ndarray, mask_bias: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        context = BertSelfAttention(self.config, self.clamp, self.dtype, name="self")(
            hidden, mask_bias, deterministic
        )
        return BertAddNorm(self.config, "heads", dtype=self.dtype, name="output")(
            context, hidden, deterministic
        )


class BertIntermediate(nn.Module):
    """HF "intermediate": dense -> activation (clamped before and after when clamp)."""

    config: BertConfig
    clamp: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        y = dense(cfg.intermediate_size, ("embed", "mlp"), name="dense", dtype=self.dtype)(x)
        if self.clamp:
            y = clamp(y)
        y = ACTIVATIONS[cfg.hidden_act](y)
        if self.clamp:
            y = clamp(y)
        return nn.with_logical_constraint(y, ("batch", "length", "mlp"))


class BertLayer(nn.Module):
    """One post-LayerNorm transformer layer with HF BERT semantics.

    clamp=True gives the BERT layer of GLIP's head: attention scores clamped to +-50000
    before the mask is added, intermediate and output sublayers clamped to +-50000.
    """

    config: BertConfig
    clamp: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, hidden: jnp.ndarray, attention_mask: jnp.ndarray, deterministic: bool = True
    ) -> jnp.ndarray:
        cfg = self.config
        if hidden.ndim != 3 or hidden.shape[-1] != cfg.hidden_size:
            raise ValueError(f"hidden must be (B, L, {cfg.hidden_size}), got {hidden.shape}.")
        if attention_mask.shape != hidden.shape[:2]:
            raise ValueError(f"attention_mask must be {hidden.shape[:2]}, got {attention_mask.shape}.")
        hidden = nn.with_logical_constraint(hidden.astype(self.dtype), ("batch", "length", "embed"))
        mask_bias = extended_attention_mask(attention_mask)
        attended = BertAttention(cfg, self.clamp, self.dtype, name="attention")(
            hidden, mask_bias, deterministic
        )
        inter = BertIntermediate(cfg, self.clamp, self.dtype, name="intermediate")(attended)
        out = BertAddNorm(cfg, "mlp", self.clamp, self.dtype, name="output")(inter, attended, deterministic)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""

    config: BertConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jnp.ndarray, token_type_ids: jnp.ndarray, deterministic: bool
    ) -> jnp.ndarray:
        cfg = self.config

        def embed(rows: int, axes: tuple[str | None, str | None], name: str) -> nn.Embed:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
            return nn.Embed(rows, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                            embedding_init=init, name=name)

        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (
            embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(positions)
            + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        )
        x = layer_norm(cfg.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertEncoder(nn.Module):
    """The stack of BertLayer modules named layer_{i}, optionally rematerialised and
    optionally applied as one scan (same params; see layers.scan_layers)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, hidden: jnp.ndarray, attention_mask: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        num_layers = self.config.num_hidden_layers
        if self.scan and not self.is_initializing():
            layer = BertLayer(self.config, dtype=self.dtype, parent=None)
            keys = None if deterministic else jax.random.split(self.make_rng("dropout"), num_layers)

            def body(params: tuple[Any, ...], h: jnp.ndarray, key: jax.Array | None) -> tuple[jnp.ndarray, None]:
                rngs = None if key is None else {"dropout": key}
                return layer.apply({"params": params[0]}, h, attention_mask, deterministic, rngs=rngs), None

            names = [(f"layer_{i}",) for i in range(num_layers)]
            return scan_layers(self, names, body, hidden.astype(self.dtype), keys, self.remat)[0]
        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
        for i in range(num_layers):
            hidden = layer_cls(self.config, dtype=self.dtype, name=f"layer_{i}")(
                hidden, attention_mask, deterministic
            )
        return hidden


class BertModel(nn.Module):
    """Hugging Face BertModel without the pooler; returns the last hidden state (B, L, D)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jnp.ndarray,
        attention_mask: jnp.ndarray,
        token_type_ids: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got {input_ids.shape}.")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"Sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}."
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be {input_ids.shape}, got {attention_mask.shape}.")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids must be {input_ids.shape}, got {token_type_ids.shape}.")
        x = BertEmbeddings(cfg, self.dtype, name="embeddings")(input_ids, token_type_ids, deterministic)
        return BertEncoder(cfg, self.dtype, self.remat, self.scan, name="encoder")(x, attention_mask, deterministic)
