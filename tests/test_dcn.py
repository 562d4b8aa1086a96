"""Modulated deformable conv vs a float64 numpy loop over its definition.

Tolerances: forward < 1e-5 absolute (outputs are O(1)); gradients checked in
float64 by jax.test_util.check_grads (order 1, its default float64 tolerances).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from glipjax.models.dcn import ModulatedDeformConv3x3, modulated_deform_conv, read_by_output_size

TOL = 1e-5


def _bilinear_zero_pad(img: np.ndarray, y: float, x: float) -> np.ndarray:
    h, w, _ = img.shape
    if not (-1 < y < h and -1 < x < w):
        return np.zeros(img.shape[-1])
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    ly, lx = y - y0, x - x0
    val = np.zeros(img.shape[-1])
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < h and 0 <= xx < w:
                val += wy * wx * img[yy, xx]
    return val


def reference_dcn(x, offset, mask, kernel, bias, stride):
    """Loop over images, output pixels and taps, in float64."""
    x, offset, mask, kernel = (np.asarray(a, np.float64) for a in (x, offset, mask, kernel))
    b, h, w, _ = x.shape
    ho, wo = offset.shape[1:3]
    out = np.zeros((b, ho, wo, kernel.shape[-1]))
    for n in range(b):
        for oy in range(ho):
            for ox in range(wo):
                for k in range(9):
                    i, j = divmod(k, 3)
                    y = oy * stride - 1 + i + offset[n, oy, ox, 2 * k]
                    xx = ox * stride - 1 + j + offset[n, oy, ox, 2 * k + 1]
                    val = _bilinear_zero_pad(x[n], y, xx) * mask[n, oy, ox, k]
                    out[n, oy, ox] += val @ kernel[i, j]
    if bias is not None:
        out += np.asarray(bias, np.float64)
    return out


def _inputs(seed, b, h, w, cin, cout, stride, offset_scale=2.5):
    rng = np.random.default_rng(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = rng.normal(size=(b, h, w, cin)).astype(np.float32)
    offset = (offset_scale * rng.normal(size=(b, ho, wo, 18))).astype(np.float32)
    mask = rng.uniform(size=(b, ho, wo, 9)).astype(np.float32)
    kernel = (0.3 * rng.normal(size=(3, 3, cin, cout))).astype(np.float32)
    bias = rng.normal(size=(cout,)).astype(np.float32)
    return x, offset, mask, kernel, bias


@pytest.fixture(scope="module")
def dcn_jit():
    return jax.jit(modulated_deform_conv, static_argnames=("stride",))


@pytest.mark.parametrize("stride,h,w", [(1, 5, 6), (2, 7, 9), (2, 6, 8)])
def test_random_offsets_match_loop(dcn_jit, stride, h, w):
    x, offset, mask, kernel, bias = _inputs(stride + h, 2, h, w, 3, 4, stride)
    got = np.asarray(dcn_jit(x, offset, mask, kernel, bias, stride=stride))
    want = reference_dcn(x, offset, mask, kernel, bias, stride)
    # Many sample points fall partly or wholly outside the map at this offset scale.
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_integer_offsets_and_outside_points(dcn_jit):
    x, offset, mask, kernel, bias = _inputs(3, 1, 5, 5, 2, 3, 1)
    rng = np.random.default_rng(4)
    offset = rng.integers(-3, 4, size=offset.shape).astype(np.float32)
    offset[0, 0, 0, :2] = -1.0  # tap (0, 0) at output (0, 0) lands on y = x = -2: outside
    offset[0, 4, 4, 16:] = 1.0  # tap (2, 2) at output (4, 4) lands on y = x = 6: outside
    got = np.asarray(dcn_jit(x, offset, mask, kernel, bias, stride=1))
    np.testing.assert_allclose(got, reference_dcn(x, offset, mask, kernel, bias, 1), atol=TOL, rtol=0)


def test_zero_offsets_unit_mask_is_plain_conv(dcn_jit):
    x, offset, mask, kernel, bias = _inputs(5, 2, 6, 7, 3, 4, 2)
    got = dcn_jit(x, np.zeros_like(offset), np.ones_like(mask), kernel, bias, stride=2)
    want = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    ) + bias
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=0)


def test_zero_mask_gives_bias(dcn_jit):
    x, offset, mask, kernel, bias = _inputs(6, 1, 4, 5, 2, 3, 1)
    got = np.asarray(dcn_jit(x, offset, np.zeros_like(mask), kernel, bias, stride=1))
    np.testing.assert_allclose(got, np.broadcast_to(bias, got.shape), atol=1e-7, rtol=0)


def test_bad_shapes_raise():
    x, offset, mask, kernel, bias = _inputs(7, 1, 4, 5, 2, 3, 1)
    with pytest.raises(ValueError, match="offset"):
        modulated_deform_conv(x, offset[..., :9], mask, kernel, bias)
    with pytest.raises(ValueError, match="mask"):
        modulated_deform_conv(x, offset, mask[:, :2], kernel, bias)
    with pytest.raises(ValueError, match="needs more"):
        read_by_output_size(jnp.zeros((1, 2, 3, 9)), (3, 3))


def _numpy_prefix_read(maps: np.ndarray, hc: int, wc: int) -> np.ndarray:
    """Element by element: (y, x, c) of the (c, hc, wc) view of each image's
    flattened (C, H, W) buffer."""
    b, h, w, c = maps.shape
    out = np.zeros((b, hc, wc, c), maps.dtype)
    for n in range(b):
        for ch in range(c):
            for y in range(hc):
                for x in range(wc):
                    f = ch * hc * wc + y * wc + x
                    src_c, rem = divmod(f, h * w)
                    out[n, y, x, ch] = maps[n, rem // w, rem % w, src_c]
    return out


def test_read_by_output_size_matches_flat_indexing():
    maps = np.random.default_rng(8).normal(size=(2, 6, 7, 18)).astype(np.float32)
    got = np.asarray(read_by_output_size(jnp.asarray(maps), (3, 4)))
    np.testing.assert_array_equal(got, _numpy_prefix_read(maps, 3, 4))
    np.testing.assert_array_equal(np.asarray(read_by_output_size(jnp.asarray(maps), (6, 7))), maps)


def test_module_coarse_level_read():
    """The layer given a finer level's offsets reads them the official way."""
    rng = np.random.default_rng(9)
    fine_offset = (2.0 * rng.normal(size=(2, 6, 7, 18))).astype(np.float32)
    fine_mask = rng.uniform(size=(2, 6, 7, 9)).astype(np.float32)
    coarse = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    layer = ModulatedDeformConv3x3(features=4)
    params = layer.init(jax.random.key(0), coarse, fine_offset, fine_mask)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
    got = np.asarray(layer.apply(params, coarse, fine_offset, fine_mask))
    p = nn.meta.unbox(params)["params"]
    want = reference_dcn(
        coarse, _numpy_prefix_read(fine_offset, 3, 4), _numpy_prefix_read(fine_mask, 3, 4),
        p["kernel"], p["bias"], 1,
    )
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # A crop of the offsets instead of the raw read gives another answer.
    cropped = reference_dcn(
        coarse, fine_offset[:, :3, :4], fine_mask[:, :3, :4], p["kernel"], p["bias"], 1
    )
    assert np.abs(cropped - want).max() > 0.1


