"""Training: python -m glipjax.train --config configs/X.py[:variant] --workdir DIR [--config.a=b ...]

Read top to bottom: logging and hosts, mesh, input, model and optimizer, sharded
state, update step, checkpoint and resume, loop with metrics and evaluation, final
report. Rerunning the same command resumes from the last checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from glipjax import checkpoint, convert, optim, pretrained, sharding
from glipjax.config import parse_command_line
from glipjax.models.glip import GLIP, config_from_fields, losses

log = logging.getLogger("glipjax.train")


def _initialize_hosts(args: argparse.Namespace) -> None:
    """jax.distributed for multi-host runs: from the flags, or from the environment
    (Cloud TPU, SLURM and JAX_COORDINATOR_ADDRESS are detected by JAX itself)."""
    if args.num_processes and args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID"):
        jax.distributed.initialize()


def _evaluate(config: ml_collections.ConfigDict, model: GLIP, params: Any, glip_config: Any,
              data_dir: pathlib.Path, pictures: pathlib.Path | None = None) -> dict[str, float]:
    """The configured evaluations (today: the shapes splits, with the true prompt and the
    swapped-colour control), flattened as "<split>/<mode>/<metric>". With `pictures`, the
    true-prompt predictions of each split are drawn to <pictures>/predictions_<split>.png."""
    from glipjax.eval.shapes import evaluate_shapes

    results: dict[str, float] = {}
    max_images = config.eval.max_images or None
    for split in config.eval.splits:
        for mode in config.eval.prompt_modes:
            picture = pictures / f"predictions_{split}.png" if pictures is not None and mode == "true" else None
            report = evaluate_shapes(_apply_fn(model), params, glip_config, config, data_dir, split, mode,
                                     max_images, progress=False, picture=picture)
            for key in ("AP", "AP50", "novel_AP", "novel_AP50"):
                if key in report:
                    results[f"{split}/{mode}/{key}"] = float(report[key])
    return results


_APPLY_FNS: dict[int, Any] = {}


def _apply_fn(model: GLIP) -> Any:
    """One function object per model, so the evaluator's compiled forward is reused."""
    if id(model) not in _APPLY_FNS:
        _APPLY_FNS[id(model)] = lambda p, *x: model.apply({"params": p}, *x)
    return _APPLY_FNS[id(model)]


