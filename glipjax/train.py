"""Training: python -m glipjax.train --config configs/X.py[:variant] --workdir DIR [--config.a=b ...]

Read top to bottom: logging and hosts, the workdir's checkpoints, mesh, model and
optimizer (glipjax.train_state), the sharded state (resumed or new) beside the input,
the update step, loop with metrics, checkpoints and evaluation, final report.

Rerunning the same command resumes from the last checkpoint in DIR; a rerun with
other config fields resumes too, logs them and keeps the run's earlier config.json as
config_to_step_<step>.json, unless the fields change the state's arrays (then it stops
and names them). A run that has finished says so and exits.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the command may re-execute itself once (glipjax/allocator.py)
    from glipjax import allocator

    allocator.use_huge_pages()

import argparse
import concurrent.futures
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from glipjax import allocator, aot, checkpoint, logs, paths, runs, sharding, train_eval, train_state
from glipjax.config import changed_fields, parse_command_line

log = logging.getLogger("glipjax.train")


def _initialize_hosts(args: argparse.Namespace) -> None:
    """jax.distributed for multi-host runs: from the flags, or from the environment
    (Cloud TPU, SLURM and JAX_COORDINATOR_ADDRESS are detected by JAX itself)."""
    if args.num_processes and args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID"):
        jax.distributed.initialize()


class MetricWriter:
    """Progress lines on the console plus metrics.jsonl and TensorBoard in the workdir
    (written by process 0 only)."""

    def __init__(self, workdir: epath.Path, total_steps: int):
        self.total_steps = total_steps
        self.active = jax.process_index() == 0
        self.jsonl = (workdir / "metrics.jsonl").open("a") if self.active else None
        self.tb = None
        if self.active:
            import tensorflow as tf

            self.tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        self.start_time, self.start_step = time.perf_counter(), None

    def write(self, step: int, metrics: dict[str, float], images_per_step: int | None = None) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        if images_per_step is not None:
            if self.start_step is None:
                self.start_time, self.start_step = now, step
            elif step > self.start_step:
                rate = (step - self.start_step) / (now - self.start_time)
                metrics = dict(metrics, images_per_s=rate * images_per_step,
                               eta_s=(self.total_steps - step) / rate)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        with self.tb.as_default():
            import tensorflow as tf

            for key, value in metrics.items():
                tf.summary.scalar(key, value, step=step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "eta_s")
        eta = f" eta {metrics['eta_s'] / 60:.1f} min" if "eta_s" in metrics else ""
        print(f"step {step}/{self.total_steps} {shown}{eta}", flush=True)

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tb.close()


def _in_background(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
    """fn(*args, **kwargs) in a daemon thread: the process does not wait for it to exit."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads the result
            future.set_exception(e)

    threading.Thread(target=run, name="input", daemon=True).start()
    return future


def check_bad_streak(streak: int, limit: int, workdir: epath.Path) -> None:
    """Stops training (FloatingPointError) once `limit` consecutive steps were skipped
    for a non-finite loss or gradient."""
    if streak >= limit:
        raise FloatingPointError(
            f"{streak} consecutive steps with a non-finite loss or gradient (train.max_bad_steps = {limit}); "
            f"last finite checkpoint kept in {workdir}")


def _finished(workdir: epath.Path, last_step: int, total_steps: int) -> dict[str, Any]:
    """A rerun of a finished run: says so and returns its final evaluation (if any)."""
    print(f"{workdir} has finished: its last checkpoint is step {last_step}, and train.steps is {total_steps}. "
          "To train on, rerun with a larger --config.train.steps.", flush=True)
    report = workdir / "eval.json"
    return json.loads(report.read_text()) if report.exists() else {}


def _config_changes(config: ml_collections.ConfigDict, workdir: epath.Path) -> list[str]:
    """The fields in which `config` differs from the config.json of the run in `workdir`."""
    saved = workdir / runs.CONFIG_FILE
    if not saved.exists():
        return []
    return changed_fields(json.loads(saved.read_text()), json.loads(config.to_json_best_effort()))