def test_param_names_and_logical_axes():
    x = jnp.zeros((1, 4, 4, 3))
    variables = ModulatedDeformConv3x3(features=5, strides=2).init(
        jax.random.key(0), x, jnp.zeros((1, 2, 2, 18)), jnp.ones((1, 2, 2, 9))
    )
    params = variables["params"]
    assert params["kernel"].names == (None, None, "conv_in", "conv_out")
    assert params["bias"].names == ("conv_out",)
    assert params["kernel"].value.shape == (3, 3, 3, 5)
    bound = 1 / np.sqrt(27)  # torch's uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight
    assert 0.5 * bound < np.abs(params["kernel"].value).max() <= bound


def test_gradients_float64():
    x, offset, mask, kernel, bias = _inputs(10, 1, 4, 5, 2, 2, 2, offset_scale=1.3)
    # Keep sample points away from integer positions, where the bilinear weights kink.
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in (x, offset, mask, kernel, bias)]
        frac = args[1] - jnp.round(args[1])
        args[1] = jnp.where(jnp.abs(frac) < 0.05, args[1] + 0.1, args[1])

        def f(x, offset, mask, kernel, bias):
            return modulated_deform_conv(x, offset, mask, kernel, bias, stride=2)

        assert f(*args).dtype == jnp.float64
        check_grads(f, args, order=1, modes=("rev",), eps=1e-6)
