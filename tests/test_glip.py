"""The assembled model: presets, parameter counts, a tiny training step, remat, and
whole-checkpoint conversion both ways."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from glipjax import convert
from glipjax.models.bert import BertConfig
from glipjax.models.glip import GLIP, PRESETS, detect, glip_tiny, losses

SIZE = 64
TEXT_LEN = 12


def tiny_config(**changes):
    text = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32)
    config = glip_tiny(text)
    # One block in the later Swin stages (a cheaper compile); the first keeps its shifted-window block.
    swin = dataclasses.replace(config.swin, depths=(2, 1, 1, 1))
    head = dataclasses.replace(config.head, fusion_embed_dim=64, fusion_heads=4)
    return dataclasses.replace(config, swin=swin, head=head, max_text_len=TEXT_LEN, **changes)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    ids = rng.integers(1, 120, size=(2, TEXT_LEN)).astype(np.int32)
    mask = np.ones((2, TEXT_LEN), np.int32)
    mask[1, 8:] = 0
    boxes = np.array([[[4, 6, 40, 50], [30, 10, 60, 30]], [[10, 10, 50, 60], [0, 0, 0, 0]]], np.float32)
    gt_mask = np.array([[True, True], [True, False]])
    pmap = np.zeros((2, 2, TEXT_LEN), np.float32)
    pmap[0, 0, 1:3] = pmap[0, 1, 4] = pmap[1, 0, 2] = 1
    return images, ids, mask, boxes, gt_mask, pmap


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = GLIP(config)
    images, ids, mask, *_ = batch()
    params = meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, ids, mask)["params"])
    return config, model, params


def _loss_fn(model, config):
    def loss(params, images, ids, mask, boxes, gt_mask, pmap, rng):
        out = model.apply({"params": params}, images, ids, mask, deterministic=False, rngs={"dropout": rng})
        parts = losses(config, out, boxes, gt_mask, pmap, mask, (SIZE, SIZE))
        return parts["total"], parts
    return loss


def test_published_parameter_counts():
    def total(name):
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
            convert.glip_abstract_params(PRESETS[name]())))
    assert total("glip_t") == 231_780_222
    assert total("glip_l") == 430_422_384
    assert abs(total("glip_t_a") - 151.4e6) / 151.4e6 < 0.01


@pytest.mark.slow
def test_tiny_forward_backward(tiny):
    config, model, params = tiny
    images, ids, mask, boxes, gt_mask, pmap = batch()
    grad_fn = jax.jit(jax.value_and_grad(_loss_fn(model, config), has_aux=True))
    (total, parts), grads = grad_fn(params, images, ids, mask, boxes, gt_mask, pmap, jax.random.PRNGKey(1))
    assert np.isfinite(float(total)) and float(total) > 0
    assert float(parts["num_positives"]) > 0 and float(parts["giou"]) > 0
    flat = traverse_util.flatten_dict(jax.device_get(grads), sep="/")
    assert all(np.all(np.isfinite(g)) for g in flat.values())
    # Every component learns: the image encoder, the text encoder and the head.
    for prefix in ("backbone/body", "backbone/fpn", "language_backbone", "head/dyhead_tower_0", "head/dyhead_tower_2"):
        norm = sum(float(np.sum(np.square(g))) for k, g in flat.items() if k.startswith(prefix))
        assert norm > 0, prefix


def test_remat_checkpoints_every_part(tiny):
    config, model, params = tiny
    args = batch()

    def grad_jaxpr(cfg):
        fn = jax.grad(lambda p: _loss_fn(GLIP(cfg), cfg)(p, *args, jax.random.PRNGKey(2))[0])
        return str(jax.make_jaxpr(fn)(params))

    def regions(jaxpr: str) -> int:  # the remat primitive prints as remat2 or checkpoint
        return len(re.findall(r"\b(?:remat\d*|checkpoint)\[", jaxpr))

    assert regions(grad_jaxpr(config)) == 0
    # One rematerialised region per Swin block (5), BERT layer (1), and head fusion,
    # BERT layer and DyConv (2 layers x 3).
    assert regions(grad_jaxpr(dataclasses.replace(config, remat=True))) == 12


def test_scan_layers_reaches_both_stacks(tiny):
    """GLIPConfig.scan_layers scans the language model's layers and the head's (their
    equality with the unrolled layers is tested in test_bert and test_dyhead)."""
    config, _, params = tiny
    images, ids, mask, *_ = batch()

    def scans(cfg):
        jaxpr = jax.make_jaxpr(lambda p: GLIP(cfg).apply({"params": p}, images, ids, mask))(params)
        return len(re.findall(r"\bscan\[", str(jaxpr)))

    assert scans(config) == 0 and scans(dataclasses.replace(config, scan_layers=True)) == 2


def test_detect_shapes(tiny):
    config, model, params = tiny
    images, ids, mask, *_ = batch()
    out = jax.jit(model.apply)({"params": params}, images, ids, mask)
    pmap = np.zeros((3, TEXT_LEN), np.float32)
    pmap[0, 1] = pmap[1, 2:4] = pmap[2, 5] = 1
    dets = jax.jit(lambda *args: detect(config, *args, (SIZE, SIZE), pre_nms_thresh=0.0))(
        out, jnp.asarray(pmap), jnp.array([True, True, False]), jnp.array([[SIZE, SIZE], [50, 60]]))
    assert dets.boxes.shape == (2, config.postprocess.max_detections, 4)
    valid = np.asarray(dets.valid)
    labels = np.asarray(dets.labels)[valid]
    assert valid.any() and set(labels) <= {1, 2}  # the masked third phrase never appears
    boxes = np.asarray(dets.boxes[1])[np.asarray(dets.valid[1])]
    assert boxes[:, [0, 2]].max() <= 59 and boxes[:, [1, 3]].max() <= 49  # clipped to the real size


def test_parts_compose_to_the_whole_model(tiny):
    """encode_images, encode_text and fuse give the whole model's outputs, also when
    one prompt's text is encoded once and broadcast to the batch (glipjax.inference)."""
    _, model, params = tiny
    images, ids, mask, *_ = batch()
    ids, mask = np.tile(ids[:1], (2, 1)), np.tile(mask[:1], (2, 1))  # one prompt for both images
    whole = jax.jit(model.apply)({"params": params}, images, ids, mask)

    @jax.jit
    def parts(params, images, ids, mask):
        _, pyramid = model.apply({"params": params}, images, method=GLIP.encode_images)
        text = model.apply({"params": params}, ids[:1], mask[:1], method=GLIP.encode_text)
        return model.apply({"params": params}, pyramid, jnp.broadcast_to(text, (2,) + text.shape[1:]), mask,
                           method=GLIP.fuse)

    split = parts(params, images, ids, mask)
    for key in ("dot_product_logits", "bbox_reg", "centerness"):
        for a, b in zip(split[key], whole[key]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=key)


