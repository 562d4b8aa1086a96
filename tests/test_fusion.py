"""Fusion block vs a float64 numpy implementation of the reference formulas.

Tolerance: 1e-5 absolute on outputs of magnitude O(1) (float32 compute). Gradients
are checked against the same formulas differentiated by jax in float32, to 1e-4 of
each array's largest entry (1e-2 where the logits pass the clamp).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from glipjax.models.fusion import VLFuse, flatten_levels, split_levels
from glipjax.models.layers import clamp

TOL = 1e-5
EMBED, HEADS, CV, CL = 32, 4, 16, 12
LEVEL_SHAPES = [(4, 5), (2, 3), (1, 2)]


def _ln(x, p, eps=1e-5, xp=np):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / xp.sqrt(var + eps) * p["scale"] + p["bias"]


def _softmax(x, xp=np):
    e = xp.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_block(p, v, l, mask, heads, xp=np):
    """BiAttentionBlock written from the formulas: float64 numpy, or with xp=jnp the
    same formulas in float32 jax (to differentiate them)."""
    if xp is np:
        p, v, l = jax.tree.map(lambda a: np.asarray(a, np.float64), (p, v, l))
    a = p["attn"]
    lin = lambda x, name: x @ a[name]["kernel"] + a[name]["bias"]  # noqa: E731
    v = _ln(v, p["layer_norm_v"], xp=xp)
    l = _ln(l, p["layer_norm_l"], xp=xp)
    b, n, _ = v.shape
    length = l.shape[1]
    e = a["v_proj"]["kernel"].shape[1]
    d = e // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d)  # noqa: E731
    q = split(lin(v, "v_proj") * d ** -0.5)
    k = split(lin(l, "l_proj"))
    logits = xp.clip(xp.einsum("bnhd,blhd->bhnl", q, k), -50000, 50000)
    lt = xp.swapaxes(logits, -1, -2)
    lt = xp.clip(lt - lt.max(-1, keepdims=True), -50000, 50000)
    probs_l = _softmax(lt, xp)
    m = xp.asarray(mask, logits.dtype)
    probs_v = _softmax(logits + xp.where(m == 0, -9e15, m)[:, None, None, :], xp)
    out_v = xp.einsum("bhnl,blhd->bnhd", probs_v, split(lin(l, "values_l_proj"))).reshape(b, n, e)
    out_l = xp.einsum("bhln,bnhd->blhd", probs_l, split(lin(v, "values_v_proj"))).reshape(b, length, e)
    return v + p["gamma_v"] * lin(out_v, "out_v_proj"), l + p["gamma_l"] * lin(out_l, "out_l_proj")


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    levels = [jnp.asarray(rng.normal(size=(2, h, w, CV)), jnp.float32) for h, w in LEVEL_SHAPES]
    text = jnp.asarray(rng.normal(size=(2, 6, CL)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], jnp.int32)
    module = VLFuse(EMBED, HEADS, dropout=0.1, init_value=0.5)
    variables = module.init(jax.random.key(0), levels, text, mask)
    flat = flatten_dict(nn.meta.unbox(variables["params"]))
    keys = jax.random.split(jax.random.key(1), len(flat))
    # Perturb every parameter so biases, gammas and norms are all exercised.
    params = unflatten_dict(
        {k: v + 0.1 * jax.random.normal(kk, v.shape) for kk, (k, v) in zip(keys, flat.items())}
    )
    apply = jax.jit(module.apply, static_argnames=("deterministic",))
    return module, variables, params, levels, text, mask, apply


def _tokens(levels):
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1, x.shape[-1]) for x in levels], axis=1)


def test_matches_numpy_formulas(setup):
    _, _, params, levels, text, mask, apply = setup
    out_levels, out_text = apply({"params": params}, levels, text, mask)
    want_v, want_l = reference_block(params["b_attn"], _tokens(levels), text, mask, HEADS)
    got_v = _tokens(out_levels)
    assert [x.shape for x in out_levels] == [x.shape for x in levels]
    np.testing.assert_allclose(got_v, want_v, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out_text), want_l, atol=TOL, rtol=0)


def test_one_image_matches_its_row_of_a_batch(setup):
    """A batch of one takes its own path (no batch axis in the attention)."""
    _, _, params, levels, text, mask, apply = setup
    out_levels, out_text = apply({"params": params}, levels, text, mask)
    for i in range(2):
        one_levels, one_text = apply({"params": params}, [x[i:i + 1] for x in levels], text[i:i + 1],
                                     mask[i:i + 1])
        np.testing.assert_allclose(_tokens(one_levels), _tokens(out_levels)[i:i + 1], atol=TOL, rtol=0)
        np.testing.assert_allclose(one_text, out_text[i:i + 1], atol=TOL, rtol=0)


def test_clamped_logits_match(setup):
    """Query and key kernels scaled so that logits exceed +-50000 and the clamp acts."""
    _, _, params, levels, text, mask, apply = setup
    big = jax.tree.map(lambda a: a, params)
    attn = big["b_attn"]["attn"]
    for name in ("v_proj", "l_proj"):
        attn[name]["kernel"] = attn[name]["kernel"] * 300.0
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), big["b_attn"])
    q = _ln(_tokens(levels).astype(np.float64), p["layer_norm_v"]) @ p["attn"]["v_proj"]["kernel"]
    k = _ln(np.asarray(text, np.float64), p["layer_norm_l"]) @ p["attn"]["l_proj"]["kernel"]
    head = lambda x: x.reshape(2, -1, HEADS, EMBED // HEADS)  # noqa: E731
    unclamped = np.einsum("bnhd,blhd->bhnl", head(q), head(k)) * (EMBED // HEADS) ** -0.5
    assert np.abs(unclamped).max() > 2 * 50000
    want_v, want_l = reference_block(big["b_attn"], _tokens(levels), text, mask, HEADS)
    out_levels, out_text = apply({"params": big}, levels, text, mask)
    np.testing.assert_allclose(_tokens(out_levels), want_v, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out_text), want_l, atol=TOL, rtol=0)


@pytest.mark.parametrize("scale, tol", [(1.0, 1e-4), (300.0, 1e-2)], ids=["plain", "clamped"])
def test_gradients_match_the_formulas(setup, scale, tol):
    """Gradients of a weighted sum of the outputs with respect to params, image tokens
    and text equal those of the formulas (the reference's transposes and clamps) in
    float32 jax, to `tol` of each array's largest entry. The scale 300 on the query and
    key kernels makes logits pass +-50000, as above; float32 logits of that size keep
    only about 1e-2 of the softmax's derivatives, whatever the order of the ops."""
    _, _, params, levels, text, mask, _ = setup
    params = jax.tree.map(lambda a: a, params)
    for name in ("v_proj", "l_proj"):
        params["b_attn"]["attn"][name]["kernel"] = params["b_attn"]["attn"][name]["kernel"] * scale
    tokens = jnp.asarray(_tokens(levels))
    rng = np.random.default_rng(2)
    weight_v, weight_l = rng.normal(size=tokens.shape), rng.normal(size=text.shape)
    module = VLFuse(EMBED, HEADS, dropout=0.1, init_value=0.5)

    def module_loss(p, v, l):
        out_levels, out_text = module.apply({"params": p}, split_levels(v, LEVEL_SHAPES), l, mask)
        return jnp.sum(flatten_levels(out_levels) * weight_v) + jnp.sum(out_text * weight_l)

    def formula_loss(p, v, l):
        out_v, out_l = reference_block(p["b_attn"], v, l, mask, HEADS, xp=jnp)
        return jnp.sum(out_v * weight_v) + jnp.sum(out_l * weight_l)

    got = jax.grad(module_loss, argnums=(0, 1, 2))(params, tokens, text)
    want = jax.grad(formula_loss, argnums=(0, 1, 2))(params, tokens, text)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=tol * float(np.abs(w).max()), rtol=0)


