"""2D convolution (NHWC input, HWIO kernel) whose gradients are NHWC/HWIO convolutions too.

jax differentiates `lax.conv_general_dilated` into convolutions with other dimension
orders: the input gradient reads the kernel as HWOI and the kernel gradient treats the
channels as the batch (f01b_i01o->01bf). XLA:CPU runs a convolution with its fast
(Eigen) kernel only in the NHWC/HWIO order, and reorders the others only in the
program's entry computation. Inside a loop, such as the head layers run as one scan
(`model.scan_layers`), the gradients ran as naive loops: six layers of GLIP-T's offset
conv (3x3, 256 to 27 channels) on a 64x108 map took 10.5 s forward and backward against
0.23 s with `conv_nhwc`, which computes the same gradients with explicit transposes
around NHWC/HWIO convolutions.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Pads = tuple[tuple[int, int], ...]
_SPECS = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, precision: Any) -> Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_SPECS, precision=precision)


def _conv_fwd(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
              precision: Any) -> tuple[Array, tuple[Array, Array]]:
    return _conv(x, kernel, strides, pads, precision), (x, kernel)


def _conv_bwd(strides: tuple[int, int], pads: Pads, precision: Any, residuals: tuple[Array, Array],
              g: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    k_hw = kernel.shape[:2]
    # Input rows (or columns) past the last window: they get no gradient.
    rest = [(n + lo + hi - k) % s for n, (lo, hi), k, s in zip(x.shape[1:3], pads, k_hw, strides)]
    # Input gradient: the strided-apart output gradient convolved with the flipped kernel.
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    pads_x = tuple((k - 1 - lo, k - 1 - hi + r) for (lo, hi), k, r in zip(pads, k_hw, rest))
    dx = lax.conv_general_dilated(g, flipped, (1, 1), pads_x, lhs_dilation=strides,
                                  dimension_numbers=_SPECS, precision=precision)
    # Kernel gradient: channels as the batch, the output gradient as a dilated kernel
    # with the images as its input channels; (Cin, kh, kw, Cout) back to HWIO.
    pads_k = tuple((lo, hi - r) for (lo, hi), r in zip(pads, rest))
    dk = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), pads_k,
                                  rhs_dilation=strides, dimension_numbers=_SPECS, precision=precision)
    return dx.astype(x.dtype), dk.transpose(1, 2, 0, 3).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_nhwc(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> Array:
    """`lax.conv_general_dilated` for 2D NHWC inputs and HWIO kernels without dilation
    or groups (the signature nn.Conv calls); other arguments raise ValueError."""
    if lhs.ndim != 4 or rhs.ndim != 4:
        raise ValueError(f"conv_nhwc is 2D: got input {lhs.shape} and kernel {rhs.shape}")
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _SPECS)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or _SPECS)
    if given != expected:
        raise ValueError(f"conv_nhwc takes NHWC inputs and HWIO kernels, got {dimension_numbers}")
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) or feature_group_count != 1:
        raise ValueError("conv_nhwc has no dilation or feature groups")
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, precision)
