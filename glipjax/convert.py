"""Released PyTorch weights <-> glipjax parameters through one table of rules.

A Rule pairs a torch name template with a Flax path template and an array transform;
"{x}" in a template stands for an integer index that both sides share, e.g.
"encoder.layer.{i}.attention.self.query.weight" <-> "encoder/layer_{i}/attention/self/query/kernel".
A RuleSet is a section of the table (BERT, BERT layer, Swin, FPN, ...); `under` nests a
section beneath a prefix, so the same BERT-layer rules serve a plain Hugging Face
checkpoint and GLIP's head. `RULES` holds every section. The same rules run both ways:
`from_torch` (torch state dict -> params) and `to_torch` (params -> torch-named numpy).

Weights are read without running pickled code (safetensors, or torch.load with
weights_only=True). Missing, unexpected and mis-shaped keys are collected and reported
together in one ConversionError; recognised non-parameters (buffers such as
relative_position_index and position_ids, an unused pooler) are listed as `ignore`.
Importing this module imports neither torch nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from glipjax.models.bert import BertConfig, BertLayer, BertModel
from glipjax.models.dyhead import HeadConfig
from glipjax.models.fpn import FPN
from glipjax.models.glip import GLIP, SIZE_DIVISIBILITY, GLIPConfig, PostprocessConfig
from glipjax.models.swin import SwinConfig, SwinTransformer

Array = np.ndarray
StateDict = dict[str, Array]
Params = dict[str, Any]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class ConversionError(ValueError):
    """Checkpoint keys that do not fit the model: every problem, by name, in one message."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), note: str = ""):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = [note] if note else []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.mismatched)):
            if items:
                parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
        super().__init__("\n".join(parts))


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a torch array becomes a Flax array and back."""

    name: str
    to_flax: Callable[[Array], Array]
    to_torch: Callable[[Array], Array]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
LINEAR = Transform("linear", lambda a: a.T, lambda a: a.T)  # [out, in] <-> [in, out]
CONV = Transform(  # [out, in, kh, kw] <-> [kh, kw, in, out]
    "conv", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)
)


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    parts = _PLACEHOLDER.split(template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
    return re.compile(regex + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str
    flax: str
    transform: Transform = IDENTITY


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """A section of the table: rules plus torch name templates that are recognised and
    deliberately not loaded (buffers, unused heads)."""

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules, self.ignore + other.ignore)

    def under(self, torch_prefix: str, flax_prefix: str) -> "RuleSet":
        """This section nested under prefixes, e.g. ("encoder.layer.{i}.", "encoder/layer_{i}/")."""
        return RuleSet(
            tuple(Rule(torch_prefix + r.torch, flax_prefix + r.flax, r.transform) for r in self.rules),
            tuple(torch_prefix + t for t in self.ignore),
        )

    def ignores(self, name: str) -> bool:
        return any(_pattern(t).match(name) for t in self.ignore)

    def torch_to_flax(self, name: str) -> tuple[str, Transform] | None:
        for rule in self.rules:
            m = _pattern(rule.torch).match(name)
            if m:
                return rule.flax.format(**m.groupdict()), rule.transform
        return None

    def flax_to_torch(self, path: str) -> tuple[str, Transform] | None:
        for rule in self.rules:
            m = _pattern(rule.flax).match(path)
            if m:
                return rule.torch.format(**m.groupdict()), rule.transform
        return None


def linear(torch: str, flax: str, bias: bool = True) -> RuleSet:
    rules = (Rule(f"{torch}.weight", f"{flax}/kernel", LINEAR),)
    return RuleSet(rules + ((Rule(f"{torch}.bias", f"{flax}/bias"),) if bias else ()))


def conv(torch: str, flax: str, bias: bool = True) -> RuleSet:
    rules = (Rule(f"{torch}.weight", f"{flax}/kernel", CONV),)
    return RuleSet(rules + ((Rule(f"{torch}.bias", f"{flax}/bias"),) if bias else ()))


def norm(torch: str, flax: str) -> RuleSet:
    """LayerNorm / GroupNorm: weight -> scale, bias -> bias."""
    return RuleSet((Rule(f"{torch}.weight", f"{flax}/scale"), Rule(f"{torch}.bias", f"{flax}/bias")))


def embedding(torch: str, flax: str) -> RuleSet:
    return RuleSet((Rule(f"{torch}.weight", f"{flax}/embedding"),))


def param(torch: str, flax: str) -> RuleSet:
    """A bare parameter copied as is."""
    return RuleSet((Rule(torch, flax),))


def ignored(*templates: str) -> RuleSet:
    return RuleSet((), tuple(templates))


def _sections(*sections: RuleSet) -> RuleSet:
    return functools.reduce(lambda a, b: a + b, sections)


# ----------------------------------------------------------------------------- the table

BERT_LAYER_RULES = _sections(
    linear("attention.self.query", "attention/self/query"),
    linear("attention.self.key", "attention/self/key"),
    linear("attention.self.value", "attention/self/value"),
    linear("attention.output.dense", "attention/output/dense"),
    norm("attention.output.LayerNorm", "attention/output/LayerNorm"),
    linear("intermediate.dense", "intermediate/dense"),
    linear("output.dense", "output/dense"),
    norm("output.LayerNorm", "output/LayerNorm"),
)

BERT_RULES = _sections(
    embedding("embeddings.word_embeddings", "embeddings/word_embeddings"),
    embedding("embeddings.position_embeddings", "embeddings/position_embeddings"),
    embedding("embeddings.token_type_embeddings", "embeddings/token_type_embeddings"),
    norm("embeddings.LayerNorm", "embeddings/LayerNorm"),
    BERT_LAYER_RULES.under("encoder.layer.{i}.", "encoder/layer_{i}/"),
    # position_ids is a buffer; GLIP uses no pooler (HF checkpoints carry one).
    ignored("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"),
)

SWIN_BLOCK_RULES = _sections(
    norm("norm1", "norm1"),
    linear("attn.qkv", "attn/qkv"),  # fused q|k|v, kept fused
    linear("attn.proj", "attn/proj"),
    param("attn.relative_position_bias_table", "attn/relative_position_bias_table"),
    norm("norm2", "norm2"),
    linear("mlp.fc1", "mlp/fc1"),
    linear("mlp.fc2", "mlp/fc2"),
    ignored("attn.relative_position_index"),  # buffer, recomputed
)

# Microsoft / GLIP naming, relative to "backbone.body.".
SWIN_RULES = _sections(
    conv("patch_embed.proj", "patch_embed/proj"),
    norm("patch_embed.norm", "patch_embed/norm"),
    SWIN_BLOCK_RULES.under("layers.{s}.blocks.{b}.", "layers_{s}/blocks_{b}/"),
    norm("layers.{s}.downsample.norm", "layers_{s}/downsample/norm"),
    linear("layers.{s}.downsample.reduction", "layers_{s}/downsample/reduction", bias=False),
    norm("norm{s}", "norm{s}"),
)

# Relative to "backbone.fpn.".
FPN_RULES = _sections(
    conv("fpn_inner{k}", "fpn_inner{k}"),
    conv("fpn_layer{k}", "fpn_layer{k}"),
    conv("top_blocks.p6", "top_blocks/p6"),
    conv("top_blocks.p7", "top_blocks/p7"),
)

# Relative to "rpn.anchor_generator.": the anchors are recomputed from the config.
ANCHOR_GENERATOR_RULES = ignored("cell_anchors.{i}")

# Relative to "rpn.head.dyhead_tower.{t}.b_attn.": the image-text fusion block.
FUSION_RULES = _sections(
    param("gamma_v", "gamma_v"),
    param("gamma_l", "gamma_l"),
    norm("layer_norm_v", "layer_norm_v"),
    norm("layer_norm_l", "layer_norm_l"),
    *(linear(f"attn.{n}", f"attn/{n}") for n in
      ("v_proj", "l_proj", "values_v_proj", "values_l_proj", "out_v_proj", "out_l_proj")),
)

# Relative to "rpn.head.dyhead_tower.{t}.": one DyConv layer.
DYCONV_RULES = _sections(
    conv("DyConv.{k}.conv", "DyConv_{k}/conv"),
    norm("DyConv.{k}.bn", "DyConv_{k}/bn"),  # a GroupNorm despite the name
    conv("AttnConv.1", "AttnConv_1"),
    linear("relu.fc.0", "relu/fc_0"),
    linear("relu.fc.2", "relu/fc_2"),
    conv("offset", "offset"),
)

# Relative to "rpn.head.": the tower (fusion, BERT layer and DyConv entries told apart
# by their sub-names) and the predictors.
HEAD_RULES = _sections(
    FUSION_RULES.under("dyhead_tower.{t}.b_attn.", "dyhead_tower_{t}/b_attn/"),
    BERT_LAYER_RULES.under("dyhead_tower.{t}.", "dyhead_tower_{t}/"),
    DYCONV_RULES.under("dyhead_tower.{t}.", "dyhead_tower_{t}/"),
    param("log_scale", "log_scale"),
    param("bias_lang", "bias_lang"),
    param("bias0", "bias0"),
    conv("cls_logits", "cls_logits"),
    conv("bbox_pred", "bbox_pred"),
    conv("centerness", "centerness"),
    linear("dot_product_projection_text", "dot_product_projection_text"),
    param("scales.{i}.scale", "scales_{i}/scale"),
)

# A whole released GLIP model ("module." already stripped).
GLIP_RULES = _sections(
    SWIN_RULES.under("backbone.body.", "backbone/body/"),
    FPN_RULES.under("backbone.fpn.", "backbone/fpn/"),
    BERT_RULES.under("language_backbone.body.model.", "language_backbone/"),
    HEAD_RULES.under("rpn.head.", "head/"),
    ANCHOR_GENERATOR_RULES.under("rpn.anchor_generator.", ""),
)

RULES: dict[str, RuleSet] = {
    "bert": BERT_RULES,
    "bert_layer": BERT_LAYER_RULES,
    "swin": SWIN_RULES,
    "fpn": FPN_RULES,
    "anchor_generator": ANCHOR_GENERATOR_RULES,
    "fusion": FUSION_RULES,
    "dyconv": DYCONV_RULES,
    "head": HEAD_RULES,
    "glip": GLIP_RULES,
}


# ----------------------------------------------------------------------------- loading


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads a .safetensors, .pth/.pt or .bin file into {name: numpy array} without
    running pickled code. A GLIP training checkpoint's "model" entry is unwrapped."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if not path.endswith((".pth", ".pt", ".bin")):
        raise ConversionError(note=f"Unknown checkpoint format {path!r} (want .safetensors, .pth, .pt, .bin).")
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(note=f"{path}: entries that are not tensors: {bad}")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in obj.items()}


def strip_module_prefix(state_dict: Mapping[str, Array]) -> StateDict:
    """Drops the "module." prefix that data-parallel wrappers add to every key."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def abstract_params(module: Any, *args: Any) -> Params:
    """Shapes and dtypes of module.init(rng, *args)["params"], without computing them."""
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)
    return meta.unbox(variables["params"])


