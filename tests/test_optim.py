"""The reference recipe's optimizer on small fake param trees with GLIP path names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glipjax.optim import (
    ADAM_EPS,
    applied_updates,
    bad_step_counts,
    default_optim_config,
    ema_update,
    make_optimizer,
    make_schedule,
    param_groups,
    param_path,
)

# path -> (group, lr factor, whether weight decay applies) under the default config
EXPECTED = {
    "backbone/body/layers_0/blocks_0/attn/qkv/kernel": ("base", 1.0, True),
    "backbone/body/layers_0/blocks_0/attn/qkv/bias": ("base_bias", 2.0, False),
    "backbone/body/layers_0/blocks_0/attn/relative_position_bias_table": ("base_bias", 2.0, False),
    "backbone/body/norm1/scale": ("base_norm", 1.0, True),
    "backbone/body/norm1/bias": ("base_bias", 2.0, False),
    "backbone/fpn/fpn_inner2/kernel": ("base", 1.0, True),
    "language_backbone/embeddings/word_embeddings/embedding": ("text", 0.1, True),
    "language_backbone/embeddings/LayerNorm/scale": ("text_norm", 0.1, True),
    "language_backbone/encoder/layer_0/attention/self/query/kernel": ("text", 0.1, True),
    "language_backbone/encoder/layer_0/attention/self/query/bias": ("text_bias", 0.2, False),
    "head/dyhead_tower_1/attention/self/query/kernel": ("base", 1.0, True),
    "head/dyhead_tower_0/b_attn/layer_norm_l/scale": ("base_norm", 1.0, True),
    "head/dyhead_tower_2/DyConv_0/bn/scale": ("base_norm", 1.0, True),
    "head/bias_lang": ("base_bias", 2.0, False),
    "head/bias0": ("base_bias", 2.0, False),
    "head/scales_0/scale": ("base", 1.0, True),
    "head/log_scale": ("base", 1.0, True),
    "head/cls_logits/kernel": ("frozen", 0.0, False),
    "head/cls_logits/bias": ("frozen", 0.0, False),
}
LR, WD = 1e-2, 0.1  # large enough for one step to be visible in float32


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        "/".join(k.key for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return _nest({p: rng.normal(size=(3, 2)).astype(np.float32) for p in EXPECTED})


def _config(**fields):
    config = default_optim_config()
    config.update(lr=LR, weight_decay=WD, warmup_steps=0)
    config.update(**fields)
    return config


def _step(tx, params, grads, state, **extra):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_groups_from_paths():
    labels = _flat(param_groups(_params(), default_optim_config()))
    assert labels == {p: group for p, (group, _, _) in EXPECTED.items()}


@pytest.fixture(scope="module")
def glip_param_shapes():
    """Boxed parameter shapes of the tiny GLIP (traced, never compiled)."""
    from glipjax.models.glip import GLIP, glip_tiny

    model = GLIP(glip_tiny())
    return jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
    ))


def test_groups_of_the_real_glip_tree(glip_param_shapes):
    labels = param_groups(glip_param_shapes, default_optim_config())
    flat = {param_path(path): group for path, group in jax.tree_util.tree_flatten_with_path(labels)[0]}
    for path, group in flat.items():
        assert (group == "frozen") == path.startswith("head/cls_logits/"), path
        if group != "frozen":
            assert group.startswith("text") == path.startswith("language_backbone/"), path
            assert group.endswith("_bias") == ("bias" in path), path
    assert flat["head/dyhead_tower_1/attention/self/query/kernel"] == "base"  # BERT layer inside the head
    assert flat["head/dyhead_tower_2/DyConv_0/bn/scale"] == "base_norm"
    assert flat["language_backbone/embeddings/LayerNorm/scale"] == "text_norm"
    assert sum(g.endswith("_norm") for g in flat.values()) == sum(
        p.endswith("/scale") and ("norm" in p.lower() or "/bn/" in p) for p in flat)
    tx = make_optimizer(default_optim_config(), total_steps=1000)
    state = jax.eval_shape(tx.init, glip_param_shapes)
    assert bad_step_counts(state)[0].dtype == jnp.int32


def test_groups_ignore_params_collection_and_boxes():
    boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (None, None)), {"params": _params()},
                         is_leaf=lambda x: isinstance(x, np.ndarray))
    labels = param_groups(boxed, default_optim_config())
    flat = {
        "/".join(str(getattr(k, "key", "")) for k in path[1:-1]): v
        for path, v in jax.tree_util.tree_flatten_with_path(labels)[0]
    }
    assert flat == {p: group for p, (group, _, _) in EXPECTED.items()}


def test_zero_gradient_step_is_decoupled_decay_only():
    """With zero gradients Adam's step is 0: the update is -lr_g * wd_g * p. rtol 1e-6."""
    params = _params()
    tx = make_optimizer(_config(), total_steps=100)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    p, u = _flat(params), _flat(updates)
    for path, (_, factor, decays) in EXPECTED.items():
        np.testing.assert_allclose(u[path], -LR * factor * WD * decays * p[path], rtol=1e-6, err_msg=path)


