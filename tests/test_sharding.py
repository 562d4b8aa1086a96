"""Meshes, logical-axis rules, sharded creation, and a tiny GLIP training step on 8 fake
CPU devices (data=2, fsdp=2, tensor=2) against the same step on one device."""

from __future__ import annotations

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from glipjax import sharding
from glipjax.models import layers
from glipjax.models.bert import BertConfig
from glipjax.models.glip import GLIP, glip_tiny, losses

SIZE = 64
TEXT_LEN = 12
BATCH = 8
STEPS = 3
# Float32 on CPU: the sharded step sums in another order than the one-device step.
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-5


def tiny_config():
    text = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32)
    config = glip_tiny(text)
    swin = dataclasses.replace(config.swin, depths=(1, 1, 1, 1))
    head = dataclasses.replace(config.head, fusion_embed_dim=64, fusion_heads=4, num_layers=1)
    return dataclasses.replace(config, swin=swin, head=head, max_text_len=TEXT_LEN)


def make_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 120, size=(BATCH, TEXT_LEN)).astype(np.int32)
    mask = np.ones((BATCH, TEXT_LEN), np.int32)
    mask[::2, 8:] = 0
    corner = rng.uniform(0, 30, size=(BATCH, 2, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(8, 30, size=(BATCH, 2, 2))], -1).astype(np.float32)
    gt_mask = np.ones((BATCH, 2), bool)
    gt_mask[1::2, 1] = False
    pmap = np.zeros((BATCH, 2, TEXT_LEN), np.float32)
    pmap[:, 0, 1:3] = pmap[:, 1, 4] = 1
    return dict(images=rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32), ids=ids, mask=mask,
                boxes=boxes, gt_mask=gt_mask, pmap=pmap)