# ----------------------------------------------------------------------------- both ways


def from_torch(
    state_dict: Mapping[str, Array], rules: RuleSet, expected: Params, prefix: str = ""
) -> Params:
    """Converts the keys of `state_dict` that start with `prefix` into a params tree
    shaped like `expected` (arrays or jax.ShapeDtypeStruct leaves). Keys outside the
    prefix belong to other parts and are left alone; within it, every key must map to
    an expected parameter of the right shape and every expected parameter must be
    found, otherwise ConversionError lists all problems."""
    state_dict = strip_module_prefix(state_dict)
    want = traverse_util.flatten_dict(expected, sep="/")
    found: dict[str, Array] = {}
    unexpected, mismatched, seen = [], [], set()
    for key in sorted(state_dict):
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if rules.ignores(name):
            continue
        hit = rules.torch_to_flax(name)
        if hit is None or hit[0] not in want:
            unexpected.append(key)
            continue
        path, transform = hit
        seen.add(path)
        value = transform.to_flax(np.asarray(state_dict[key]))
        if value.shape != tuple(want[path].shape):
            mismatched.append(
                f"{key}: torch {tuple(np.shape(state_dict[key]))} -> {path} {value.shape}, "
                f"expected {tuple(want[path].shape)}"
            )
            continue
        found[path] = value.astype(want[path].dtype)
    missing = []
    for path in sorted(set(want) - seen):
        hit = rules.flax_to_torch(path)
        missing.append(f"{prefix}{hit[0]} (for {path})" if hit else f"{path} (no rule)")
    if missing or unexpected or mismatched:
        note = "" if any(k.startswith(prefix) for k in state_dict) else f"No key starts with {prefix!r}."
        raise ConversionError(missing, unexpected, mismatched, note)
    return traverse_util.unflatten_dict(found, sep="/")


