"""conv_nhwc: the same values and gradients as lax.conv_general_dilated, with only
NHWC/HWIO convolutions in the compiled gradient, inside a scan too."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from glipjax.models import layers
from glipjax.models.conv import conv_nhwc

SPECS = ("NHWC", "HWIO", "NHWC")

CASES = [  # input, kernel, strides, padding
    ((2, 9, 11, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 11, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1))),  # odd sizes: rows past the last window
    ((1, 10, 13, 3), (4, 4, 3, 6), (4, 4), "VALID"),  # Swin's patch embedding
    ((2, 8, 8, 4), (3, 3, 4, 2), (2, 2), "SAME"),
    ((2, 5, 7, 6), (1, 1, 6, 1), (1, 1), "SAME"),
    ((1, 6, 9, 2), (3, 3, 2, 3), (1, 2), ((0, 2), (1, 0))),
]


@pytest.mark.parametrize("x_shape,k_shape,strides,padding", CASES)
def test_values_and_gradients_match_lax(x_shape, k_shape, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)

    def ref(x, k):
        return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=SPECS,
                                        precision=lax.Precision.HIGHEST)

    def ours(x, k):
        return conv_nhwc(x, k, strides, padding, precision=lax.Precision.HIGHEST)

    y_ref, vjp_ref = jax.vjp(ref, x, k)
    y, vjp = jax.vjp(ours, x, k)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_gradient_in_a_scan_compiles_to_nhwc_hwio_convolutions_only():
    x = jnp.ones((1, 12, 10, 8))
    kernels = jnp.ones((3, 3, 3, 8, 8)) * 0.01

    def loss(kernels, x):
        def layer(h, k):
            return jnp.tanh(conv_nhwc(h, k, (1, 1), "SAME")), None
        return lax.scan(layer, x, kernels)[0].sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kernels, x).compile().as_text()
    labels = re.findall(r"convolution\(.*dim_labels=([^,]+),", hlo)
    assert len(labels) >= 3  # forward, input and kernel gradients
    assert set(labels) == {"b01f_01io->b01f"}


def test_layers_conv_uses_it():
    module = layers.conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 9, 3)), jnp.float32)
    params = module.init(jax.random.key(0), x)
    kernel, bias = params["params"]["kernel"].value, params["params"]["bias"].value
    want = lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=SPECS) + bias
    np.testing.assert_allclose(module.apply(params, x), want, rtol=1e-6, atol=1e-6)
    assert module.conv_general_dilated is conv_nhwc


@pytest.mark.parametrize("kwargs,message", [
    (dict(rhs_dilation=(2, 2)), "dilation"),
    (dict(feature_group_count=3), "groups"),
    (dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), "NHWC"),
])
def test_unsupported_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        conv_nhwc(jnp.ones((1, 3, 6, 6)), jnp.ones((3, 3, 3, 3)), (1, 1), "SAME", **kwargs)
