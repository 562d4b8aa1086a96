"""Shared layer constructors with logical axis names on every parameter.

Conventions used by all model files:
- Activations are channels-last (NHWC for images, (B, L, D) for text).
- Parameter names mirror the released PyTorch checkpoints so that convert.py maps
  them one-to-one: Dense kernels are [in, out] (torch weight transposed), conv
  kernels are [kh, kw, in, out] (torch weight permuted 2, 3, 1, 0).
- Logical axis names (mapped to mesh axes by rules in the config):
  "embed" model width, "heads" attention projection width (heads * head_dim),
  "mlp" feed-forward width, "vocab" embedding rows, "conv_in"/"conv_out" conv
  channels, "norm" LayerNorm/GroupNorm vectors; spatial kernel dims are None.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from glipjax.models.conv import conv_nhwc

Dtype = Any
Initializer = Callable[..., Any]

TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# GLIP clamps the fusion's logits and the head's attention scores, feed-forward values
# and alignment logits to this magnitude (the reference's float16 safety clamp).
CLAMP_VALUE = 50000.0


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default Linear/Conv bias init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    name: str | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init: Initializer = TORCH_LINEAR_INIT,
    bias_init: Initializer = nn.initializers.zeros,
) -> nn.Dense:
    """nn.Dense whose kernel carries logical axes `axes` = (in_axis, out_axis)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: Sequence[int],
    *,
    strides: int = 1,
    padding: Any = "SAME",
    name: str | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init: Initializer = TORCH_LINEAR_INIT,
    bias_init: Initializer = nn.initializers.zeros,
) -> nn.Conv:
    """nn.Conv (NHWC, kernel [kh, kw, in, out]) with logical axes on its params, run
    through conv.conv_nhwc (gradients in the same order: fast on XLA:CPU in loops too)."""
    return nn.Conv(
        features,
        tuple(kernel_size),
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(bias_init, ("conv_out",)),
        conv_general_dilated=conv_nhwc,
        name=name,
    )


def clamp(x: jax.Array, limit: float = CLAMP_VALUE) -> jax.Array:
    """x clamped to [-limit, limit], with the gradient passed where |x| <= limit (as
    torch.clamp). Unlike jnp.clip, whose gradient keeps ratio arrays of x's size from
    the forward pass and passes half at the limit, its gradient is a select on x."""
    return jnp.where(x > limit, limit, jnp.where(x < -limit, -limit, x))


def layer_norm(eps: float, *, name: str | None = None, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """LayerNorm with float32 params named scale/bias on the "norm" axis."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def scan_layers(
    parent: nn.Module,
    layer_children: Sequence[Sequence[str]],
    body: Callable[[tuple[Any, ...], Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    remat: bool = False,
) -> tuple[Any, Any]:
    """Applies a stack of identically shaped layers as one `lax.scan`.

    layer_children[i] names the children of `parent` that make up layer i; their
    params keep those names (so checkpoints are the same as unrolled) and are stacked
    along a new leading axis for the scan. body(params, carry, x) applies one layer,
    given the params of its children in that order, and returns (carry, y); `xs` is
    scanned along with the layers (e.g. one dropout key each), and the ys are stacked.
    The compiled program holds one layer instead of all of them. Call it only once
    the params exist (not while initialising: run the layers unrolled to create them).
    """
    params = parent.variables["params"]
    per_layer = [tuple(params[name] for name in names) for names in layer_children]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
    step = jax.checkpoint(body) if remat else body
    return jax.lax.scan(lambda c, px: step(px[0], c, px[1]), carry, (stacked, xs))