def to_torch(params: Params, rules: RuleSet, prefix: str = "") -> StateDict:
    """Params (plain or logically boxed) -> {torch name: numpy array}, the inverse of
    from_torch. Raises ConversionError for a parameter that no rule covers."""
    flat = traverse_util.flatten_dict(meta.unbox(params), sep="/")
    out, unmapped = {}, []
    for path, value in flat.items():
        hit = rules.flax_to_torch(path)
        if hit is None:
            unmapped.append(path)
            continue
        out[prefix + hit[0]] = hit[1].to_torch(np.asarray(value))
    if unmapped:
        raise ConversionError(unexpected=unmapped, note="Parameters without a torch name:")
    return out


# ----------------------------------------------------------------------------- per model


def _auto_bert_prefix(state_dict: Mapping[str, Array]) -> str:
    keys = strip_module_prefix(state_dict)
    return "bert." if any(k.startswith("bert.") for k in keys) else ""


def bert_params_from_torch(
    state_dict: Mapping[str, Array], config: BertConfig, prefix: str | None = None
) -> Params:
    """A Hugging Face BertModel state dict -> BertModel params. prefix None picks "bert."
    when the keys carry it (task-head checkpoints), else ""; GLIP's language model is
    under "language_backbone.body.model."."""
    if prefix is None:
        prefix = _auto_bert_prefix(state_dict)
    ids = jnp.zeros((1, 1), jnp.int32)
    expected = abstract_params(BertModel(config), ids, ids)
    return from_torch(state_dict, BERT_RULES, expected, prefix)


