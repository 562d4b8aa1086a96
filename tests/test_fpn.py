"""FPN against a direct torch implementation with the same weights, and against the
official GLIP FPN outputs."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glipjax import convert
from glipjax.models.fpn import FPN, drop_block, nearest_resize

TOL = 1e-5  # max |flax - torch| (measured about 2e-6), float32
# Against the official outputs (other BLAS, values up to about 8): measured up to 9.5e-6.
GOLDEN_TOL = 5e-5
IN_CHANNELS = (8, 16, 32)
OUT = 12


def _torch_fpn(sd: dict, feats: list) -> list:
    """maskrcnn_benchmark's FPN + LastLevelP6P7 (P6 from P5) in plain torch ops."""
    w = lambda name: (torch.tensor(sd[f"{name}.weight"]), torch.tensor(sd[f"{name}.bias"]))
    inner = F.conv2d(feats[2], *w("fpn_inner4"))
    results = [F.conv2d(inner, *w("fpn_layer4"), padding=1)]
    for level, feat in ((3, feats[1]), (2, feats[0])):
        lateral = F.conv2d(feat, *w(f"fpn_inner{level}"))
        inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
        results.insert(0, F.conv2d(inner, *w(f"fpn_layer{level}"), padding=1))
    p6 = F.conv2d(results[-1], *w("top_blocks.p6"), stride=2, padding=1)
    p7 = F.conv2d(F.relu(p6), *w("top_blocks.p7"), stride=2, padding=1)
    return results + [p6, p7]


@pytest.fixture(scope="module")
def torch_weights() -> dict:
    rng = np.random.default_rng(0)
    sd = {}
    for level, c in zip((2, 3, 4), IN_CHANNELS):
        sd[f"fpn_inner{level}.weight"] = rng.normal(0, 0.2, (OUT, c, 1, 1))
        sd[f"fpn_layer{level}.weight"] = rng.normal(0, 0.1, (OUT, OUT, 3, 3))
    for name in ("top_blocks.p6", "top_blocks.p7"):
        sd[f"{name}.weight"] = rng.normal(0, 0.1, (OUT, OUT, 3, 3))
    for name in list(sd):
        sd[name.replace("weight", "bias")] = rng.normal(0, 0.1, (OUT,))
    return {k: v.astype(np.float32) for k, v in sd.items()}


@pytest.mark.parametrize("sizes", [((32, 48), (16, 24), (8, 12)), ((15, 21), (8, 11), (4, 6))])
def test_matches_torch(torch_weights, sizes):
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(2, c) + hw).astype(np.float32) for c, hw in zip(IN_CHANNELS, sizes)]
    # GLIP checkpoints nest the FPN under "module.backbone.fpn.".
    ckpt = {f"module.backbone.fpn.{k}": v for k, v in torch_weights.items()}
    params = convert.fpn_params_from_torch(ckpt, IN_CHANNELS, OUT)
    ours = FPN(OUT).apply({"params": params}, [f.transpose(0, 2, 3, 1) for f in feats])
    with torch.no_grad():
        refs = _torch_fpn(torch_weights, [torch.tensor(f) for f in feats])
    assert len(ours) == 5
    for level, (o, r) in enumerate(zip(ours, refs), start=3):
        r = r.numpy().transpose(0, 2, 3, 1)
        assert o.shape == r.shape, level
        assert np.abs(np.asarray(o) - r).max() < TOL, level


def test_matches_official_glip_fpn(golden_dir):
    root = golden_dir / "glip_official_tiny"
    params = convert.fpn_params_from_torch(
        convert.load_state_dict(root / "glip_tiny_official.pth"), (64, 128, 256), 64)
    golden = np.load(root / "golden_224x320.npz")
    feats = [golden[f"swin_stage{i}"].transpose(0, 2, 3, 1) for i in (3, 4, 5)]
    ours = FPN(64).apply({"params": params}, feats)
    for level, o in zip(range(3, 8), ours):
        ref = golden[f"fpn_p{level}"].transpose(0, 2, 3, 1)
        assert np.abs(np.asarray(o) - ref).max() < GOLDEN_TOL, level


@pytest.mark.parametrize("n_in,n_out", [(7, 14), (8, 15), (10, 15), (11, 21), (5, 5), (3, 10)])
def test_nearest_resize_uses_torch_indices(n_in, n_out):
    x = np.arange(n_in * (n_in + 1), dtype=np.float32).reshape(1, 1, n_in, n_in + 1)
    ref = F.interpolate(torch.tensor(x), size=(n_out, n_out + 2), mode="nearest").numpy()
    ours = nearest_resize(x.transpose(0, 2, 3, 1), (n_out, n_out + 2))
    np.testing.assert_array_equal(np.asarray(ours).transpose(0, 3, 1, 2), ref)


def test_drop_block_training_axes_and_errors():
    rng = np.random.default_rng(2)
    feats = [rng.normal(size=(2, s, s, c)).astype(np.float32) for s, c in zip((16, 8, 4), IN_CHANNELS)]
    model = FPN(OUT)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), feats)
    leaves = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert len(leaves) == 16 and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    assert nn.get_partition_spec(variables)["params"]["top_blocks"]["p7"]["kernel"] == (
        jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out"))
    params = nn.unbox(variables)
    det = jax.jit(model.apply)(params, feats)
    train = jax.jit(lambda p, f: model.apply(p, f, False, rngs={"dropout": jax.random.PRNGKey(3)}))(params, feats)
    # DropBlock acts on the P3 and P4 sums only.
    assert np.abs(train[0] - det[0]).max() > 1e-3 and np.abs(train[1] - det[1]).max() > 1e-3
    for a, b in zip(train[2:], det[2:]):
        np.testing.assert_array_equal(a, b)
    ones = np.ones((4, 20, 20, 3), np.float32)
    dropped = np.asarray(drop_block(ones, 0.3, 3, jax.random.PRNGKey(4)))
    kept = dropped[..., 0] > 0
    assert 0.2 < 1 - kept.mean() < 0.9  # whole 3x3 blocks go
    np.testing.assert_allclose(dropped[kept], kept.size / kept.sum(), rtol=1e-6)
    np.testing.assert_array_equal(dropped[..., 0] == 0, dropped[..., 2] == 0)  # shared over channels
    with pytest.raises(ValueError, match="C3, C4, C5"):
        model.apply(params, feats[:2])