def test_constant_gradient_first_step_matches_hand_adamw():
    """First AdamW step: m_hat = g, v_hat = g^2, so the update is
    -lr_g * (g / (|g| + eps) + wd_g * p). rtol 1e-5 (float32 bias corrections)."""
    params = _params()
    grads = _params(seed=1)
    tx = make_optimizer(_config(clip_norm=0.0), total_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    p, u, g = _flat(params), _flat(updates), _flat(grads)
    for path, (_, factor, decays) in EXPECTED.items():
        expected = -LR * factor * (g[path] / (np.abs(g[path]) + ADAM_EPS) + WD * decays * p[path])
        np.testing.assert_allclose(u[path], expected, rtol=1e-5, err_msg=path)


def test_lr_factors_scale_their_params_only():
    """With lr_factors the first matching regex multiplies the group's lr (weight decay
    kept): the first AdamW step is the hand formula with that factor. rtol 1e-5."""
    factors = ((r"relative_position_bias_table$", 10.0), (r"^backbone/", 3.0))
    config = _config(clip_norm=0.0, lr_factors=factors)
    labels = _flat(param_groups(_params(), config))
    assert labels["backbone/body/layers_0/blocks_0/attn/relative_position_bias_table"] == "base_bias@0"
    assert labels["backbone/body/norm1/scale"] == "base_norm@1"
    assert labels["head/bias0"] == "base_bias"
    frozen_too = _flat(param_groups(_params(), _config(lr_factors=factors, frozen=("^backbone/",))))
    assert frozen_too["backbone/body/norm1/scale"] == "frozen"  # a pattern that finds only frozen params is fine
    params, grads = _params(), _params(seed=1)
    tx = make_optimizer(config, total_steps=100)
    updates, _ = tx.update(grads, tx.init(params), params)
    p, u, g = _flat(params), _flat(updates), _flat(grads)
    for path, (_, factor, decays) in EXPECTED.items():
        extra = 10.0 if path.endswith("relative_position_bias_table") else 3.0 if path.startswith("backbone/") else 1.0
        expected = -LR * factor * extra * (g[path] / (np.abs(g[path]) + ADAM_EPS) + WD * decays * p[path])
        np.testing.assert_allclose(u[path], expected, rtol=1e-5, err_msg=path)


def test_one_adam_state_for_all_groups():
    """Groups and lr_factors share one pair of moments; frozen params hold none."""
    config = _config(lr_factors=((r"^backbone/", 3.0),), frozen=(r"^head/bias_lang$",))
    tx = make_optimizer(config, total_steps=100)
    state = tx.init(_params())
    (_, mu), = optax.tree_utils.tree_get_all_with_path(state, "mu")
    (_, nu), = optax.tree_utils.tree_get_all_with_path(state, "nu")
    frozen = {"head/bias_lang", "head/cls_logits/kernel", "head/cls_logits/bias"}
    for moments in (mu, nu):
        held = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(moments)[0]}
        assert held == set(EXPECTED) - frozen


