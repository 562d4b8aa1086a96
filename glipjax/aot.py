"""Ahead-of-time memory check of the training step for a target mesh:

  python -m glipjax.aot --config configs/glip_t.py --mesh data=1,fsdp=8,tensor=1 --devices 8
      [--hbm 16GiB] [--out report.json] [--state-only] [--config.data.batch_size=8 ...]

The step (glipjax.train_state, exactly what the trainer jits: a gradients program and
an update program) is lowered with the abstract state and an abstract global batch of
the config's shapes on a mesh of N CPU devices simulated on this machine
(XLA_FLAGS=--xla_force_host_platform_device_count=N; nothing is allocated), compiled,
and XLA's memory analysis of one device's partitioned programs is reported: for the
gradients program its outputs (gradients, loss) and temporaries (activations kept for
the backward pass plus scratch); for the update program its arguments (state,
gradients), outputs, their aliasing (the state is donated) and temporaries.
Params, optimizer-state, EMA and batch bytes per device are summed from the shardings
(shard shape x item size). Each program's peak is what is live while it runs: the
gradients program's is state + batch + outputs + temporaries, the update's arguments +
outputs - aliased + temporaries; the per-device total is the larger. With --hbm, a
total over the budget exits with status 1 and says what to change, so a run is checked
before a pod is booked.

The figures are XLA:CPU's. Argument and output sizes are those of any backend; the
temporaries are an estimate: XLA:CPU schedules for the CPU and may compute bfloat16 ops
in float32, so TPU and GPU compilers usually need less. It shows rematerialisation's
savings on GLIP-T (docs/scaling.md: 9.36 GiB with remat, 30.00 GiB without) but not
always (a toy 16-layer MLP with jax.checkpoint on each layer: more with it than without).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

# jax (and everything that imports it) is imported inside the functions: main must set
# the simulated device count before jax starts (cpu_devices).
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Only LLVM code generation is cut: the buffer assignment, and so every size reported,
# comes from the HLO passes before it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STATE_ONLY_NOTE = "not compiled (--state-only): state and batch only, activations and temporaries not counted"
NOTE = ("XLA:CPU estimate: argument/output sizes hold on any backend; temporaries are XLA:CPU's "
        "(bfloat16 work may count as float32; TPU/GPU usually need less)")


class AotError(ValueError):
    """A mesh, batch or device request that cannot be compiled."""


def parse_bytes(text: str) -> int:
    """Bytes from "16GiB", "80GB", "512MiB" or a plain number."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise AotError(f"cannot read a size from {text!r}; write e.g. 16GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def parse_mesh(text: str) -> dict[str, int]:
    """{"data": 2, "fsdp": 4} from "data=2,fsdp=4" (omitted axes are 1; one may be -1)."""
    axes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, size = item.partition("=")
        if not eq or not re.fullmatch(r"-?[0-9]+", size.strip()):
            raise AotError(f"mesh item {item!r} is not AXIS=SIZE (e.g. data=2,fsdp=4,tensor=1)")
        if name.strip() in axes:
            raise AotError(f"mesh axis {name.strip()!r} given twice in {text!r}")
        axes[name.strip()] = int(size)
    if not axes:
        raise AotError("--mesh is empty; write e.g. data=2,fsdp=4,tensor=1")
    return axes


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cpu_devices(n: int) -> list[Any]:
    """n CPU devices of this process. Asks XLA for n fake host devices (and the CPU
    platform only) when jax has not been imported yet; afterwards only the devices the
    process already has can be used."""
    if n < 1:
        raise AotError(f"--devices must be at least 1, got {n}")
    if "jax" not in sys.modules:
        flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={n}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    devices = jax.devices("cpu")
    if len(devices) < n:
        raise AotError(
            f"{n} CPU devices are needed but this process has {len(devices)}: jax was imported before "
            f"glipjax.aot could set XLA_FLAGS={DEVICE_COUNT_FLAG}={n}. Run `python -m glipjax.aot ...` in a "
            f"fresh process (or set XLA_FLAGS yourself before importing jax)")
    return devices[:n]


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the
    largest shard: shards of unevenly split dims differ)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def batch_shards(mesh: Any, rules: Any) -> int:
    """Into how many parts the mesh splits the batch (the "batch" rule's mesh axes)."""
    from glipjax import sharding

    spec = sharding.batch_sharding(mesh, rules).spec
    axes = spec[0] if spec else None
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def abstract_batch(config: Any, mesh: Any, rules: Any) -> dict[str, Any]:
    """The global batch the trainer's DataLoader yields (glipjax.data.pipeline
    BATCH_FIELDS), as ShapeDtypeStructs split over the batch axes of the mesh."""
    import jax
    import jax.numpy as jnp

    from glipjax import sharding

    data = config.data
    b, (h, w), length, boxes = data.batch_size, tuple(data.canvas), data.max_text_len, data.max_boxes
    spec = sharding.batch_sharding(mesh, rules)
    shards = batch_shards(mesh, rules)
    if b < 1:
        raise AotError(f"data.batch_size must be at least 1, got {b}")
    if b % shards:
        raise AotError(
            f"global batch {b} (data.batch_size) does not divide over the {shards} batch shards of mesh "
            f"{dict(mesh.shape)} (the batch is split over {spec.spec[0]}); use a multiple of {shards}, "
            f"e.g. --config.data.batch_size={shards * max(1, round(b / shards))}")
    shapes = {
        "images": ((b, h, w, 3), jnp.float32), "input_ids": ((b, length), jnp.int32),
        "attention_mask": ((b, length), jnp.int32), "gt_boxes": ((b, boxes, 4), jnp.float32),
        "gt_mask": ((b, boxes), jnp.bool_), "positive_map": ((b, boxes, length), jnp.float32),
        # image_id is int64 on the host; without jax_enable_x64 it becomes int32 on devices.
        "image_sizes": ((b, 2), jnp.int32), "image_id": ((b,), jnp.int32), "source": ((b,), jnp.int32),
    }
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=spec) for k, (shape, dtype) in shapes.items()}


