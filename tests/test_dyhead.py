"""VLDyHead: DyConv / DyReLU / alignment logits vs numpy formulas, the whole head
against the official GLIP golden outputs, and a forward/backward smoke test.

Tolerances: numpy formula checks 1e-5 absolute (float32 compute, O(1) values);
golden comparison 1e-5 absolute (measured max 2.5e-6 on values up to ~5).
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from glipjax.models.bert import BertConfig
from glipjax.models.dcn import modulated_deform_conv
from glipjax.models.dyhead import DyConv, DyReLU, HeadConfig, VLDyHead, hard_sigmoid, l2_normalize

TOL = 1e-5
TINY = HeadConfig(
    channels=16, num_layers=2, fusion_embed_dim=32, fusion_heads=4, group_norm_groups=4, num_classes=3,
    num_levels=3,
    text=BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48),
)
# Three levels exercise every DyConv case: no finer level, both neighbours, no coarser level.
TINY_SIZES = [(8, 10), (4, 5), (2, 3)]


def _perturb(params, seed, scale=0.1):
    flat = flatten_dict(nn.meta.unbox(params))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return unflatten_dict(
        {k: v + scale * jax.random.normal(kk, v.shape) for kk, (k, v) in zip(keys, flat.items())}
    )


def _random_params(module, seed, *args, scale=0.3):
    """Random parameters of the right shapes without compiling init: N(0, scale),
    plus 1 on norm scales."""
    shapes = flatten_dict(nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"]))
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return unflatten_dict({
        k: scale * jax.random.normal(kk, v.shape) + (1.0 if k[-1] == "scale" else 0.0)
        for kk, (k, v) in zip(keys, shapes.items())
    })


def _hsig(x):
    return np.minimum(np.maximum(x + 3, 0), 6) / 6


# ----------------------------------------------------------------------------- DyReLU


def test_hard_sigmoid():
    x = np.linspace(-5, 5, 41, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(hard_sigmoid(jnp.asarray(x))), _hsig(x), atol=1e-7)


def _numpy_dyrelu(p, x):
    c = x.shape[-1]
    y = np.maximum(x.mean((1, 2)) @ p["fc_0"]["kernel"] + p["fc_0"]["bias"], 0)
    y = _hsig(y @ p["fc_2"]["kernel"] + p["fc_2"]["bias"])[:, None, None, :]
    a1, b1, a2, b2 = (y[..., i * c:(i + 1) * c] for i in range(4))
    return np.maximum(x * (2 * (a1 - 0.5) + 1) + (b1 - 0.5), x * (2 * (a2 - 0.5)) + (b2 - 0.5))


def test_dyrelu_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 8)).astype(np.float32)
    module = DyReLU()
    params = _random_params(module, 1, x, scale=0.5)
    got = np.asarray(module.apply({"params": params}, x))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    assert p["fc_0"]["kernel"].shape == (8, 2) and p["fc_2"]["kernel"].shape == (2, 32)
    np.testing.assert_allclose(got, _numpy_dyrelu(p, x.astype(np.float64)), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- DyConv


def _numpy_conv3x3(x, kernel, bias):
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1])) + bias
    for i in range(3):
        for j in range(3):
            out += xp[:, i:i + h, j:j + w] @ kernel[i, j]
    return out


def _numpy_group_norm(x, p, groups, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mu = g.mean((1, 2, 4), keepdims=True)
    var = ((g - mu) ** 2).mean((1, 2, 4), keepdims=True)
    return ((g - mu) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def _numpy_resize_align_corners(x, out_h, out_w):
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c))
    for oy in range(out_h):
        sy = oy * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = int(np.floor(sy))
        y1, ly = min(y0 + 1, h - 1), sy - y0
        for ox in range(out_w):
            sx = ox * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = int(np.floor(sx))
            x1, lx = min(x0 + 1, w - 1), sx - x0
            out[:, oy, ox] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                              + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
    return out


def _prefix_read(maps, hc, wc):
    b, h, w, c = maps.shape
    flat = maps.transpose(0, 3, 1, 2).reshape(b, -1)[:, : c * hc * wc]
    return flat.reshape(b, c, hc, wc).transpose(0, 2, 3, 1)


def _numpy_dyconv(p, levels, groups, deformable=True):
    """DyConv from its description; the deformable conv itself is the (separately
    tested) modulated_deform_conv, everything around it is numpy float64."""

    def branch(k, x, offset, mask, stride):
        conv = p[f"DyConv_{k}"]["conv"]
        if deformable:
            y = np.asarray(modulated_deform_conv(x, offset, mask, conv["kernel"], conv["bias"], stride=stride))
        else:  # a stride-2 conv with padding 1 reads every other output of the stride-1 one
            y = _numpy_conv3x3(x.astype(np.float64), conv["kernel"], conv["bias"])[:, ::stride, ::stride]
        return _numpy_group_norm(y.astype(np.float64), p[f"DyConv_{k}"]["bn"], groups)

    outs = []
    for level, x in enumerate(levels):
        h, w = x.shape[1:3]
        offset = mask = np.zeros((x.shape[0], h, w, 27))  # read only by deformable convs
        if deformable:
            om = _numpy_conv3x3(x.astype(np.float64), p["offset"]["kernel"], p["offset"]["bias"])
            offset, mask = om[..., :18], 1 / (1 + np.exp(-om[..., 18:]))
        branches = [branch(1, x, offset, mask, 1)]
        if level > 0:
            branches.append(branch(2, levels[level - 1], offset, mask, 2))
        if level < len(levels) - 1:
            hc, wc = levels[level + 1].shape[1:3]
            coarse = branch(0, levels[level + 1], _prefix_read(offset, hc, wc), _prefix_read(mask, hc, wc), 1)
            branches.append(_numpy_resize_align_corners(coarse, h, w))
        attn = p["AttnConv_1"]
        weights = [_hsig(np.maximum(bb.mean((1, 2)) @ attn["kernel"][0, 0] + attn["bias"], 0))
                   for bb in branches]
        mixed = np.mean([bb * wt[:, None, None, :] for bb, wt in zip(branches, weights)], axis=0)
        outs.append(_numpy_dyrelu(p["relu"], mixed))
    return outs


@pytest.mark.parametrize("deformable", [True, False])
def test_dyconv_matches_numpy(deformable):
    cfg = HeadConfig(channels=8, group_norm_groups=2, num_levels=3, deformable=deformable)
    rng = np.random.default_rng(2)
    levels = [rng.normal(size=(2, h, w, 8)).astype(np.float32) for h, w in [(6, 7), (3, 4), (2, 2)]]
    module = DyConv(cfg)
    params = _random_params(module, 3, levels)
    assert ("offset" in params) == deformable
    got = jax.jit(module.apply)({"params": params}, levels)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = _numpy_dyconv(p, levels, 2, deformable)
    for g, wnt, x in zip(got, want, levels):
        assert g.shape == x.shape
        np.testing.assert_allclose(np.asarray(g), wnt, atol=TOL, rtol=0)


def test_dyconv_rejects_levels_that_do_not_halve():
    levels = [jnp.zeros((1, 6, 6, 8)), jnp.zeros((1, 2, 2, 8))]
    with pytest.raises(ValueError, match="must be followed by one of size"):
        jax.eval_shape(DyConv(HeadConfig(channels=8, group_norm_groups=2, num_levels=2)).init,
                       jax.random.key(0), levels)


# ----------------------------------------------------------------------------- whole head


@pytest.fixture(scope="module")
def tiny_head():
    rng = np.random.default_rng(4)
    feats = [jnp.asarray(rng.normal(size=(2, h, w, TINY.channels)), jnp.float32) for h, w in TINY_SIZES]
    text = jnp.asarray(rng.normal(size=(2, 7, TINY.text_width)), jnp.float32)
    mask = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
    module = VLDyHead(TINY)
    variables = jax.jit(module.init)(jax.random.key(0), feats, text, mask)
    params = _perturb(variables["params"], 5)
    forward = jax.jit(lambda p, f, t, m: module.apply({"params": p}, f, t, m, return_intermediates=True))
    return variables, params, feats, text, mask, forward(params, feats, text, mask)


def test_output_shapes(tiny_head):
    _, _, feats, text, _, out = tiny_head
    for level, (h, w) in enumerate(TINY_SIZES):
        assert out["bbox_reg"][level].shape == (2, h, w, 4)
        assert out["centerness"][level].shape == (2, h, w, 1)
        assert out["cls_logits"][level].shape == (2, h, w, TINY.num_classes)
        assert out["dot_product_logits"][level].shape == (2, h * w, 7)
        assert out["features"][level].shape == feats[level].shape
    assert out["text"].shape == text.shape
    assert len(out["intermediates"]) == TINY.num_layers
    assert set(out["intermediates"][0]) == {"fusion_visual", "fusion_text", "bert_text", "dyconv"}
    np.testing.assert_array_equal(np.asarray(out["text"]), np.asarray(out["intermediates"][-1]["bert_text"]))


def test_alignment_logits_and_predictors_match_numpy(tiny_head):
    _, params, _, _, _, out = tiny_head
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    text = np.asarray(out["text"], np.float64)
    e = text / np.maximum(np.linalg.norm(text, axis=-1, keepdims=True), 1e-12)
    tokens = (e / 2) @ p["dot_product_projection_text"]["kernel"] + p["dot_product_projection_text"]["bias"]
    bias = e @ p["bias_lang"] + p["bias0"]
    for level, v in enumerate(out["features"]):
        v = np.asarray(v, np.float64)
        b, h, w, c = v.shape
        want = v.reshape(b, h * w, c) @ tokens.transpose(0, 2, 1) / np.exp(p["log_scale"]) + bias[:, None, :]
        np.testing.assert_allclose(np.asarray(out["dot_product_logits"][level]), want, atol=TOL, rtol=0)
        bbox = (v @ p["bbox_pred"]["kernel"][0, 0] + p["bbox_pred"]["bias"]) * p[f"scales_{level}"]["scale"]
        np.testing.assert_allclose(np.asarray(out["bbox_reg"][level]), bbox, atol=TOL, rtol=0)
        ctr = v @ p["centerness"]["kernel"][0, 0] + p["centerness"]["bias"]  # no Scale here
        np.testing.assert_allclose(np.asarray(out["centerness"][level]), ctr, atol=TOL, rtol=0)


def test_every_param_has_logical_axes_and_reference_inits(tiny_head):
    variables = tiny_head[0]
    flat = flatten_dict(variables["params"], sep="/")
    for name, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned), name
        assert len(leaf.names) == leaf.value.ndim, name
        assert leaf.value.dtype == jnp.float32, name
    p = {k: np.asarray(v.value) for k, v in flat.items()}
    np.testing.assert_allclose(p["bias0"], [-np.log(99.0)], rtol=1e-6)
    np.testing.assert_array_equal(p["log_scale"], [0.0])
    np.testing.assert_array_equal(p["bias_lang"], np.zeros(TINY.text_width))
    np.testing.assert_allclose(p["cls_logits/bias"], np.full(3, -np.log(99.0)), rtol=1e-6)
    assert np.abs(p["bbox_pred/kernel"]).max() < 0.05 and not p["bbox_pred/bias"].any()
    np.testing.assert_array_equal(p["scales_2/scale"], [1.0])
    np.testing.assert_array_equal(p["dyhead_tower_3/b_attn/gamma_v"], np.full(16, 1 / TINY.num_layers))
    assert p["dyhead_tower_2/AttnConv_1/kernel"].shape == (1, 1, 16, 1)
    assert p["dyhead_tower_5/relu/fc_2/kernel"].shape == (4, 64)
    assert p["dyhead_tower_4/attention/self/query/kernel"].shape == (24, 24)


def _output_loss(o):
    return sum(jnp.mean(jnp.square(x)) for k in ("bbox_reg", "centerness", "dot_product_logits", "cls_logits")
               for x in o[k])


def test_scanned_layers_match_unrolled(tiny_head):
    """The layers as one scan (with remat) give the same outputs, intermediates and
    gradients from the same params, in a program that holds one layer."""
    _, params, feats, text, mask, out = tiny_head
    heads = [VLDyHead(dataclasses.replace(TINY, **changes)) for changes in ({}, dict(scan_layers=True, remat=True))]
    scanned = jax.jit(lambda p: heads[1].apply({"params": p}, feats, text, mask, return_intermediates=True))(params)
    for key in ("dot_product_logits", "bbox_reg", "centerness", "text", "intermediates"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL), out[key], scanned[key])
    grads = [jax.jit(jax.grad(lambda p, h=h: _output_loss(h.apply({"params": p}, feats, text, mask))))(params)
             for h in heads]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)
    dots = lambda head, p: len(re.findall(r"\bdot_general\[", str(jax.make_jaxpr(
        lambda q: head.apply({"params": q}, feats, text, mask))(p))))
    one = VLDyHead(dataclasses.replace(TINY, num_layers=1))
    one_params = nn.meta.unbox(jax.eval_shape(one.init, jax.random.key(0), feats, text, mask)["params"])
    assert dots(heads[1], params) == dots(one, one_params) < dots(heads[0], params)


@pytest.mark.slow
def test_forward_backward_with_remat(tiny_head):
    _, params, feats, text, mask, out = tiny_head
    remat = VLDyHead(dataclasses.replace(TINY, remat=True))

    def loss_fn(p):
        return _output_loss(remat.apply({"params": p}, feats, text, mask))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    flat = flatten_dict(grads, sep="/")
    assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
    for name in ("dyhead_tower_0/b_attn/attn/v_proj/kernel", "dyhead_tower_0/b_attn/gamma_l",
                 "dyhead_tower_1/attention/self/key/kernel", "dyhead_tower_2/DyConv_0/conv/kernel",
                 "dyhead_tower_2/offset/kernel", "dyhead_tower_5/relu/fc_0/kernel",
                 "dot_product_projection_text/kernel", "log_scale", "bias_lang"):
        assert np.abs(flat[name]).max() > 0, name
    # Rematerialisation does not change values: the loss equals the plain forward's.
    np.testing.assert_allclose(float(loss), float(_output_loss(out)), rtol=1e-6)


def test_glip_t_a_tower_and_masked_alignment(tiny_head):
    _, params, feats, text, mask, _ = tiny_head
    cfg = dataclasses.replace(TINY, use_fusion=False)
    module = VLDyHead(cfg)
    shapes = jax.eval_shape(module.init, jax.random.key(0), feats, text, mask)["params"]
    assert sorted(k for k in shapes if k.startswith("dyhead_tower")) == ["dyhead_tower_0", "dyhead_tower_1"]
    assert set(shapes["dyhead_tower_1"]) == {
        "DyConv_0", "DyConv_1", "DyConv_2", "AttnConv_1", "relu", "offset"
    }
    # Reuse the fused head's DyConv layers (tower 3i + 2) as the DyConv-only tower i.
    p = {k: v for k, v in params.items() if not k.startswith("dyhead_tower")}
    p.update(dyhead_tower_0=params["dyhead_tower_2"], dyhead_tower_1=params["dyhead_tower_5"])
    out = jax.jit(module.apply)({"params": p}, feats, text, mask)
    # The DyConv-only tower as one scan gives the same outputs.
    scanned = jax.jit(VLDyHead(dataclasses.replace(cfg, scan_layers=True)).apply)({"params": p}, feats, text, mask)
    for key in ("dot_product_logits", "bbox_reg", "centerness"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out[key], scanned[key])
    np.testing.assert_array_equal(np.asarray(out["text"][1, :4]), np.asarray(text[1, :4]))
    np.testing.assert_array_equal(np.asarray(out["text"][1, 4:]), 0.0)
    # Padded tokens are zeroed before normalisation: their logit is (v . proj_bias) / s + bias0.
    v = np.asarray(out["features"][0][1], np.float64).reshape(-1, cfg.channels)
    proj_bias = np.asarray(p["dot_product_projection_text"]["bias"])
    want = v @ proj_bias / np.exp(float(p["log_scale"][0])) + float(p["bias0"][0])
    for token in (4, 5, 6):
        got = np.asarray(out["dot_product_logits"][0][1, :, token])
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_l2_normalize_keeps_zero_rows_with_a_finite_gradient():
    x = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]], jnp.float32)
    np.testing.assert_allclose(np.asarray(l2_normalize(x)), [[0.6, 0.8], [0, 0], [0.1, 0]], rtol=1e-6)
    # Padded (zero) text rows are normalised when regions align with the input text;
    # a prompt-tuning offset added there needs a finite gradient.
    grad = jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.asarray([1.0, 2.0])))(x)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(np.asarray(grad[0]), [(1 * 16 - 2 * 12) / 125, (2 * 9 - 1 * 12) / 125], rtol=1e-5)


def test_alignment_with_the_language_model_text_keeps_the_fusion(tiny_head):
    _, params, feats, text, mask, fused = tiny_head
    cfg = dataclasses.replace(TINY, align_fused_text=False)
    out = jax.jit(VLDyHead(cfg).apply)({"params": params}, feats, text, mask)
    # Same params, same tower: the visual features are still the fused ones (up to the
    # float32 rounding of another compiled graph)...
    for ours, theirs in zip(out["features"], fused["features"]):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=TOL, rtol=0)
    # ...but the regions are aligned with the masked input text, not the head's BERT output.
    masked = np.asarray(text, np.float64) * np.asarray(mask)[..., None]
    np.testing.assert_array_equal(np.asarray(out["text"]), masked.astype(np.float32))
    e = masked / np.maximum(np.linalg.norm(masked, axis=-1, keepdims=True), 1e-12)
    proj = params["dot_product_projection_text"]
    tokens = (e / 2.0) @ np.asarray(proj["kernel"], np.float64) + np.asarray(proj["bias"], np.float64)
    bias = e @ np.asarray(params["bias_lang"], np.float64) + float(params["bias0"][0])
    v = np.asarray(out["features"][1], np.float64).reshape(2, -1, cfg.channels)
    want = np.einsum("bnc,blc->bnl", v, tokens) / np.exp(float(params["log_scale"][0])) + bias[:, None, :]
    np.testing.assert_allclose(np.asarray(out["dot_product_logits"][1]), want, atol=TOL, rtol=1e-5)
    assert not np.allclose(np.asarray(out["dot_product_logits"][1]), np.asarray(fused["dot_product_logits"][1]))


def test_golden_tiny_param_count():
    cfg = HeadConfig.golden_tiny()
    sizes = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
    feats = [jax.ShapeDtypeStruct((1, h, w, 64), jnp.float32) for h, w in sizes]
    text = jax.ShapeDtypeStruct((1, 4, 128), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    shapes = jax.eval_shape(VLDyHead(cfg).init, jax.random.key(0), feats, text, mask)
    # Official model: 2 fusions 2,377,216 + 2 BERT layers 396,544 + 2 DyConvs 264,408 + 13,916.
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 3_052_084


def test_bad_inputs_raise(tiny_head):
    variables, _, feats, text, mask, _ = tiny_head
    module = VLDyHead(TINY)
    with pytest.raises(ValueError, match="feature levels"):
        module.apply(variables, feats[:2], text, mask)
    with pytest.raises(ValueError, match="level 1"):
        module.apply(variables, [feats[0], feats[1][..., :8]] + feats[2:], text, mask)
    with pytest.raises(ValueError, match="text_mask"):
        module.apply(variables, feats, text, mask[:, :5])
    with pytest.raises(ValueError, match="group"):
        HeadConfig(channels=20, group_norm_groups=16)
