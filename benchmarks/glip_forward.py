"""GLIP forward on the CPU (random weights): compile time, seconds per image, peak
memory, and the FLOPs of a forward and of a forward+backward step (XLA cost analysis).

  python benchmarks/glip_forward.py [--model glip_t] [--height 800] [--width 1333] [--batch 1] [--repeats 3]
                                    [--remat] [--run-backward]

The training step is compiled for its FLOPs and XLA memory analysis; it is run only
with --run-backward (it needs more host memory than the forward).

The image is padded to a multiple of 32 (800x1333 -> 800x1344) and the text to 256 tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from glipjax.models.glip import GLIP, PRESETS, SIZE_DIVISIBILITY, losses


def padded(n: int) -> int:
    return -(-n // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY


def flops(compiled_or_lowered) -> float:
    analysis = compiled_or_lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="glip_t", choices=sorted(PRESETS))
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-backward", action="store_true", help="do not compile the training step")
    parser.add_argument("--run-backward", action="store_true", help="also run the training step once")
    parser.add_argument("--remat", action="store_true", help="rematerialise every block (less memory)")
    args = parser.parse_args()

    config = dataclasses.replace(PRESETS[args.model](), remat=args.remat)
    model = GLIP(config)
    h, w = padded(args.height), padded(args.width)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, h, w, 3)), jnp.float32)
    length = config.max_text_len
    ids = jnp.asarray(rng.integers(1000, 2000, size=(args.batch, length)), jnp.int32)
    mask = jnp.zeros((args.batch, length), jnp.int32).at[:, :12].set(1)
    print(f"{args.model}{' (remat)' if args.remat else ''}: input {args.batch}x{h}x{w}, text {length} tokens, devices {jax.devices()}")

    t = time.perf_counter()
    params = meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images[:1, :64, :64], ids[:1], mask[:1])["params"])
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"init: {n_params:,} parameters in {time.perf_counter() - t:.1f} s")

    forward = jax.jit(lambda p, im, i, m: model.apply({"params": p}, im, i, m)["dot_product_logits"])
    t = time.perf_counter()
    compiled = forward.lower(params, images, ids, mask).compile()
    compile_s = time.perf_counter() - t
    out = compiled(params, images, ids, mask)
    jax.block_until_ready(out)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(params, images, ids, mask))
        times.append(time.perf_counter() - t)
    mem = compiled.memory_analysis()
    print(f"forward: compile {compile_s:.1f} s, {np.median(times) / args.batch:.2f} s per image "
          f"(median of {args.repeats}), {flops(compiled) / 1e9:.1f} GFLOP per batch")
    if mem is not None:
        print(f"forward buffers (XLA): temp {mem.temp_size_in_bytes / 2**30:.2f} GiB, "
              f"arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB")
    print(f"peak host memory so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    if args.skip_backward:
        return
    boxes = jnp.asarray([[[100.0, 120.0, 400.0, 500.0]]] * args.batch)
    gt_mask = jnp.ones((args.batch, 1), bool)
    pmap = jnp.zeros((args.batch, 1, length)).at[:, 0, 1].set(1.0)

    def loss(p, im, i, m, b, g, pm):
        out = model.apply({"params": p}, im, i, m)
        return losses(config, out, b, g, pm, m, (h, w))["total"]

    step_args = (params, images, ids, mask, boxes, gt_mask, pmap)
    t = time.perf_counter()
    step = jax.jit(jax.value_and_grad(loss)).lower(*step_args).compile()
    print(f"forward+backward: compile {time.perf_counter() - t:.1f} s, "
          f"{flops(step) / 1e9:.1f} GFLOP per batch (XLA cost analysis)")
    mem = step.memory_analysis()
    if mem is not None:
        # Note: XLA:CPU does not honour jax.checkpoint in this figure (--remat shows no saving here).
        print(f"forward+backward buffers (XLA): temp {mem.temp_size_in_bytes / 2**30:.2f} GiB")
    if not args.run_backward:
        return
    t = time.perf_counter()
    jax.block_until_ready(step(*step_args))
    print(f"forward+backward: first run {time.perf_counter() - t:.1f} s; "
          f"peak host memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
