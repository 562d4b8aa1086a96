"""Modulated deformable 3x3 convolution (DCNv2) in plain JAX, channels-last.

Semantics of the official GLIP kernel (padding 1, dilation 1, one deformable
group): for output pixel (ho, wo) and tap k = 3i + j the input is sampled at

    y = ho * stride - 1 + i + offset[..., 2k]      (dy)
    x = wo * stride - 1 + j + offset[..., 2k + 1]  (dx)

bilinearly, reading zero outside the map (a point counts only when -1 < y < H
and -1 < x < W; corners outside the map are zero), multiplied by mask[..., k]
and then convolved densely with the 3x3 kernel plus bias. Everything runs in
float32 or wider. The sampling is one gather of the four corners of every sample
(differentiable with respect to the input, offsets, masks and kernel; one gather
compiles to a smaller program than one per corner) and two contractions.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glipjax.models import layers

Array = jax.Array
NUM_TAPS = 9


def conv_output_size(size: int, stride: int) -> int:
    """Output length of a 3x3 convolution with padding 1 and dilation 1."""
    return (size - 1) // stride + 1


def modulated_deform_conv(
    x: Array,
    offset: Array,
    mask: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    stride: int = 1,
    precision: Any = None,
) -> Array:
    """Modulated deformable 3x3 convolution.

    Args:
      x: input (B, H, W, Cin).
      offset: (B, Ho, Wo, 18), channel 2k = dy and 2k + 1 = dx of tap k = 3i + j.
      mask: (B, Ho, Wo, 9) modulation of each tap (already passed through sigmoid).
      kernel: (3, 3, Cin, Cout).
      bias: (Cout,) or None.
      stride: convolution stride; Ho = (H - 1) // stride + 1 (same for W).
      precision: precision of the final contraction (jax.lax.Precision).

    Returns:
      (B, Ho, Wo, Cout) in float32 (float64 when the inputs are float64).
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C), got shape {x.shape}")
    b, h, w, cin = x.shape
    ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
    if offset.shape != (b, ho, wo, 2 * NUM_TAPS):
        raise ValueError(f"offset must have shape {(b, ho, wo, 2 * NUM_TAPS)}, got {offset.shape}")
    if mask.shape != (b, ho, wo, NUM_TAPS):
        raise ValueError(f"mask must have shape {(b, ho, wo, NUM_TAPS)}, got {mask.shape}")
    if kernel.shape[:3] != (3, 3, cin):
        raise ValueError(f"kernel must be (3, 3, {cin}, Cout), got {kernel.shape}")
    # At least float32 (the official op casts its inputs to float32).
    ct = jnp.promote_types(jnp.result_type(x, offset, mask, kernel), jnp.float32)
    x, offset, mask, kernel = (a.astype(ct) for a in (x, offset, mask, kernel))

    # Sampling positions (B, Ho, Wo, 9): base grid plus learned offsets.
    taps = jnp.arange(3, dtype=ct)
    tap_i = jnp.repeat(taps, 3)  # kernel row of tap k
    tap_j = jnp.tile(taps, 3)  # kernel column of tap k
    base_y = jnp.arange(ho, dtype=ct)[:, None, None] * stride - 1.0 + tap_i
    base_x = jnp.arange(wo, dtype=ct)[None, :, None] * stride - 1.0 + tap_j
    py = base_y[None] + offset[..., 0::2]
    px = base_x[None] + offset[..., 1::2]

    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0 = jnp.floor(py)
    x0 = jnp.floor(px)
    ly = py - y0
    lx = px - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)

    # The four bilinear corners of every sample, gathered at once: (B, Ho, Wo, 9, 4).
    y0 = y0[..., None] + jnp.array([0, 0, 1, 1], jnp.int32)
    x0 = x0[..., None] + jnp.array([0, 1, 0, 1], jnp.int32)
    wy = jnp.stack([1.0 - ly, 1.0 - ly, ly, ly], -1)
    wx = jnp.stack([1.0 - lx, lx, 1.0 - lx, lx], -1)
    valid = inside[..., None] & (y0 >= 0) & (y0 < h) & (x0 >= 0) & (x0 < w)
    weight = jnp.where(valid, wy * wx, 0.0) * mask[..., None]
    index = jnp.clip(y0, 0, h - 1) * w + jnp.clip(x0, 0, w - 1)
    n = ho * wo * NUM_TAPS
    corners = jnp.take_along_axis(x.reshape(b, h * w, cin), index.reshape(b, 4 * n, 1), axis=1)
    sampled = jnp.einsum("bnqc,bnq->bnc", corners.reshape(b, n, 4, cin), weight.reshape(b, n, 4))

    columns = sampled.reshape(b, ho, wo, NUM_TAPS, cin)
    out = jnp.einsum(
        "bhwkc,kco->bhwo", columns, kernel.reshape(NUM_TAPS, cin, -1), precision=precision
    )
    if bias is not None:
        out = out + bias.astype(ct)
    return out


def read_by_output_size(maps: Array, out_hw: tuple[int, int]) -> Array:
    """What the official kernel reads from a (B, H, W, C) offset or mask map when
    its convolution output is (Ho, Wo) instead of (H, W).

    The kernel indexes each image's channels-first buffer (C, H, W) as a dense
    (C, Ho, Wo) array: it reads the first C * Ho * Wo values of the flattened
    buffer. This converts to that layout, takes the prefix, reshapes and converts
    back to (B, Ho, Wo, C). Identity when (Ho, Wo) == (H, W).
    """
    b, h, w, c = maps.shape
    ho, wo = out_hw
    if (ho, wo) == (h, w):
        return maps
    if ho * wo > h * w:
        raise ValueError(
            f"output size {(ho, wo)} needs more offset/mask values than the {(h, w)} map holds"
        )
    chw = jnp.transpose(maps, (0, 3, 1, 2)).reshape(b, c * h * w)
    prefix = chw[:, : c * ho * wo].reshape(b, c, ho, wo)
    return jnp.transpose(prefix, (0, 2, 3, 1))


class ModulatedDeformConv3x3(nn.Module):
    """DCNv2 layer with params `kernel` (3, 3, Cin, Cout) and `bias` (Cout,).

    Offsets and masks are given by the caller (B, Ho, Wo, 18) / (B, Ho, Wo, 9);
    they are read with `read_by_output_size` so that a map of another level
    behaves as in the official kernel. The output is float32.
    """

    features: int
    strides: int = 1
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, offset: Array, mask: Array) -> Array:
        cin = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(layers.TORCH_LINEAR_INIT, (None, None, "conv_in", "conv_out")),
            (3, 3, cin, self.features),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            (self.features,),
            jnp.float32,
        )
        out_hw = (conv_output_size(x.shape[1], self.strides), conv_output_size(x.shape[2], self.strides))
        offset = read_by_output_size(offset, out_hw)
        mask = read_by_output_size(mask, out_hw)
        return modulated_deform_conv(
            x, offset, mask, kernel, bias, stride=self.strides, precision=self.precision
        )
