"""The trainer's update step (glipjax.train_state, as jitted by the trainer) on random
inputs of a config's shapes: compile time, step time, images/s, FLOPs per step (XLA
cost analysis), achieved FLOP/s against a matmul peak measured on the same device,
and, on a GPU whose peak is known, model FLOPs utilisation (MFU).

  python benchmarks/train_step.py --config configs/demo.py [--config.data.batch_size=16 ...]
  python benchmarks/train_step.py --config configs/glip_t.py --config.data.batch_size=1 --steps 2
  python benchmarks/train_step.py --config configs/glip_t.py --config.data.batch_size=8 \\
      --config.model.dtype=bfloat16                                   # GPU MFU (goal >= 45%)
  python benchmarks/train_step.py --config configs/demo.py --profile runs/profile  # + a trace
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/train_step.py \\
      --config configs/demo.py                     # with tcmalloc (glipjax/allocator.py)
  GLIBC_TUNABLES=glibc.malloc.hugetlb=0 python benchmarks/train_step.py \\
      --config configs/demo.py                     # without the huge pages the commands turn on

With --profile DIR, a few more steps run under the JAX profiler: DIR then holds an XProf
trace (open it with `xprof --logdir DIR` or TensorBoard's profile plugin) and a Perfetto
trace (perfetto_trace.json.gz, for ui.perfetto.dev) that show where the step's time goes.
The script also prints the traced op time per step by model part (--profile-depth
submodule levels) and pass (forward or backward), from the op names that the compiled
program records for its ops (on the CPU, every XLA op is one trace event; ops that run
at once on several threads all count).

The FLOPs are XLA's count on the step as lowered, before compiling, for one CPU device
(the same program on every backend, so the count holds for the GPU too); it includes
every op and, with model.remat, the recomputed forward, so it is an upper estimate of
the useful FLOPs. The matmul peak is the best of a few square matmuls in the step's
compute dtype (float32 on CPU), timed right before and right after the steps: the
cores' speed drifts (on the 2-core machines of docs/benchmarks.md, 181-214 GFLOP/s
within an hour), and a peak timed in a slow moment would flatter the step. Each timed
step waits for the one before; images/s and the achieved FLOP/s come from their mean,
and the median is printed too: on those machines a few steps take up to twice as long
as the rest, with more kernel and user time but no more page faults (docs/benchmarks.md).
MFU divides the achieved FLOP/s by the device's dense bf16 peak from its datasheet
(PEAK_TFLOPS).
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the command may re-execute itself once (glipjax/allocator.py)
    from glipjax import allocator

    allocator.use_huge_pages()

import argparse
import collections
import gzip
import json
import os
import pathlib
import platform
import re
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from glipjax import allocator, aot, sharding, train_state
from glipjax.config import parse_command_line

TABLE_ROWS = 30  # the longest parts of the op-time table

# Dense bf16 peak per device (TFLOP/s), from the vendors' datasheets.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0, "TPU v4": 275.0}


def flops_of(*lowered) -> float:
    """FLOPs of jax.stages.Lowered programs by XLA's cost analysis (nan where the backend has none)."""
    total = 0.0
    for program in lowered:
        analysis = program.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0]
        total += float((analysis or {}).get("flops", float("nan")))
    return total


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A global batch of the pipeline's shapes with a few boxes per image."""
    b, (h, w), length, boxes = config.data.batch_size, config.data.canvas, config.data.max_text_len, config.data.max_boxes
    corner = rng.uniform(0, min(h, w) / 2, (b, boxes, 2))
    size = rng.uniform(16, min(h, w) / 3, (b, boxes, 2))
    positive = np.zeros((b, boxes, length), np.float32)
    positive[:, :, 1:3] = 0.5
    return {
        "images": rng.normal(size=(b, h, w, 3)).astype(np.float32),
        "input_ids": rng.integers(1000, 2000, (b, length)).astype(np.int32),
        "attention_mask": (np.arange(length)[None] < length // 2).repeat(b, 0).astype(np.int32),
        "gt_boxes": np.concatenate([corner, corner + size], -1).astype(np.float32),
        "gt_mask": (np.arange(boxes)[None, :] < min(boxes, 4)).repeat(b, 0),
        "positive_map": positive,
    }


def time_by_part(trace_dir: str, hlo_texts: list[str], steps: int, depth: int = 2) -> dict[str, float]:
    """Seconds per step of the traced XLA ops, summed over threads, by model part: the
    GLIP method and its first `depth` submodules, with " (backward)" for the transposed
    pass; "loss and update" for the rest of the step; "no op name" for ops the compiler
    added (copies, layout changes). Empty when the trace names no XLA ops."""
    op_names = {(re.match(r"HloModule ([\w.\-]+)", text).group(1), op): name for text in hlo_texts
                for op, name in re.findall(r"%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", text)}
    traces = sorted(pathlib.Path(trace_dir).glob("plugins/profile/*/perfetto_trace.json.gz"),
                    key=lambda f: f.stat().st_mtime)
    if not traces:
        return {}
    with gzip.open(traces[-1]) as f:
        events = json.load(f)["traceEvents"]
    seconds: collections.Counter[str] = collections.Counter()
    for event in events:
        op, module = event.get("args", {}).get("hlo_op"), event.get("args", {}).get("hlo_module")
        if event.get("ph") != "X" or op is None:
            continue
        name = op_names.get((module, op))
        method = re.search(rf"GLIP\.(\w+)((?:/[^/]+){{0,{depth}}})", name or "")
        if name is None:
            part = "no op name"
        elif method is None:
            part = "loss and update"
        else:
            part = method.group(1) + method.group(2) + (" (backward)" if "transpose(" in name else "")
        seconds[part] += event["dur"] * 1e-6 / steps
    return dict(seconds.most_common())


def processor() -> str:
    """The host CPU's model name and core count (figures are comparable only on the same kind)."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", info, re.M).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def matmul_peak(dtype: jnp.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on the default device."""
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_flops(config) -> float:
    """XLA's FLOP count of the step, lowered (not compiled) for one CPU device from
    abstract state and batch: the same program on every backend. A GPU's compiled count
    misses the library matmuls, and plugin backends such as CUDA's do not count lowered
    programs. A scan's body counts once, so the step is lowered unrolled."""
    config = config.copy_and_resolve_references()
    config.model.scan_layers = False
    mesh = sharding.make_mesh({}, jax.devices("cpu")[:1])
    rules = sharding.rules_from_config(config)
    model, glip_config, _ = train_state.build_model(config, load_text_weights=False)
    tx, schedule = train_state.make_tx(config)
    state = train_state.abstract_state(config, model, tx, mesh, rules)
    batch = aot.abstract_batch(config, mesh, rules)
    step = train_state.jit_train_step(config, model, glip_config, tx, schedule, state, mesh, rules)
    with sharding.sharding_context(mesh, rules):
        return flops_of(*step.lower(state, batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--profile", default="", help="a folder: trace --profile-steps more steps there")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--profile-depth", type=int, default=2, help="submodule levels of the op-time table")
    parser.add_argument("--matmul-size", type=int, default=0, help="0: 2048 on CPU, 8192 on accelerators")
    args, config = parse_command_line(parser)

    device = jax.devices()[0]
    mesh = sharding.make_mesh(dict(config.sharding.mesh))
    rules = sharding.rules_from_config(config)
    model, glip_config, text_params = train_state.build_model(config)
    tx, schedule = train_state.make_tx(config)
    state = train_state.init_state(config, model, tx, mesh, rules, text_params)
    batch = sharding.shard_batch(random_batch(config, np.random.default_rng(0)), mesh, rules)
    print(f"{config.model.preset} ({config.model.dtype}), batch {config.data.batch_size} of "
          f"{tuple(config.data.canvas)}, text {config.data.max_text_len}, mesh {dict(mesh.shape)} on "
          f"{mesh.size} x {device.device_kind}{f' ({processor()})' if device.platform == 'cpu' else ''}, "
          f"{allocator.describe()}", flush=True)

    start = time.perf_counter()
    step = train_state.jit_train_step(config, model, glip_config, tx, schedule, state, mesh, rules)
    with sharding.sharding_context(mesh, rules):
        compiled = step.compile(state, batch)
    print(f"compile {time.perf_counter() - start:.1f} s (lowering included)", flush=True)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    dtype = jnp.dtype(config.model.dtype)
    size = args.matmul_size or (2048 if device.platform == "cpu" else 8192)
    peak_before = matmul_peak(dtype, size)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    peak = max(peak_before, matmul_peak(dtype, size))
    step_s, median_s = float(np.mean(times)), float(np.median(times))
    print(f"step {step_s:.3f} s (median {median_s:.3f}, {min(times):.3f}-{max(times):.3f} over {args.steps}), "
          f"{config.data.batch_size / step_s:.2f} images/s, loss {float(metrics['loss']):.4f}", flush=True)

    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(args.profile_steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        print(f"profile of {args.profile_steps} steps in {args.profile}; op time per step by part:", flush=True)
        parts = time_by_part(args.profile, [program.as_text() for program in compiled], args.profile_steps,
                             args.profile_depth)
        if not parts:
            print("  (the trace names no XLA ops)")
        total = sum(parts.values())
        for part, seconds in list(parts.items())[:TABLE_ROWS]:
            print(f"  {1e3 * seconds:8.1f} ms {100 * seconds / total:5.1f}%  {part}")
        if len(parts) > TABLE_ROWS:
            rest = total - sum(list(parts.values())[:TABLE_ROWS])
            print(f"  {1e3 * rest:8.1f} ms {100 * rest / total:5.1f}%  the other {len(parts) - TABLE_ROWS} parts")

    flops = step_flops(config)
    achieved = flops / step_s / mesh.size
    at_median = flops / median_s / mesh.size
    print(f"{flops / 1e9:.1f} GFLOP per step; achieved {achieved / 1e9:.1f} GFLOP/s per device = "
          f"{100 * achieved / peak:.0f}% of the measured {dtype.name} matmul peak ({peak / 1e9:.1f} GFLOP/s, "
          f"{size}^3); at the median step {at_median / 1e9:.1f} GFLOP/s = {100 * at_median / peak:.0f}%")
    peak_bytes = (device.memory_stats() or {}).get("peak_bytes_in_use")
    if peak_bytes is not None:
        print(f"peak memory {peak_bytes / 2**30:.1f} GiB of {device.device_kind}")
    elif device.platform == "cpu":  # ru_maxrss is in KiB (Linux), as in the other benchmarks
        print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    spec = next((v for k, v in PEAK_TFLOPS.items() if k.lower() in device.device_kind.lower()), None)
    if spec is not None:
        print(f"MFU {100 * achieved / (spec * 1e12):.1f}% of the {device.device_kind} bf16 peak ({spec:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