def test_unpadded_image_is_rejected(tiny):
    _, model, params = tiny
    images, ids, mask, *_ = batch()
    with pytest.raises(ValueError, match="multiple of 32"):
        model.apply({"params": params}, images[:, :40], ids, mask)


def test_whole_model_round_trip_and_error_report(tiny):
    config, _, params = tiny
    state = convert.to_torch(params, convert.GLIP_RULES)
    assert "rpn.head.dyhead_tower.0.b_attn.attn.v_proj.weight" in state
    assert "backbone.body.layers.0.blocks.0.attn.qkv.weight" in state
    back = convert.glip_params_from_torch({f"module.{k}": v for k, v in state.items()}, config)
    for (ka, a), (kb, b) in zip(sorted(traverse_util.flatten_dict(params, sep="/").items()),
                                sorted(traverse_util.flatten_dict(back, sep="/").items())):
        assert ka == kb
        np.testing.assert_array_equal(a, b)

    broken = dict(state)
    del broken["rpn.head.bias0"]
    broken["rpn.head.extra.weight"] = np.zeros(3, np.float32)
    broken["rpn.head.log_scale"] = np.zeros(2, np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.glip_params_from_torch(broken, config)
    message = str(err.value)
    assert "rpn.head.bias0" in message and "rpn.head.extra.weight" in message and "rpn.head.log_scale" in message


def test_config_from_fields_and_bundled_text_encoder():
    import ml_collections

    from glipjax import pretrained
    from glipjax.models.glip import config_from_fields

    text, text_params = convert.load_hf_bert(pretrained.minilm_dir())
    fields = ml_collections.ConfigDict(dict(preset="glip_tiny", head_layers=1, fusion_embed_dim=256, fusion_heads=0,
                                            fpn_channels=128, anchor_sizes=(16, 32, 64, 128, 256), remat=True,
                                            scan_layers=True))
    config = config_from_fields(fields, text, max_text_len=64)
    assert config.text.hidden_size == 384 and config.head.text_width == 384
    assert config.scan_layers and not config_from_fields(ml_collections.ConfigDict(dict(preset="glip_tiny"))).scan_layers
    assert config.head.fusion_embed_dim == 256 and config.head.fusion_heads == 8  # 0 keeps the preset
    assert config.head.num_layers == 1 and glip_tiny().head.num_layers == 2
    assert config.fpn_channels == config.head.channels == 128 and glip_tiny().fpn_channels == 64
    assert config.anchor_sizes == (16, 32, 64, 128, 256) and config.max_text_len == 64 and config.remat
    assert config.swin.drop_path_rate == glip_tiny().swin.drop_path_rate == 0.2  # dropout absent: the preset's
    assert config.head.fusion_dropout == 0.1 and config.text.hidden_dropout_prob == 0.1
    fields.dropout = False
    quiet = config_from_fields(fields, text, max_text_len=64)
    assert quiet.swin.drop_path_rate == quiet.head.fusion_dropout == 0.0
    assert quiet.text.hidden_dropout_prob == quiet.text.attention_probs_dropout_prob == 0.0
    assert quiet.swin.embed_dim == config.swin.embed_dim and quiet.head.channels == config.head.channels
    expected = convert.glip_abstract_params(config)["language_backbone"]
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(text_params)
    with pytest.raises(ValueError, match="unknown model preset"):
        config_from_fields(ml_collections.ConfigDict(dict(preset="glip_xl")))


def test_text_layers_keep_the_first_pretrained_layers():
    from glipjax import pretrained, train_state
    from glipjax.config import load_config

    _, full = convert.load_hf_bert(pretrained.minilm_dir())
    _, config, text_params = train_state.build_model(load_config("configs/demo.py", ["--config.model.text_layers=4"]))
    assert config.text.num_hidden_layers == 4 and sorted(text_params["encoder"]) == [f"layer_{i}" for i in range(4)]
    expected = convert.glip_abstract_params(config)["language_backbone"]
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(text_params)
    for kept, original in zip(jax.tree.leaves(text_params), jax.tree.leaves({**full, "encoder": {
            k: v for k, v in full["encoder"].items() if k in text_params["encoder"]}})):
        np.testing.assert_array_equal(kept, original)
    with pytest.raises(ValueError, match="text_layers must be in 1..6"):
        train_state.build_model(load_config("configs/demo.py", ["--config.model.text_layers=7"]))