def test_padded_tokens_do_not_reach_visual(setup):
    _, _, params, levels, text, mask, apply = setup
    noisy = text.at[1, 3:].set(100.0)
    a_levels, a_text = apply({"params": params}, levels, text, mask)
    b_levels, b_text = apply({"params": params}, levels, noisy, mask)
    np.testing.assert_allclose(_tokens(a_levels), _tokens(b_levels), atol=1e-6, rtol=0)
    # The padded tokens themselves are still updated (no mask on the text side).
    assert not np.allclose(np.asarray(a_text[1, 3:]), np.asarray(b_text[1, 3:]))
    np.testing.assert_allclose(np.asarray(a_text[0]), np.asarray(b_text[0]), atol=1e-6, rtol=0)


def test_dropout_only_in_training(setup):
    _, _, params, levels, text, mask, apply = setup
    det, _ = apply({"params": params}, levels, text, mask, deterministic=True)
    drop1, _ = apply({"params": params}, levels, text, mask, deterministic=False,
                     rngs={"dropout": jax.random.key(3)})
    drop2, _ = apply({"params": params}, levels, text, mask, deterministic=False,
                     rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(_tokens(det), _tokens(drop1))
    assert not np.allclose(_tokens(drop1), _tokens(drop2))


def test_param_tree_names_axes_and_init(setup):
    _, variables, _, _, _, _, _ = setup
    flat = flatten_dict(variables["params"])
    names = {"/".join(k) for k in flat}
    expected = {f"b_attn/attn/{p}/{w}" for p in ("v_proj", "l_proj", "values_v_proj", "values_l_proj",
                                                   "out_v_proj", "out_l_proj") for w in ("kernel", "bias")}
    expected |= {f"b_attn/layer_norm_{s}/{w}" for s in "vl" for w in ("scale", "bias")}
    expected |= {"b_attn/gamma_v", "b_attn/gamma_l"}
    assert names == expected
    for k, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, k
    p = flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
    np.testing.assert_array_equal(p["b_attn/gamma_v"], np.full(CV, 0.5, np.float32))
    np.testing.assert_array_equal(p["b_attn/gamma_l"], np.full(CL, 0.5, np.float32))
    assert p["b_attn/attn/l_proj/kernel"].shape == (CL, EMBED)
    assert p["b_attn/attn/out_v_proj/kernel"].shape == (EMBED, CV)
    np.testing.assert_array_equal(p["b_attn/attn/v_proj/bias"], 0.0)
    limit = np.sqrt(6 / (CV + EMBED))  # xavier uniform
    assert 0.8 * limit < np.abs(p["b_attn/attn/v_proj/kernel"]).max() <= limit


def test_bad_text_mask_raises(setup):
    module, variables, _, levels, text, _, _ = setup
    with pytest.raises(ValueError, match="text_mask"):
        module.apply(variables, levels, text, jnp.ones((2, 5), jnp.int32))


def test_clamp_values_and_gradient_equal_torch_clamp():
    """Values and gradients at, inside and beyond the limits, as torch.clamp gives them."""
    x = np.array([-7.0, -5.0, -4.999, -1.0, 0.0, 2.5, 5.0, 5.001, 9.0], np.float32)
    weight = np.arange(1, x.size + 1, dtype=np.float32)
    tx = torch.tensor(x, requires_grad=True)
    (torch.clamp(tx, -5.0, 5.0) * torch.tensor(weight)).sum().backward()
    value, grad = jax.value_and_grad(lambda a: jnp.sum(clamp(a, 5.0) * weight))(jnp.asarray(x))
    np.testing.assert_array_equal(clamp(jnp.asarray(x), 5.0), torch.clamp(tx, -5.0, 5.0).detach().numpy())
    np.testing.assert_array_equal(grad, tx.grad.numpy())