def train_step_fn(model, config, tx):
    def loss_fn(params, b, rng):
        out = model.apply({"params": params}, b["images"], b["ids"], b["mask"], deterministic=False,
                          rngs={"dropout": rng})
        return losses(config, out, b["boxes"], b["gt_mask"], b["pmap"], b["mask"], (SIZE, SIZE))["total"]

    def step(params, opt_state, b, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, b, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    return step


def device_bytes(tree, device) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


# ---------------------------------------------------------------- meshes and rules


def test_make_mesh_shapes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh({"fsdp": -1}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(sharding.make_mesh({"data": -1, "tensor": 4}).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(sharding.make_mesh({"data": 4}, devices=jax.devices()[:4]).shape)["data"] == 4


@pytest.mark.parametrize("axes, match", [
    ({"data": 2, "fsdp": 2}, "needs 4 devices, but 8"),
    ({"data": 3, "fsdp": -1}, "not divisible"),
    ({"data": -1, "fsdp": -1}, "At most one"),
    ({"data": 0, "fsdp": 8}, "positive or -1"),
    ({"model": 8}, "Unknown mesh axes"),
])
def test_make_mesh_errors(axes, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(axes)


def test_rules_resolution_and_fallback(caplog):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    spec = sharding.logical_to_mesh_spec
    assert spec(("embed", "heads"), (32, 96), mesh, rules) == P("fsdp", "tensor")
    assert spec(("heads", "embed"), (96, 32), mesh, rules) == P("tensor", "fsdp")
    assert spec(("heads",), (96,), mesh, rules) == P(("tensor", "fsdp"))  # a bias: split 4 ways
    assert spec((None, None, "conv_in", "conv_out"), (3, 3, 64, 64), mesh, rules) == P(None, None, "fsdp", None)
    # Activations: batch takes data and fsdp, so embed stays whole.
    assert spec(("batch", "length", "embed"), (8, 12, 32), mesh, rules) == P(("data", "fsdp"), None, None)
    with caplog.at_level(logging.INFO, logger="glipjax.sharding"):
        # 3 input channels do not divide by fsdp=2: that dim is replicated and the
        # output channels take fsdp instead.
        assert spec((None, None, "conv_in", "conv_out"), (4, 4, 3, 32), mesh, rules, "patch") == P(
            None, None, None, "fsdp")
        assert spec(("embed", "heads"), (5, 7), mesh, rules, "odd") == P(None, None)
        assert spec(("heads",), (6,), mesh, rules, "bias6") == P("tensor")  # 6 = 2 * 3: tensor only
    assert "patch: dim 2 (conv_in, size 3) not divisible" in caplog.text
    assert "odd: dim 1 (heads, size 7)" in caplog.text


def test_rules_from_config_and_bad_rules():
    assert sharding.rules_from_config(ml_collections.ConfigDict()) == sharding.DEFAULT_RULES
    empty = ml_collections.ConfigDict({"sharding": {"rules": ()}})  # () in a config: the defaults
    assert sharding.rules_from_config(empty) == sharding.DEFAULT_RULES
    config = ml_collections.ConfigDict({"sharding": {"rules": [["batch", ["data"]], ["embed", None]]}})
    assert sharding.rules_from_config(config) == (("batch", ("data",)), ("embed", None))
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        sharding.normalize_rules([("embed", "model")])
    with pytest.raises(ValueError, match="pair"):
        sharding.normalize_rules([("embed",)])


def test_sharding_context_applies_logical_constraints():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    f = jax.jit(lambda x: nn.with_logical_constraint(x * 2, ("batch", "embed")))
    assert "sharding_constraint" not in f.lower(jnp.zeros((8, 4))).as_text()  # no rules: a no-op
    with sharding.sharding_context(mesh):
        text = f.lower(jnp.zeros((8, 4))).as_text()
    assert 'sharding_constraint' in text and '<@mesh, [{"data", "fsdp"}, {}]>' in text


class Mlp(nn.Module):
    """A model whose every dimension divides the mesh: memory scaling."""

    @nn.compact
    def __call__(self, x):
        x = layers.dense(256, ("embed", "mlp"), name="up")(x)
        x = layers.dense(64, ("mlp", "embed"), name="down")(jax.nn.gelu(x))
        return nn.with_logical_constraint(layers.layer_norm(1e-5, name="norm")(x), ("batch", "length", "embed"))


def test_per_device_bytes_fall_as_one_over_fsdp():
    x = jnp.zeros((8, 4, 64))
    init = lambda rng, x: Mlp().init(rng, x)["params"]  # noqa: E731
    ratios = {}
    for n in (1, 2, 4, 8):
        params = sharding.create_sharded(init, sharding.make_mesh({"data": -1, "fsdp": n}), sharding.DEFAULT_RULES,
                                         jax.random.PRNGKey(0), x)
        total = sum(p.nbytes for p in jax.tree.leaves(params))
        ratios[n] = total / device_bytes(params, jax.devices()[0])
    for n, ratio in ratios.items():
        assert abs(ratio / n - 1) < 0.05, ratios


def test_non_divisible_dims_are_replicated():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.dense(7, ("embed", "heads"), name="proj")(x)

    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    params = sharding.create_sharded(lambda r, x: Odd().init(r, x)["params"], mesh, sharding.DEFAULT_RULES,
                                     jax.random.PRNGKey(0), jnp.zeros((2, 6)))
    assert params["proj"]["kernel"].sharding.spec == P("fsdp", None)  # 7 heads-wide: not over tensor
    assert params["proj"]["bias"].sharding.spec == P(None)
    np.testing.assert_array_equal(params["proj"]["bias"], np.zeros(7))


def test_shard_batch():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    host = {"images": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "ids": np.arange(8)}
    out = sharding.shard_batch(host, mesh)
    assert out["images"].sharding.spec == P(("data", "fsdp"))
    assert out["images"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(out["images"], host["images"])
    with pytest.raises(ValueError, match="global batch 6 .* not divisible by the 4 batch shards"):
        sharding.shard_batch({"images": np.zeros((6, 3))}, mesh)


# ---------------------------------------------------------------- tiny GLIP, 8 devices vs 1


@pytest.fixture(scope="module")
def glip_setup():
    config = tiny_config()
    model = GLIP(config)
    tx = optax.adamw(1e-3)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    b = make_batch(0)

    def init(rng, images, ids, mask):
        return model.init(rng, images, ids, mask)["params"]

    args = (jax.random.PRNGKey(0), b["images"][:2], b["ids"][:2], b["mask"][:2])
    params, opt_state = sharding.create_sharded(init, mesh, rules, *args, tx=tx)
    return config, model, tx, mesh, rules, params, opt_state, init, args


def test_glip_params_are_sharded(glip_setup):
    config, model, tx, mesh, rules, params, opt_state, init, args = glip_setup
    qkv = params["backbone"]["body"]["layers_3"]["blocks_0"]["attn"]["qkv"]["kernel"]  # (256, 768)
    assert qkv.sharding.spec == P("fsdp", "tensor")
    assert qkv.addressable_shards[0].data.shape == (qkv.shape[0] // 2, qkv.shape[1] // 2)
    # Adam's moments follow their params; the step count is replicated.
    adam = opt_state[0]
    assert adam.mu["backbone"]["body"]["layers_3"]["blocks_0"]["attn"]["qkv"]["kernel"].sharding == qkv.sharding
    assert adam.count.sharding.spec == P()
    # Per-device bytes of the tiny GLIP itself against fsdp size, from its shardings.
    abstract = jax.eval_shape(init, *args)
    shapes = jax.tree.leaves(sharding.unbox(abstract))
    total = sum(s.size * s.dtype.itemsize for s in shapes)
    for n in (1, 2, 4, 8):
        shard = jax.tree.leaves(sharding.param_shardings(abstract, sharding.make_mesh({"data": -1, "fsdp": n}), rules))
        per_device = sum(np.prod(sh.shard_shape(s.shape)) * s.dtype.itemsize for s, sh in zip(shapes, shard))
        assert abs(total / per_device / n - 1) < 0.05, (n, total / per_device)
    # On the real mesh the created arrays hold what the shardings say.
    expected = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert device_bytes(params, jax.devices()[0]) == expected
    # Given sharded_shapes' result (as training does), the same arrays with the same shardings.
    ahead = sharding.sharded_shapes(init, mesh, rules, *args, tx=tx)
    again = sharding.create_sharded(init, mesh, rules, *args, tx=tx, shapes=ahead)
    leaves = (jax.tree.leaves((params, opt_state)), jax.tree.leaves(again), jax.tree.leaves(ahead))
    for a, b, s in zip(*leaves, strict=True):
        assert a.sharding == b.sharding == s.sharding
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sharded_steps_match_one_device(glip_setup):
    config, model, tx, mesh, rules, params, opt_state, init, args = glip_setup
    step = train_step_fn(model, config, tx)
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    o_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    b_sh = sharding.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, P())
    with sharding.sharding_context(mesh, rules):
        sharded_step = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh, replicated),
                               out_shardings=(p_sh, o_sh, replicated, p_sh))
        # Trace inside the context so the models' logical constraints apply.
        lowered = sharded_step.lower(params, opt_state, sharding.shard_batch(make_batch(0), mesh),
                                     jax.random.PRNGKey(1))
    text = lowered.as_text()
    assert text.count("sharding_constraint") + text.count("@Sharding") > 10  # the models' constraints
    sharded_step = lowered.compile()
    p1, o1 = jax.device_put(jax.device_get((params, opt_state)), jax.devices()[0])
    local_step = jax.jit(step).lower(p1, o1, make_batch(0), jax.random.PRNGKey(1)).compile()
    p8, o8 = params, opt_state
    for i in range(STEPS):
        b = make_batch(i)
        rng = jax.random.PRNGKey(10 + i)
        p1, o1, loss1, g1 = local_step(p1, o1, b, rng)
        p8, o8, loss8, g8 = sharded_step(p8, o8, sharding.shard_batch(b, mesh), rng)
        assert np.isfinite(float(loss1))
        np.testing.assert_allclose(float(loss8), float(loss1), rtol=LOSS_RTOL)
        flat1 = traverse_util.flatten_dict(g1, sep="/")
        for key, g in traverse_util.flatten_dict(g8, sep="/").items():
            np.testing.assert_allclose(np.asarray(g), np.asarray(flat1[key]), atol=GRAD_ATOL, rtol=1e-4, err_msg=key)
    qkv = p8["backbone"]["body"]["layers_3"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P("fsdp", "tensor")  # still sharded after the updates
