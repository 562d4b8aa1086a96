"""RetinaNet-style feature pyramid on C3..C5 -> P3..P7 (maskrcnn_benchmark FPN with
LastLevelP6P7), NHWC.

Lateral 1x1 convs fpn_inner2/3/4, output 3x3 convs fpn_layer2/3/4, top-down path by
nearest resize to the lateral's size (torch's index rule), P6 = 3x3 stride-2 conv on
P5 (the FPN output), P7 = 3x3 stride-2 conv on relu(P6), all with torch padding 1.
Training applies DropBlock to the P4 and P3 top-down sums.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glipjax.models.layers import Dtype, conv

# kaiming_uniform_(a=1), the initialiser of the reference FPN convs.
FPN_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
TORCH_PAD1 = ((1, 1), (1, 1))


def nearest_resize(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """NHWC nearest-neighbour resize with torch's F.interpolate(mode="nearest") indices:
    src = min(floor(dst * float32(in / out)), in - 1)."""
    idx = []
    for n_in, n_out in zip(x.shape[1:3], size):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        idx.append(np.minimum(src, n_in - 1))
    return x[:, idx[0]][:, :, idx[1]]


def drop_block(x: jnp.ndarray, prob: float, block: int, rng: jax.Array) -> jnp.ndarray:
    """DropBlock (seeds with rate prob / block^2 grown to block x block squares, shared
    across channels), rescaled by (number of mask entries) / (number kept)."""
    b, h, w, _ = x.shape
    seeds = jax.random.uniform(rng, (b, h, w, 1)) < prob / block**2
    pad = block // 2
    grown = jax.lax.reduce_window(
        seeds.astype(x.dtype), -jnp.inf, jax.lax.max, (1, block, block, 1), (1, 1, 1, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )[:, :h, :w]
    keep = 1.0 - grown
    return x * keep * (keep.size / jnp.maximum(keep.sum(), 1.0))


class FPN(nn.Module):
    """features [C3, C4, C5] (NHWC) -> [P3, P4, P5, P6, P7], each out_channels wide."""

    out_channels: int = 256
    drop_block_prob: float = 0.3
    drop_block_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray], deterministic: bool = True) -> list[jnp.ndarray]:
        if len(features) != 3 or any(f.ndim != 4 for f in features):
            raise ValueError(f"FPN expects 3 NHWC maps C3, C4, C5; got {[f.shape for f in features]}.")

        def conv_layer(name: str, kernel: int, strides: int = 1) -> nn.Conv:
            padding = "VALID" if kernel == 1 else TORCH_PAD1
            return conv(self.out_channels, (kernel, kernel), strides=strides, padding=padding,
                        name=name, dtype=self.dtype, kernel_init=FPN_INIT)

        features = [f.astype(self.dtype) for f in features]
        inner = conv_layer("fpn_inner4", 1)(features[2])
        results = [conv_layer("fpn_layer4", 3)(inner)]
        for level in (3, 2):  # C4 then C3
            lateral = conv_layer(f"fpn_inner{level}", 1)(features[level - 2])
            inner = lateral + nearest_resize(inner, lateral.shape[1:3])
            x = inner
            if not deterministic and self.drop_block_prob > 0:
                x = drop_block(x, self.drop_block_prob, self.drop_block_size, self.make_rng("dropout"))
            results.insert(0, conv_layer(f"fpn_layer{level}", 3)(x))
        top = TopBlocks(self.out_channels, self.dtype, name="top_blocks")(results[-1])
        outs = results + top
        return [nn.with_logical_constraint(o, ("batch", "height", "width", "embed")) for o in outs]


class TopBlocks(nn.Module):
    """P6 = conv3x3/s2(P5), P7 = conv3x3/s2(relu(P6))."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, p5: jnp.ndarray) -> list[jnp.ndarray]:
        def down(name: str) -> nn.Conv:
            return conv(self.out_channels, (3, 3), strides=2, padding=TORCH_PAD1, name=name,
                        dtype=self.dtype, kernel_init=FPN_INIT)

        p6 = down("p6")(p5)
        return [p6, down("p7")(nn.relu(p6))]