def bert_layer_params_from_torch(
    state_dict: Mapping[str, Array], config: BertConfig, prefix: str
) -> Params:
    """One BERT layer (e.g. GLIP's "rpn.head.dyhead_tower.1.") -> BertLayer params."""
    expected = abstract_params(
        BertLayer(config), jnp.zeros((1, 1, config.hidden_size)), jnp.ones((1, 1), jnp.int32)
    )
    return from_torch(state_dict, BERT_LAYER_RULES, expected, prefix)


def load_hf_bert(directory: str | os.PathLike) -> tuple[BertConfig, Params]:
    """Config and params of a local Hugging Face BERT folder (config.json plus
    model.safetensors or pytorch_model.bin), e.g. pretrained.minilm_dir()."""
    directory = pathlib.Path(directory)
    config = BertConfig.from_json_file(directory / "config.json")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return config, bert_params_from_torch(load_state_dict(directory / name), config)
    raise ConversionError(note=f"no model.safetensors or pytorch_model.bin in {directory}")


def swin_params_from_torch(
    state_dict: Mapping[str, Array], config: SwinConfig, prefix: str = "backbone.body."
) -> Params:
    """Microsoft/GLIP-named Swin weights -> SwinTransformer params (GLIP checkpoints keep
    them under "backbone.body."; a bare Swin checkpoint uses prefix "")."""
    expected = abstract_params(SwinTransformer(config), jnp.zeros((1, 32, 32, 3)))
    return from_torch(state_dict, SWIN_RULES, expected, prefix)


