"""Swin backbone against transformers' SwinBackbone (random weights, converted through
convert.py) and against the official GLIP backbone outputs.

Correspondence with transformers: SwinBackbone runs SwinModel with always_partition=True
(windows and shifts kept at every resolution, as in the Microsoft detection code) and
output_hidden_states_before_downsampling=True. Its hidden_states[s + 1] is stage s's
output before PatchMerging, and feature_maps are those outputs through
hidden_states_norms.stage{s+1}, which play the part of GLIP's norm{s}. So:
C2 = hidden_states[1] (no norm in GLIP), C3..C5 = feature_maps for stage2..stage4.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from glipjax import convert
from glipjax.models.swin import SwinConfig, SwinTransformer, relative_position_index, shift_attention_mask

TOL = 1e-4  # max |flax - reference| on stage outputs (measured about 5e-6), float32
CFG = SwinConfig.tiny()


@pytest.fixture(scope="module")
def apply():
    return jax.jit(lambda p, x: SwinTransformer(CFG).apply({"params": p}, x))


@pytest.fixture(scope="module")
def hf_backbone():
    hf_cfg = transformers.SwinConfig(
        embed_dim=CFG.embed_dim, depths=list(CFG.depths), num_heads=list(CFG.num_heads),
        window_size=CFG.window_size, mlp_ratio=CFG.mlp_ratio, qkv_bias=True, hidden_act="gelu",
        layer_norm_eps=1e-5, drop_path_rate=0.0, out_features=["stage2", "stage3", "stage4"],
    )
    torch.manual_seed(0)
    model = transformers.SwinBackbone(hf_cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every parameter off its initial value
        for name, p in model.named_parameters():
            scale = 0.1 if ("norm" in name and name.endswith("weight")) else 0.02
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def test_hf_adapter_reports_the_final_layernorm(hf_backbone):
    state = convert.swin_state_dict_from_hf({k: v.numpy() for k, v in hf_backbone.state_dict().items()})
    with pytest.raises(convert.ConversionError, match=r"layernorm\.weight") as err:
        convert.swin_params_from_torch(state, CFG, prefix="")
    assert err.value.unexpected == ["layernorm.bias", "layernorm.weight"]
    assert not err.value.missing and not err.value.mismatched


@pytest.mark.parametrize("size", [(224, 320), (250, 333)])
def test_matches_transformers_swin_backbone(hf_backbone, apply, size):
    state = convert.swin_state_dict_from_hf({k: v.numpy() for k, v in hf_backbone.state_dict().items()})
    # SwinModel's final LayerNorm has no counterpart in GLIP's backbone.
    state = {k: v for k, v in state.items() if not k.startswith("layernorm.")}
    params = convert.swin_params_from_torch(state, CFG, prefix="")
    x = np.random.default_rng(sum(size)).normal(size=(2, 3) + size).astype(np.float32)
    with torch.no_grad():
        out = hf_backbone(torch.tensor(x), output_hidden_states=True)
    refs = [out.hidden_states[1]] + list(out.feature_maps)
    ours = apply(params, x.transpose(0, 2, 3, 1))
    for s, (o, r) in enumerate(zip(ours, refs)):
        r = r.numpy().transpose(0, 2, 3, 1)
        assert o.shape == r.shape, s
        assert np.abs(np.asarray(o) - r).max() < TOL, s
    # 250x333 pads the image to 252x336, then odd maps 63x84 -> 32x42 -> 16x21 -> 8x11.
    assert [o.shape[1:3] for o in ours][-1] == ((7, 10) if size == (224, 320) else (8, 11))


def test_matches_official_glip_backbone(golden_dir, apply):
    root = golden_dir / "glip_official_tiny"
    params = convert.swin_params_from_torch(convert.load_state_dict(root / "glip_tiny_official.pth"), CFG)
    golden = np.load(root / "golden_224x320.npz")
    # The last stage is 7x10 with window 7: padded to 7x14 and still shifted.
    ours = apply(params, golden["image"].transpose(0, 2, 3, 1))
    for s in (1, 2, 3):
        ref = golden[f"swin_stage{s + 2}"].transpose(0, 2, 3, 1)
        assert np.abs(np.asarray(ours[s]) - ref).max() < TOL, s


def test_window_helpers():
    np.testing.assert_array_equal(
        relative_position_index(2), [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    mask = shift_attention_mask(14, 14, 7, 3)
    assert mask.shape == (4, 49, 49)
    assert not mask[0].any()  # top-left window lies in one region
    assert set(np.unique(mask[3])) == {-100.0, 0.0}
    np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))
    # Bottom-right window: 4 regions of 4x4, 4x3, 3x4, 3x3 tokens.
    assert sorted(np.unique((mask[3] == 0).sum(1))) == [9, 12, 16]


def test_axes_drop_path_remat_and_errors():
    cfg = SwinConfig(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2, drop_path_rate=0.5,
                     out_norm_stages=(1,))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
    model = SwinTransformer(cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    leaves = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    spec = nn.get_partition_spec(variables)["params"]["layers_1"]["blocks_1"]["attn"]["qkv"]["kernel"]
    assert spec == jax.sharding.PartitionSpec("embed", "heads")
    assert "norm0" not in variables["params"] and "norm1" in variables["params"]
    params = nn.unbox(variables)
    det = jax.jit(model.apply)(params, x)[1]
    drop = jax.jit(lambda key: model.apply(params, x, False, rngs={"dropout": key})[1])
    assert np.abs(drop(jax.random.PRNGKey(0)) - det).max() > 1e-3
    np.testing.assert_array_equal(drop(jax.random.PRNGKey(0)), drop(jax.random.PRNGKey(0)))
    remat = jax.jit(SwinTransformer(cfg, remat=True).apply)(params, x)[1]
    np.testing.assert_allclose(remat, det, atol=1e-6)
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(params, x[0])


def test_block_pairs_as_one_scan_match_unrolled():
    """With scan, a stage of several (unshifted, shifted) block pairs runs as one scan
    over the pairs with the same params: same outputs and gradients as unrolled, with
    and without remat; each block gets its own drop-path rate and key."""
    cfg = SwinConfig(embed_dim=8, depths=(2, 6), num_heads=(1, 2), window_size=2, drop_path_rate=0.5,
                     out_norm_stages=(1,))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    params = nn.unbox(jax.jit(SwinTransformer(cfg).init)(jax.random.PRNGKey(0), x))
    jaxpr = str(jax.make_jaxpr(SwinTransformer(cfg, scan=True).apply)(params, x))
    assert jaxpr.count("scan[") == 1  # stage 1's three pairs; stage 0's one pair stays unrolled
    # Params far from their near-identity init, so that every block changes its input, and
    # a fixed random projection of the outputs as the loss (a sum of squares of the final
    # norm's output would have gradients of rounding noise only).
    rng = np.random.default_rng(1)
    moved = jax.tree.map(lambda v: v + 0.3 * rng.normal(size=v.shape).astype(np.float32), params)
    weights = [jnp.asarray(rng.normal(size=o.shape), jnp.float32) for o in SwinTransformer(cfg).apply(moved, x)]

    def loss(model):
        def value(p):
            return sum(jnp.sum(o * w) for o, w in zip(model.apply(p, x), weights, strict=True))
        return jax.jit(jax.value_and_grad(value))(moved)

    for remat in (False, True):
        value, grads = loss(SwinTransformer(cfg, remat=remat))
        scanned_value, scanned_grads = loss(SwinTransformer(cfg, remat=remat, scan=True))
        np.testing.assert_allclose(scanned_value, value, rtol=1e-5)
        # float32 sums in another order: 1e-4 relative, or 1e-6 of the leaf's largest
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()),
                     scanned_grads, grads)
    scanned = SwinTransformer(cfg, scan=True)
    drop = jax.jit(lambda key: scanned.apply(params, x, False, rngs={"dropout": key})[1])
    det = jax.jit(scanned.apply)(params, x)[1]
    assert np.abs(drop(jax.random.PRNGKey(0)) - drop(jax.random.PRNGKey(1))).max() > 1e-3
    np.testing.assert_array_equal(drop(jax.random.PRNGKey(0)), drop(jax.random.PRNGKey(0)))
    no_drop = SwinTransformer(dataclasses.replace(cfg, drop_path_rate=0.0), scan=True)
    np.testing.assert_allclose(no_drop.apply(params, x, False, rngs={"dropout": jax.random.PRNGKey(0)})[1], det,
                               atol=1e-6)