def test_norm_weight_decay_switch():
    params = _params()
    tx = make_optimizer(_config(norm_weight_decay=False), total_steps=100)
    new, _ = _step(tx, params, jax.tree.map(jnp.zeros_like, params), tx.init(params))
    p0, p1 = _flat(params), _flat(new)
    for path in ("backbone/body/norm1/scale", "language_backbone/embeddings/LayerNorm/scale",
                 "head/dyhead_tower_2/DyConv_0/bn/scale"):
        np.testing.assert_array_equal(p1[path], p0[path])
    assert not np.array_equal(p1["head/scales_0/scale"], p0["head/scales_0/scale"])


def test_schedule_warmup_and_milestones():
    schedule = make_schedule(default_optim_config(), total_steps=10_000)
    expected = {
        0: 1e-7,  # 0.001 x
        1000: 1e-4 * (0.001 + 0.999 * 0.5),
        2000: 1e-4,
        6699: 1e-4,
        6700: 1e-5,  # x0.1 at 67%
        8899: 1e-5,
        8900: 1e-6,  # x0.1 again at 89%
        9999: 1e-6,
    }
    for step, lr in expected.items():
        # rtol 1e-4: optax's float32 warmup loses ~1e-5 relative at the 0.001x start
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-4, err_msg=str(step))


def test_schedule_drives_updates_and_counts_applied_updates():
    """A 4-update run with a milestone at 0.5 (update 2): with a constant gradient every
    Adam step is ~1, so the 4th update moves a text kernel by 0.1 (text) x 0.1 (decay) x lr."""
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = make_optimizer(_config(decay_milestones=(0.5,), weight_decay=0.0, clip_norm=0.0), total_steps=4)
    state = tx.init(params)
    for _ in range(3):
        params, state = _step(tx, params, grads, state)
    assert int(applied_updates(state)) == 3
    updates, _ = tx.update(grads, state, params)
    text_kernel = _flat(updates)["language_backbone/encoder/layer_0/attention/self/query/kernel"]
    np.testing.assert_allclose(text_kernel, -LR * 0.1 * 0.1, rtol=1e-5)
    np.testing.assert_allclose(_flat(updates)["head/bias0"], -LR * 2 * 0.1, rtol=1e-5)


def test_clipping_uses_trainable_gradients_only():
    """Adam's first moment after one step is (1 - b1) * clipped g; the huge gradient of
    the frozen cls_logits must not enter the global norm."""
    params = _nest({"head/log_scale": np.ones(4, np.float32), "head/cls_logits/kernel": np.ones(4, np.float32)})
    grads = _nest({"head/log_scale": np.full(4, 5.0, np.float32), "head/cls_logits/kernel": np.full(4, 1e6, np.float32)})
    tx = make_optimizer(_config(), total_steps=100)
    _, state = _step(tx, params, grads, tx.init(params))
    mus = [mu["head"]["log_scale"] for _, mu in optax.tree_utils.tree_get_all_with_path(state, "mu")
           if not isinstance(mu["head"]["log_scale"], optax.MaskedNode)]
    assert len(mus) == 1
    np.testing.assert_allclose(np.asarray(mus[0]), 0.1 * np.full(4, 0.5), rtol=1e-6)  # norm 10 -> 1


@pytest.mark.parametrize("bad", ["grad_nan", "grad_inf", "loss_nan"])
def test_nonfinite_step_changes_nothing_and_is_counted(bad):
    params = _params()
    grads = _params(seed=1)
    tx = make_optimizer(_config(), total_steps=100)
    state = tx.init(params)
    params, state = _step(tx, params, grads, state, loss=jnp.float32(1.0))
    if bad == "loss_nan":
        bad_grads, loss = grads, jnp.float32(jnp.nan)
    else:
        value = np.nan if bad == "grad_nan" else np.inf
        flat = _flat(grads)
        flat["head/bias0"] = flat["head/bias0"].copy()
        flat["head/bias0"][0, 0] = value
        bad_grads = _nest(flat)
        loss = jnp.float32(1.0)
    new, new_state = _step(tx, params, bad_grads, state, loss=loss)
    _assert_trees_equal(new, params)
    _assert_trees_equal(new_state.inner_state, state.inner_state)
    assert tuple(map(int, bad_step_counts(new_state))) == (1, 1)
    new, new_state = _step(tx, new, bad_grads, new_state, loss=loss)
    assert tuple(map(int, bad_step_counts(new_state))) == (2, 2)
    new, new_state = _step(tx, new, grads, new_state)
    assert tuple(map(int, bad_step_counts(new_state))) == (0, 2)
    assert int(applied_updates(new_state)) == 2
    assert not np.array_equal(_flat(new)["head/bias0"], _flat(params)["head/bias0"])