class MetricWriter:
    """Progress lines on the console plus metrics.jsonl and TensorBoard in the workdir
    (written by process 0 only)."""

    def __init__(self, workdir: pathlib.Path, total_steps: int):
        self.total_steps = total_steps
        self.active = jax.process_index() == 0
        self.jsonl = open(workdir / "metrics.jsonl", "a") if self.active else None
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


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the final metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    total_steps = config.train.steps

    # ---------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(dict(config.sharding.mesh))
    rules = sharding.rules_from_config(config)
    log.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    # ---------------------------------------------------------------- input
    from glipjax.data.pipeline import DataLoader

    data_dir = workdir / config.data.data_dir if not os.path.isabs(config.data.data_dir) else config.data.data_dir
    loader = DataLoader(config, data_dir, mesh=mesh, rules=rules)
    canvas = tuple(config.data.canvas)
    batch_size = config.data.batch_size

    # ---------------------------------------------------------------- model and optimizer
    text_config, text_params = None, None
    if config.model.text_encoder:
        text_config, text_params = convert.load_hf_bert(pretrained.resolve_text_encoder(config.model.text_encoder))
    glip_config = config_from_fields(config.model, text_config, config.data.max_text_len)
    dtype = jnp.dtype(config.model.dtype)
    model = GLIP(glip_config, dtype=dtype)
    tx = optim.make_optimizer(config.optim, total_steps)
    schedule = optim.make_schedule(config.optim, total_steps)
    ema_decay = config.optim.ema_decay

    # ---------------------------------------------------------------- sharded state
    length = config.data.max_text_len
    example = (jnp.zeros((1, *canvas, 3)), jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))

    def init_params(rng, pretrained_text):
        params = model.init(rng, *example)["params"]
        if pretrained_text is not None:  # an argument, not a jit constant: same logical boxes
            params = dict(params)
            params["language_backbone"] = jax.tree_util.tree_map(
                lambda box, value: box.replace_boxed(value), params["language_backbone"], pretrained_text,
                is_leaf=lambda x: hasattr(x, "replace_boxed"),
            )
        return params

    with sharding.sharding_context(mesh, rules):
        params, opt_state = sharding.create_sharded(
            init_params, mesh, rules, jax.random.PRNGKey(config.seed), text_params, tx=tx)
    state = {
        "params": params,
        "opt_state": opt_state,
        "ema": jax.tree_util.tree_map(jnp.copy, params) if ema_decay else {},
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(config.seed + 1),
    }
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    log.info("model %s: %s parameters", config.model.preset, f"{n_params:,}")

    # ---------------------------------------------------------------- update step
    def train_step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        rng, dropout_rng = jax.random.split(state["rng"])

        def loss_fn(params):
            out = model.apply({"params": params}, batch["images"].astype(dtype), batch["input_ids"],
                              batch["attention_mask"], deterministic=False, rngs={"dropout": dropout_rng})
            parts = losses(glip_config, out, batch["gt_boxes"], batch["gt_mask"], batch["positive_map"],
                           batch["attention_mask"], canvas)
            return parts["total"], parts

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"], loss=loss)
        params = optax.apply_updates(state["params"], updates)
        ema = optim.ema_update(state["ema"], params, ema_decay) if ema_decay else state["ema"]
        consecutive, total_bad = optim.bad_step_counts(opt_state)
        metrics = {
            "loss": loss, "token": parts["token"], "giou": parts["giou"], "centerness": parts["centerness"],
            "positives": parts["num_positives"], "grad_norm": optax.global_norm(grads),
            "lr": schedule(optim.applied_updates(opt_state)), "bad_steps": total_bad, "bad_streak": consecutive,
        }
        new_state = dict(state, params=params, opt_state=opt_state, ema=ema, step=state["step"] + 1, rng=rng)
        return new_state, metrics

    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    with sharding.sharding_context(mesh, rules):
        step_fn = jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
                          out_shardings=(state_shardings, None), donate_argnums=(0,))

    # ---------------------------------------------------------------- checkpoint and resume
    save_every = config.checkpoint.save_every
    ckpt = checkpoint.Checkpointer(workdir, save_every=save_every, keep=config.checkpoint.keep)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        _, state, data_state = restored
        checkpoint.unpack_loader_state(loader, data_state)
        log.info("resumed from step %d", int(state["step"]))
    checkpoint.install_sigterm_handler()

    # ---------------------------------------------------------------- loop
    writer = MetricWriter(workdir, total_steps)
    step = int(state["step"])
    metrics: dict[str, Any] = {}
    while step < total_steps:
        batch = next(loader)
        with sharding.sharding_context(mesh, rules):
            state, metrics = step_fn(state, batch)
        step += 1
        if int(metrics["bad_streak"]) >= config.train.max_bad_steps:
            raise FloatingPointError(
                f"{int(metrics['bad_streak'])} consecutive steps with a non-finite loss or gradient "
                f"(train.max_bad_steps = {config.train.max_bad_steps}); last finite checkpoint kept in {workdir}")
        if step % config.train.log_every == 0 or step == total_steps:
            writer.write(step, {k: float(v) for k, v in metrics.items()}, images_per_step=batch_size)
        if config.eval.every and step % config.eval.every == 0 and step < total_steps:
            writer.write(step, _evaluate(config, model, state["params"], glip_config, data_dir))
        preempted = checkpoint.preemption_requested(step)
        if preempted or step % save_every == 0 or step == total_steps:
            ckpt.save(step, state, checkpoint.pack_loader_state(loader), force=True)
        if preempted:
            ckpt.wait()
            print(f"preempted at step {step}: checkpoint saved; rerun the same command to resume", flush=True)
            sys.exit(0)
    ckpt.close()
    loader.close()
    final = {k: float(v) for k, v in metrics.items()}
    if config.eval.splits:
        pictures = workdir if jax.process_index() == 0 else None
        results = _evaluate(config, model, state["params"], glip_config, data_dir, pictures)
        writer.write(step, results)
        final.update(results)
        if jax.process_index() == 0:
            (workdir / "eval.json").write_text(json.dumps(results, indent=2))
    writer.close()
    return final


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and reports go here")
    parser.add_argument("--coordinator", help="multi-host: address:port of process 0")
    parser.add_argument("--num-processes", type=int, default=0, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=0, help="multi-host: this process's index")
    args, config = parse_command_line(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _initialize_hosts(args)
    train(config, args.workdir)


if __name__ == "__main__":
    main()