def analyze(config: Any, mesh: Any, rules: Any, compile_step: bool = True) -> dict[str, Any]:
    """The memory report (bytes per device) of the train step of `config` on `mesh`:
    compiled, or with compile_step=False only the state and batch from their shardings
    (seconds instead of minutes; a lower bound on the total)."""
    import jax

    from glipjax import sharding, train_state

    model, glip_config, _ = train_state.build_model(config, load_text_weights=False)
    tx, schedule = train_state.make_tx(config)
    state = train_state.abstract_state(config, model, tx, mesh, rules)
    batch = abstract_batch(config, mesh, rules)
    memory = {
        "params": per_device_bytes(state["params"]),
        "opt_state": per_device_bytes(state["opt_state"]),
        "ema": per_device_bytes(state["ema"]),
        "batch": per_device_bytes(batch),
    }
    compile_s = None
    if compile_step:
        step = train_state.jit_train_step(config, model, glip_config, tx, schedule, state, mesh, rules)
        start = time.perf_counter()
        with sharding.sharding_context(mesh, rules):
            compiled = step.compile(state, batch, FAST_COMPILE)
        compile_s = round(time.perf_counter() - start, 1)
        for name, program in compiled._asdict().items():
            stats = program.memory_analysis()
            if stats is None:
                raise AotError(f"the {jax.default_backend()} backend gives no memory analysis")
            memory[name] = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
                            "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
                            "generated_code": stats.generated_code_size_in_bytes}
        grads, update = memory["gradients"], memory["update"]
        # The gradients program reads only the params and batch, but the whole state stays live.
        grads["peak"] = per_device_bytes(state) + memory["batch"] + grads["outputs"] + grads["temporaries"]
        update["peak"] = update["arguments"] + update["outputs"] - update["aliased"] + update["temporaries"]
        memory["total"] = max(grads["peak"], update["peak"])
    else:
        memory["total"] = sum(memory.values())
    return {
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "global_batch": config.data.batch_size,
        "batch_per_device": config.data.batch_size // batch_shards(mesh, rules),
        "canvas": list(config.data.canvas),
        "max_text_len": config.data.max_text_len,
        "preset": config.model.preset,
        "dtype": config.model.dtype,
        "remat": bool(config.model.remat),
        "param_count": sum(x.size for x in jax.tree.leaves(state["params"])),
        "param_bytes_total": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"])),
        "per_device": memory,
        "compiled": compile_step,
        "compile_s": compile_s,
        "note": NOTE if compile_step else STATE_ONLY_NOTE,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned table."""
    m = report["per_device"]
    rows = [
        ("params (from shardings)", m["params"]),
        ("optimizer state (from shardings)", m["opt_state"]),
        ("EMA (from shardings)", m["ema"]),
        ("batch shard", m["batch"]),
    ]
    if report["compiled"]:
        grads, update = m["gradients"], m["update"]
        rows += [
            ("gradients program (XLA):", None),
            ("  outputs: gradients, loss", grads["outputs"]),
            ("  temporaries: activations + scratch", grads["temporaries"]),
            ("  peak = state + batch + outputs + temporaries", grads["peak"]),
            ("update program (XLA):", None),
            ("  arguments: state, gradients, loss", update["arguments"]),
            ("  outputs", update["outputs"]),
            ("  aliased with arguments (donated)", update["aliased"]),
            ("  temporaries", update["temporaries"]),
            ("  peak = arguments + outputs - aliased + temporaries", update["peak"]),
            ("total = the larger peak", m["total"]),
        ]
    else:
        rows.append(("total of the above", m["total"]))
    compiled = f"; compiled in {report['compile_s']:.0f} s" if report["compiled"] else ""
    head = (f"{report['preset']} ({report['param_count']:,} params, {report['dtype']}, remat {report['remat']}) "
            f"on mesh {report['mesh']} = {report['devices']} devices; global batch {report['global_batch']} "
            f"({report['batch_per_device']} per device), canvas {report['canvas']}, {report['max_text_len']} tokens"
            f"{compiled}")
    width = max(len(name) for name, _ in rows)
    lines = [head, "per device:"] + [f"  {name:<{width}}  {format_bytes(value):>11}" if value is not None
                                     else f"  {name}" for name, value in rows]
    return "\n".join(lines + [f"note: {report['note']}"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glipjax.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, required=True, help="number of devices of the target mesh")
    parser.add_argument("--mesh", help="data=A,fsdp=B,tensor=C (default: the config's sharding.mesh)")
    parser.add_argument("--hbm", help="per-device memory budget, e.g. 16GiB or 80GB; exit 1 when exceeded")
    parser.add_argument("--out", help="also write the report as JSON to this file")
    parser.add_argument("--state-only", action="store_true",
                        help="skip the compile: params, optimizer state, EMA and batch per device only (seconds)")
    # The device count must be set before jax (and so the config) is imported.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--devices", type=int)
    devices = None
    if (count := early.parse_known_args(argv)[0].devices) is not None:
        try:
            devices = cpu_devices(count)
        except AotError as e:
            parser.error(str(e))

    from glipjax import sharding
    from glipjax.config import parse_command_line

    args, config = parse_command_line(parser, argv)  # --help, or a missing --devices, ends here
    try:
        budget = parse_bytes(args.hbm) if args.hbm else None
        axes = parse_mesh(args.mesh) if args.mesh else dict(config.sharding.mesh)
        mesh = sharding.make_mesh(axes, devices)
        rules = sharding.rules_from_config(config)
        abstract_batch(config, mesh, rules)  # checks the batch before the long compile
    except ValueError as e:
        parser.error(str(e))
    if not args.state_only:
        print(f"compiling the {config.model.preset} train step for mesh {dict(mesh.shape)} on {len(devices)} "
              f"simulated CPU devices...", flush=True)
    report = analyze(config, mesh, rules, compile_step=not args.state_only)
    report["config"] = args.config
    report["hbm"] = budget
    total = report["per_device"]["total"]
    report["fits"] = None if budget is None else total <= budget
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if report["fits"] is False:
        m = report["per_device"]
        activations = m["gradients"]["temporaries"] if report["compiled"] else 0
        print(f"glipjax.aot: per-device memory {format_bytes(total)} exceeds the budget --hbm {args.hbm} "
              f"({format_bytes(budget)}): params+optimizer+EMA {format_bytes(m['params'] + m['opt_state'] + m['ema'])}, "
              f"activations and scratch {format_bytes(activations)}. Raise fsdp to split the state, lower the "
              f"per-device batch, or turn on --config.model.remat=true.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
