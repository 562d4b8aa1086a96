"""The converter: rules both ways, error reporting, prefixes, and the official GLIP
checkpoint's backbone, FPN and BERT keys."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util

from glipjax import convert
from glipjax.models.bert import BertConfig, BertModel
from glipjax.models.fpn import FPN
from glipjax.models.swin import SwinConfig, SwinTransformer


@pytest.fixture(scope="module")
def golden_state(golden_dir) -> dict:
    return convert.load_state_dict(golden_dir / "glip_official_tiny" / "glip_tiny_official.pth")


@pytest.fixture(scope="module")
def golden_bert_config(golden_dir) -> BertConfig:
    return BertConfig.from_json_file(golden_dir / "glip_official_tiny" / "bert_config.json")


def _assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


SWIN = SwinConfig(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2, out_norm_stages=(1,))
BERT = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=8)


@pytest.mark.parametrize("name", ["swin", "fpn", "bert"])
def test_round_trip_is_identity(name):
    key = jax.random.PRNGKey(0)
    if name == "swin":
        module, args = SwinTransformer(SWIN), (jnp.zeros((1, 8, 8, 3)),)
    elif name == "fpn":
        module, args = FPN(8), ([jnp.zeros((1, 4 >> i, 4 >> i, c)) for i, c in enumerate((4, 8, 16))],)
    else:
        module, args = BertModel(BERT), (jnp.zeros((1, 4), jnp.int32),) * 2
    params = jax.jit(module.init)(key, *args)["params"]  # logically boxed
    state = convert.to_torch(params, convert.RULES[name], prefix="module.part.")
    assert all(k.startswith("module.part.") for k in state)
    back = convert.from_torch(state, convert.RULES[name], convert.abstract_params(module, *args), "part.")
    _assert_trees_equal(back, nn.unbox(params))


def test_torch_layouts():
    params = jax.jit(SwinTransformer(SWIN).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    state = convert.to_torch(params, convert.RULES["swin"])
    assert state["patch_embed.proj.weight"].shape == (8, 3, 4, 4)  # [out, in, kh, kw]
    assert state["layers.1.blocks.0.attn.qkv.weight"].shape == (48, 16)  # [out, in], fused
    assert state["layers.0.downsample.reduction.weight"].shape == (16, 32)
    assert "layers.0.downsample.reduction.bias" not in state
    assert state["norm1.weight"].shape == (16,)
    assert state["layers.0.blocks.1.attn.relative_position_bias_table"].shape == (9, 1)


def test_errors_name_missing_unexpected_and_misshaped():
    module, feats = FPN(8), [jnp.zeros((1, 4 >> i, 4 >> i, c)) for i, c in enumerate((4, 8, 16))]
    expected = convert.abstract_params(module, feats)
    state = convert.to_torch(jax.jit(module.init)(jax.random.PRNGKey(0), feats)["params"], convert.FPN_RULES)
    del state["fpn_layer3.bias"]
    state["fpn_layer3.extra"] = np.zeros(3, np.float32)
    state["fpn_inner2.weight"] = np.zeros((8, 5, 1, 1), np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.from_torch(state, convert.FPN_RULES, expected)
    msg = str(err.value)
    for name in ("fpn_layer3.bias", "fpn_layer3.extra", "fpn_inner2.weight"):
        assert name in msg
    assert err.value.missing == ["fpn_layer3.bias (for fpn_layer3/bias)"]
    assert err.value.unexpected == ["fpn_layer3.extra"]
    assert len(err.value.mismatched) == 1 and "(8, 5, 1, 1)" in err.value.mismatched[0]
    with pytest.raises(convert.ConversionError, match="No key starts with 'backbone.fpn.'"):
        convert.fpn_params_from_torch(state, (4, 8, 16), 8)
    with pytest.raises(convert.ConversionError, match="without a torch name"):
        convert.to_torch({"fpn_inner2": {"kernel": np.zeros((1, 1, 4, 8)), "gamma": np.zeros(8)}},
                         convert.FPN_RULES)


def test_glip_checkpoint_both_ways(golden_state, golden_bert_config):
    """Every backbone, FPN and language key of the official checkpoint converts (with
    the "module." prefix) and converts back to the same name and array."""
    parts = {
        "backbone.body.": (convert.swin_params_from_torch(golden_state, SwinConfig.tiny()), "swin"),
        "backbone.fpn.": (convert.fpn_params_from_torch(golden_state, (64, 128, 256), 64), "fpn"),
        "language_backbone.body.model.": (
            convert.bert_params_from_torch(golden_state, golden_bert_config, "language_backbone.body.model."),
            "bert"),
        "rpn.head.dyhead_tower.4.": (
            convert.bert_layer_params_from_torch(golden_state, golden_bert_config, "rpn.head.dyhead_tower.4."),
            "bert_layer"),
    }
    for prefix, (params, rules) in parts.items():
        back = convert.to_torch(params, convert.RULES[rules], "module." + prefix)
        source = {k: v for k, v in golden_state.items() if k.startswith("module." + prefix)
                  and not k.endswith(("relative_position_index", "position_ids"))}
        assert back.keys() == source.keys(), prefix
        for k in back:
            np.testing.assert_array_equal(back[k], source[k], err_msg=k)
    # Parameter counts stated in the golden README (one of the two head BERT layers).
    counts = [sum(x.size for x in jax.tree.leaves(p)) for p, _ in parts.values()]
    assert counts == [2_282_862, 213_504, 4_369_408, 396_544 // 2]


def test_composed_table_reports_the_rest(golden_state, golden_bert_config):
    """Sections nest under prefixes into one table; whatever it does not cover is reported."""
    table = (convert.RULES["swin"].under("backbone.body.", "backbone/")
             + convert.RULES["fpn"].under("backbone.fpn.", "fpn/")
             + convert.RULES["bert"].under("language_backbone.body.model.", "language/")
             + convert.RULES["anchor_generator"].under("rpn.anchor_generator.", ""))
    expected = {
        "backbone": convert.abstract_params(SwinTransformer(SwinConfig.tiny()), jnp.zeros((1, 32, 32, 3))),
        "fpn": convert.abstract_params(FPN(64), [jnp.zeros((1, 8 >> i, 8 >> i, c)) for i, c in
                                                 enumerate((64, 128, 256))]),
        "language": convert.abstract_params(BertModel(golden_bert_config), *(jnp.zeros((1, 2), jnp.int32),) * 2),
    }
    with pytest.raises(convert.ConversionError) as err:
        convert.from_torch(golden_state, table, expected)
    assert not err.value.missing and not err.value.mismatched
    # Buffers (relative_position_index, position_ids, cell_anchors) are recognised, not reported.
    head = {k.removeprefix("module.") for k in golden_state if k.startswith("module.rpn.head.")}
    assert sorted(err.value.unexpected) == sorted(head)


def test_load_formats_and_prefixes(tmp_path):
    tensors = {"bert.embeddings.word_embeddings.weight": np.arange(6, dtype=np.float32).reshape(3, 2)}
    safetensors.numpy.save_file(tensors, tmp_path / "w.safetensors")
    torch.save({"model": {"module." + k: torch.tensor(v) for k, v in tensors.items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        state = convert.strip_module_prefix(convert.load_state_dict(tmp_path / name))
        np.testing.assert_array_equal(state["bert.embeddings.word_embeddings.weight"],
                                      tensors["bert.embeddings.word_embeddings.weight"])
    torch.save({"weight": torch.zeros(2), "step": 3}, tmp_path / "bad.pth")
    with pytest.raises(convert.ConversionError, match="not tensors"):
        convert.load_state_dict(tmp_path / "bad.pth")
    with pytest.raises(convert.ConversionError, match="Unknown checkpoint format"):
        convert.load_state_dict(tmp_path / "w.npz")
    # "bert." is found on its own; everything else of the model is then missing, by name.
    with pytest.raises(convert.ConversionError, match=r"bert\.encoder\.layer\.1\.output\.dense\.bias"):
        convert.bert_params_from_torch(tensors, BERT)


def test_import_pulls_in_neither_torch_nor_tensorflow():
    code = "import sys, glipjax.convert; print('torch' in sys.modules, 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