def test_frozen_paths_never_change():
    params = _params()
    tx = make_optimizer(_config(frozen=(r"^head/bias_lang$", r"^language_backbone/")), total_steps=100)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _step(tx, p, g, s))
    current = params
    for seed in range(3):
        current, state = step(current, state, _params(seed=seed + 1))
    p0, p1 = _flat(params), _flat(current)
    frozen = [p for p in EXPECTED if p.startswith(("language_backbone/", "head/cls_logits/", "head/bias_lang"))]
    for path in EXPECTED:
        assert np.array_equal(p1[path], p0[path]) == (path in frozen), path


def test_freeze_all_but_one_offset():
    """Prompt tuning: everything frozen except one parameter, via a negative lookahead."""
    params = _params()
    tx = make_optimizer(_config(frozen=(r"^(?!head/bias0$)",)), total_steps=100)
    new, _ = _step(tx, params, _params(seed=1), tx.init(params))
    changed = {p for p, v in _flat(new).items() if not np.array_equal(v, _flat(params)[p])}
    assert changed == {"head/bias0"}


def test_ema_update_formula():
    ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    params = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(-4.0)}}
    out = ema_update(ema, params, 0.9)
    np.testing.assert_allclose(np.asarray(out["a"]), [0.9 * 1 + 0.1 * 3, 0.9 * 2], rtol=1e-6)
    np.testing.assert_allclose(float(out["b"]["c"]), 0.9 * 4 - 0.1 * 4, rtol=1e-6)
    _assert_trees_equal(ema_update(ema, params, 0.0), params)


def test_gradient_accumulation_averages_micro_steps():
    params = _params()
    g1, g2 = _params(seed=1), _params(seed=2)
    tx1 = make_optimizer(_config(), total_steps=100)
    expected, _ = _step(tx1, params, jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), tx1.init(params))
    tx2 = make_optimizer(_config(grad_accum_steps=2), total_steps=100)
    state = tx2.init(params)
    mid, state = _step(tx2, params, g1, state)
    _assert_trees_equal(mid, params)
    out, state = _step(tx2, mid, g2, state)
    for path, value in _flat(out).items():
        np.testing.assert_allclose(value, _flat(expected)[path], rtol=1e-6, atol=1e-9, err_msg=path)
    assert int(applied_updates(state)) == 1


def test_boxed_params_step_like_plain():
    params = _params()
    grads = _params(seed=1)
    box = lambda t: jax.tree.map(lambda x: nn.LogicallyPartitioned(jnp.asarray(x), (None, None)), t)  # noqa: E731
    tx = make_optimizer(_config(), total_steps=100)
    plain, _ = _step(tx, params, grads, tx.init(params))
    boxed, _ = _step(tx, box(params), box(grads), tx.init(box(params)))
    _assert_trees_equal(nn.unbox(boxed), plain)


@pytest.mark.parametrize(
    "fields, total, message",
    [
        (dict(decay_milestones=(0.9, 0.5)), 100, "decay_milestones"),
        (dict(grad_accum_steps=0), 100, "grad_accum_steps"),
        (dict(ema_decay=1.0), 100, "ema_decay"),
        (dict(frozen=("(",)), 100, "not a valid regex"),
        (dict(lr_factors=(("(", 2.0),)), 100, "not a valid regex"),
        (dict(lr_factors=(("head", 0.0),)), 100, "lr_factors"),
        (dict(lr_factors=("head",)), 100, "lr_factors"),
        ({}, 0, "total_steps"),
    ],
)
def test_bad_config_raises(fields, total, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(_config(**fields), total_steps=total)


@pytest.mark.parametrize("fields", [dict(frozen=("no_such_param",)), dict(lr_factors=(("no_such_param", 2.0),))])
def test_pattern_matching_nothing_raises(fields):
    tx = make_optimizer(_config(**fields), total_steps=100)
    with pytest.raises(ValueError, match="match no parameter"):
        tx.init(_params())