def fpn_params_from_torch(
    state_dict: Mapping[str, Array],
    in_channels: tuple[int, int, int],
    out_channels: int,
    prefix: str = "backbone.fpn.",
) -> Params:
    """FPN weights -> FPN params for inputs C3..C5 of `in_channels`."""
    feats = [jnp.zeros((1, 8 >> i, 8 >> i, c)) for i, c in enumerate(in_channels)]
    return from_torch(state_dict, FPN_RULES, abstract_params(FPN(out_channels), feats), prefix)


_HF_SWIN_TOP = (  # (regex, replacement) outside the blocks
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"embeddings\.norm\.", "patch_embed.norm."),
    (r"encoder\.layers\.(\d+)\.downsample\.", r"layers.\1.downsample."),
    (r"hidden_states_norms\.stage(\d+)\.", lambda m: f"norm{int(m[1]) - 1}."),
)
# Block sub-modules, in both the transformers 4.x and 5.x spellings.
_HF_SWIN_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "attention.self": "attn",  # relative_position_bias_table / _index
    "attention.relative_position_bias": "attn",
}
_HF_SWIN_QKV = {
    "attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2,
    "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
}
_HF_BLOCK_KEY = re.compile(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(\w+)\Z")


def swin_state_dict_from_hf(state_dict: Mapping[str, Array]) -> StateDict:
    """A Hugging Face SwinModel / SwinBackbone state dict (transformers 4.x or 5.x names)
    -> Microsoft naming: separate query/key/value fused into attn.qkv (rows q|k|v),
    SwinBackbone's per-stage norms hidden_states_norms.stage{k} -> norm{k-1}, a leading
    "swin." dropped. Keys it does not know (e.g. SwinModel's final "layernorm.") pass
    through unchanged, so that the converter reports them."""
    out: StateDict = {}
    qkv: dict[tuple[str, str, str], dict[int, Array]] = {}
    for key, value in strip_module_prefix(state_dict).items():
        key, value = key.removeprefix("swin."), np.asarray(value)
        m = _HF_BLOCK_KEY.match(key)
        if m and m[3] in _HF_SWIN_QKV:
            qkv.setdefault((m[1], m[2], m[4]), {})[_HF_SWIN_QKV[m[3]]] = value
            continue
        if m and m[3] in _HF_SWIN_BLOCK:
            key = f"layers.{m[1]}.blocks.{m[2]}.{_HF_SWIN_BLOCK[m[3]]}.{m[4]}"
        else:
            for pattern, repl in _HF_SWIN_TOP:
                key, n = re.subn(r"\A" + pattern, repl, key)
                if n:
                    break
        out[key] = value
    for (s, b, kind), parts in qkv.items():
        if len(parts) != 3:
            raise ConversionError(note=f"Swin stage {s} block {b}: incomplete q/k/v {kind}.")
        out[f"layers.{s}.blocks.{b}.attn.qkv.{kind}"] = np.concatenate([parts[i] for i in range(3)], axis=0)
    return out


# ----------------------------------------------------------------------------- GLIP


def _need(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise ConversionError(note=f"official config lacks {path}")
        node = node[key]
    return node


def glip_config_from_official(
    config_yaml: str | os.PathLike, bert_config: str | os.PathLike | None = None
) -> GLIPConfig:
    """A GLIPConfig from an official GLIP yacs config (a repository yaml or a dumped
    merged config) plus the Hugging Face config of its language model (the official
    config names the model instead of listing sizes; default bert-base-uncased)."""
    import yaml

    with open(config_yaml) as f:
        m = _need(yaml.safe_load(f), "MODEL")
    body = str(_need(m, "BACKBONE.CONV_BODY"))
    if not body.startswith("SWINT-FPN-RETINANET"):
        raise ConversionError(note=f"unsupported backbone {body!r} (want SWINT-FPN-RETINANET)")
    if _need(m, "RPN_ARCHITECTURE") != "VLDYHEAD":
        raise ConversionError(note=f"unsupported head {m['RPN_ARCHITECTURE']!r} (want VLDYHEAD)")
    if bert_config is None:
        model_type = _need(m, "LANGUAGE_BACKBONE.MODEL_TYPE")
        if model_type != "bert-base-uncased":
            raise ConversionError(note=f"language model {model_type!r}: pass its Hugging Face config")
        text = BertConfig.bert_base_uncased()
    else:
        text = BertConfig.from_json_file(bert_config)
    lang_dim = _need(m, "LANGUAGE_BACKBONE.LANG_DIM")
    if lang_dim != text.hidden_size:
        raise ConversionError(note=f"LANG_DIM {lang_dim} differs from the BERT width {text.hidden_size}")

    swin = SwinConfig(
        embed_dim=_need(m, "SWINT.EMBED_DIM"),
        depths=tuple(_need(m, "SWINT.DEPTHS")),
        num_heads=tuple(_need(m, "SWINT.NUM_HEADS")),
        window_size=_need(m, "SWINT.WINDOW_SIZE"),
        mlp_ratio=float(_need(m, "SWINT.MLP_RATIO")),
        drop_path_rate=float(_need(m, "SWINT.DROP_PATH_RATE")),
    )
    fuse = _need(m, "DYHEAD.FUSE_CONFIG")
    use_fusion = bool(fuse["EARLY_FUSE_ON"]) and fuse["TYPE"] == "MHA-B"
    if fuse["EARLY_FUSE_ON"] and not use_fusion:
        raise ConversionError(note=f"unsupported fusion type {fuse['TYPE']!r} (want MHA-B)")
    head = HeadConfig(
        channels=_need(m, "DYHEAD.CHANNELS"),
        num_layers=_need(m, "DYHEAD.NUM_CONVS"),
        text=text,
        use_fusion=use_fusion,
        align_fused_text=bool(fuse.get("USE_FUSED_FEATURES_DOT_PRODUCT", True)),
        deformable=bool(_need(m, "DYHEAD").get("USE_DFCONV", False)),  # the reference's default
        num_classes=_need(m, "DYHEAD.NUM_CLASSES") - 1,
        prior_prob=float(_need(m, "DYHEAD.PRIOR_PROB")),
        log_scale_init=float(_need(m, "DYHEAD.LOG_SCALE")),
    )
    return GLIPConfig(
        swin=swin,
        head=head,
        fpn_channels=_need(m, "BACKBONE.OUT_CHANNELS"),
        strides=tuple(_need(m, "RPN.ANCHOR_STRIDE")),
        anchor_sizes=tuple(_need(m, "RPN.ANCHOR_SIZES")),
        max_text_len=_need(m, "LANGUAGE_BACKBONE.MAX_QUERY_LEN"),
        postprocess=PostprocessConfig(
            pre_nms_thresh=float(_need(m, "ATSS.INFERENCE_TH")),
            pre_nms_top_n=_need(m, "ATSS.PRE_NMS_TOP_N"),
            nms_thresh=float(_need(m, "ATSS.NMS_TH")),
            max_detections=_need(m, "ATSS.DETECTIONS_PER_IMG"),
        ),
    )


def glip_abstract_params(config: GLIPConfig) -> Params:
    """Shapes of a GLIP model's params (nothing computed)."""
    size = SIZE_DIVISIBILITY * 2
    ids = jnp.zeros((1, 4), jnp.int32)
    return abstract_params(GLIP(config), jnp.zeros((1, size, size, 3)), ids, ids)


def glip_params_from_torch(state_dict: Mapping[str, Array], config: GLIPConfig) -> Params:
    """A released GLIP state dict ("module." prefixes allowed) -> GLIP params."""
    return from_torch(state_dict, GLIP_RULES, glip_abstract_params(config))


def load_official_glip(
    checkpoint: str | os.PathLike,
    config_yaml: str | os.PathLike,
    bert_config: str | os.PathLike | None = None,
) -> tuple[GLIPConfig, Params]:
    """Config and params of an official GLIP checkpoint (e.g. glip_tiny_model_o365_goldg.pth
    with configs/pretrain/glip_Swin_T_O365_GoldG.yaml)."""
    config = glip_config_from_official(config_yaml, bert_config)
    return config, glip_params_from_torch(load_state_dict(checkpoint), config)