def _write_config(config: ml_collections.ConfigDict, workdir: epath.Path, changes: list[str], step: int) -> None:
    """Writes the run's config.json (process 0). A run resumed at `step` with `changes`
    keeps the config it had as config_to_step_<step>.json and logs the changes."""
    if jax.process_index() != 0:
        return
    saved = workdir / runs.CONFIG_FILE
    if changes:
        earlier = workdir / f"config_to_step_{step}.json"
        earlier.write_text(saved.read_text())
        log.warning("resuming at step %d with a config that differs from the run's %s in: %s (the earlier "
                    "config is kept as %s)", step, runs.CONFIG_FILE, "; ".join(changes), earlier.name)
    saved.write_text(config.to_json_best_effort(indent=2))


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` (a local path or a gs:// URI); returns
    the final metrics."""
    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    total_steps = config.train.steps
    train_eval.datasets(config)  # a dataset without its paths stops the run here

    # ---------------------------------------------------------------- checkpoints: a rerun resumes
    save_every = config.checkpoint.save_every
    best = config.checkpoint.get("best_metric") or None
    ckpt = checkpoint.Checkpointer(workdir, save_every=save_every, keep=config.checkpoint.keep, best_metric=best,
                                   best_mode=config.checkpoint.get("best_mode", "max"),
                                   keep_best=config.checkpoint.get("keep_best", 1))
    saved_steps = ckpt.all_steps()
    if saved_steps and saved_steps[-1] >= total_steps:
        ckpt.close()
        return _finished(workdir, saved_steps[-1], total_steps)
    changes = _config_changes(config, workdir) if saved_steps else []

    # ---------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(dict(config.sharding.mesh))
    rules = sharding.rules_from_config(config)
    log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    # ---------------------------------------------------------------- model and optimizer
    model, glip_config, text_params = train_state.build_model(config)
    tx, schedule = train_state.make_tx(config)
    abstract = train_state.abstract_state(config, model, tx, mesh, rules)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(abstract["params"]))
    log.info("model %s: %s parameters", config.model.preset, f"{n_params:,}")

    # ---------------------------------------------------------------- resumed state, or the params to start from
    # Read before the input opens: a checkpoint of another config, or a train.init_from
    # of another model, stops the run here.
    try:
        restored = ckpt.restore_latest(abstract)
    except checkpoint.StateMismatch as e:
        why = (f"Config fields changed since the run's {runs.CONFIG_FILE}: {'; '.join(changes)}. Rerun with the "
               "run's own config, choose another --workdir, or" if changes else
               f"The config is the run's own {runs.CONFIG_FILE}, so another version of glipjax wrote the "
               "checkpoint. Choose another --workdir, or")
        raise runs.RunError(f"cannot resume {workdir} with this config: {e}. {why} start a new run from its "
                            f"params with --config.train.init_from={workdir}") from None
    init_from = config.train.get("init_from") if restored is None else None
    if init_from:
        from glipjax import warm_start

        init_params = warm_start.source_params(config)

    # ---------------------------------------------------------------- input, opened in the background
    # Opening the input builds a TFDS dataset on first use (the demo's shapes: about
    # half a minute); it runs while the state is made and the step below compiles.
    from glipjax.data.pipeline import DataLoader

    data_dir = paths.data_dir(config, workdir)
    loader_future = _in_background(DataLoader, config, data_dir, mesh=mesh, rules=rules)
    batch_size = config.data.batch_size

    # ---------------------------------------------------------------- new state, unless resumed
    if restored is not None:
        _, state, data_state = restored
    else:
        state = train_state.init_state(config, model, tx, mesh, rules, text_params, abstract)
        if init_from:
            state["params"] = warm_start.merge(state["params"], init_params)
            del init_params
            if config.optim.ema_decay:
                state["ema"] = jax.tree_util.tree_map(jnp.copy, state["params"])
            log.info("params initialised from %s", init_from)
        else:
            text = ", the text encoder's from its pretrained weights" if text_params is not None else ""
            log.info("params initialised at random (seed %d)%s; no train.init_from", config.seed, text)
    _write_config(config, workdir, changes, int(state["step"]))

    # ---------------------------------------------------------------- the compiled update step
    log.info("compiling the update step")
    step_fn = train_state.jit_train_step(config, model, glip_config, tx, schedule, abstract, mesh, rules)
    if loader_future.done():
        loader_future.result()  # a bad input config stops the run here, before the compile
    with sharding.sharding_context(mesh, rules):
        step_fn = step_fn.compile(abstract, aot.abstract_batch(config, mesh, rules))
    loader = loader_future.result()
    if restored is not None:
        if data_state is None:
            log.warning("the checkpoint's input-pipeline state was saved by a different number of processes: "
                        "the input starts from its beginning")
        else:
            checkpoint.unpack_loader_state(loader, data_state)
        log.info("resumed from step %d", int(state["step"]))

    # ---------------------------------------------------------------- loop
    writer = MetricWriter(workdir, total_steps)
    step = int(state["step"])
    metrics: dict[str, Any] = {}
    evaluated: dict[str, float] | None = None
    previous: dict[str, Any] | None = None
    with checkpoint.stop_on_signals():  # SIGTERM (preemption) or Ctrl-C: save, then stop
        while step < total_steps:
            state, metrics = step_fn(state, next(loader))
            step += 1
            if previous is not None:  # the step before, read once this one is queued: the host does not wait
                check_bad_streak(int(previous["bad_streak"]), config.train.max_bad_steps, workdir)
            previous = metrics
            if step % config.train.log_every == 0 or step == total_steps:
                writer.write(step, {k: float(v) for k, v in metrics.items()}, images_per_step=batch_size)
            evaluated = None
            if train_eval.enabled(config) and (
                    step == total_steps or (config.eval.every and step % config.eval.every == 0)):
                pictures = workdir if step == total_steps and jax.process_index() == 0 else None
                evaluated = train_eval.evaluate(config, model, glip_config, state["params"], step, mesh, data_dir,
                                                pictures)
                writer.write(step, evaluated)
            stop = checkpoint.stop_requested(step) and step < total_steps  # the last step ends anyway
            if stop or step % save_every == 0 or step == total_steps or (best and evaluated):
                check_bad_streak(int(metrics["bad_streak"]), config.train.max_bad_steps, workdir)
                ckpt.save(step, state, checkpoint.pack_loader_state(loader), metrics=evaluated if best else None,
                          force=True)
            if stop:
                ckpt.wait()
                print(f"{checkpoint.stop_reason()} at step {step}: checkpoint saved; rerun the same command to resume",
                      flush=True)
                sys.exit(0)
    ckpt.close()
    loader.close()
    final = {k: float(v) for k, v in metrics.items()}
    if evaluated:
        final.update(evaluated)
        if jax.process_index() == 0:
            (workdir / "eval.json").write_text(json.dumps(evaluated, indent=2))
    writer.close()
    return final


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and reports go here")
    parser.add_argument("--coordinator", help="multi-host: address:port of process 0")
    parser.add_argument("--num-processes", type=int, default=0, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=0, help="multi-host: this process's index")
    args, config = parse_command_line(parser, argv, train_eval.default_fields())
    logs.to_console()
    _initialize_hosts(args)
    if jax.default_backend() == "cpu":
        log.info("memory allocator: %s (glipjax/allocator.py)", allocator.describe())
        if advice := allocator.hint():
            log.info(advice)
    paths.enable_compilation_cache()
    try:
        train(config, args.workdir)
    except runs.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
