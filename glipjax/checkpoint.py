"""Training checkpoints with Orbax: periodic asynchronous saves, retention, preemption and Ctrl-C.

Layout of a workdir's checkpoints (one Orbax CheckpointManager under `<workdir>/checkpoints`):

    checkpoints/<step>/state   the trainer's state pytree (params, opt_state, ema, step,
                               rng, ...; any pytree of arrays) via StandardSave
    checkpoints/<step>/data    every process's data-pipeline state as raw bytes, one file
                               per process: process_<i>_of_<n>, written by process i of n

Both items are written by one `save` and published together by Orbax's atomic rename of
the step's temporary folder, so a crash mid-save never leaves a step with one item
missing. The data loader's `save(directory)`/`restore(directory)` write files, so the
trainer packs them into bytes with `pack_loader_state(loader)` and unpacks with
`unpack_loader_state(loader, blob)` (a tar archive of that directory): keeping the files
inside Orbax's item avoids writing into a step folder that Orbax may still be
finalising, deleting, or that another host owns. Each host reads its own part of the
data, so each saves and restores its own state; a run resumed with a different number
of processes gets no data state back (None) and its input starts afresh.

Typical loop (single or multi host):

    ckpt = Checkpointer(workdir, **config.checkpoint)  # save_every, keep, best_metric, ...
    restored = ckpt.restore_latest(abstract_state)     # ShapeDtypeStructs with shardings
    if restored: step, state, blob = restored; unpack_loader_state(loader, blob)
    with stop_on_signals():                            # SIGTERM, Ctrl-C: save, then stop
        for step in range(step + 1, total + 1):
            state = train_step(state, next(loader))
            ckpt.save(step, state, pack_loader_state(loader))   # no-op off the interval
            if stop_requested(step):
                ckpt.save(step, state, pack_loader_state(loader), force=True); ckpt.wait(); break
    ckpt.close()
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pathlib
import signal
import sys
import tarfile
import tempfile
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from glipjax import paths, sharding

PyTree = Any

STATE_ITEM = "state"
DATA_ITEM = "data"
BEST_MODES = ("max", "min")
_SHOWN = 4  # differing arrays named in a mismatch message

log = logging.getLogger(__name__)


def _host_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}_of_{process_count}"


class HostBytesHandler(ocp.AsyncCheckpointHandler):
    """An Orbax item of per-process bytes: every process writes and reads its own file."""

    async def async_save(self, directory: epath.Path, args: HostBytes) -> list[ocp.future.Future]:
        async def write() -> None:
            self.save(directory, args)

        # Waits for Orbax to have created the item's folder (on the primary process).
        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="host_bytes_save")]

    def save(self, directory: epath.Path, args: HostBytes) -> None:
        if args.blob is None:
            raise ValueError("HostBytes to save needs its blob")
        (directory / _host_file(jax.process_index(), jax.process_count())).write_bytes(args.blob)

    def restore(self, directory: epath.Path, args: HostBytes | None = None) -> bytes | None:
        """This process's bytes; None if they were saved by a different number of processes."""
        count = jax.process_count()
        path = directory / _host_file(jax.process_index(), count)
        if path.exists():
            return path.read_bytes()
        saved = [p.name for p in directory.iterdir() if p.name.startswith("process_")]
        if saved and not any(name.endswith(f"_of_{count}") for name in saved):
            return None
        raise FileNotFoundError(f"{path} is missing")


@ocp.args.register_with_handler(HostBytesHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class HostBytes(ocp.args.CheckpointArgs):
    """Save: this process's `blob`. Restore: no fields."""

    blob: bytes | None = None


class StateMismatch(ValueError):
    """A checkpoint whose arrays are not those of the state to restore (e.g. a run of
    another model config); the message names the differences."""


def saved_tree(directory: str | os.PathLike) -> PyTree:
    """The nested dicts of array metadata (shape, dtype) of a tree saved with Orbax's
    StandardSave or export_params in `directory`, read without its arrays."""
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(directory))
    return getattr(metadata, "tree", metadata)


def tree_differences(expected: PyTree, stored: PyTree) -> list[str]:
    """How `stored` (array metadata, e.g. `saved_tree`) differs from `expected` (arrays
    or ShapeDtypeStructs) by leaf path and shape, in words: missing, unexpected and
    mis-shaped leaves, a few named; empty when they match."""
    def flat(tree: PyTree) -> dict[str, Any]:
        return {sharding._path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def saved_shape(leaf: Any) -> tuple[int, ...]:  # a PRNG key is saved as its key data
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(leaf.shape)

    want, have = flat(expected), flat(stored)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if saved_shape(want[k]) != tuple(have[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:_SHOWN])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:_SHOWN])})")
    if shapes:
        shown = ", ".join(f"{k} {tuple(have[k].shape)} vs {saved_shape(want[k])} expected" for k in shapes[:_SHOWN])
        problems.append(f"{len(shapes)} of another shape ({shown})")
    return problems


class Checkpointer:
    """Saves and restores (state, data state) steps of one run under `<workdir>/checkpoints`.

    save_every: `save` writes only on multiples of this step (or with force=True).
    keep: the most recent `keep` steps are kept.
    best_metric / best_mode / keep_best: also keep the `keep_best` steps with the best
      value of metrics[best_metric] ("max" or "min") among saves that passed metrics.
    async_save: `save` returns after copying arrays to host; the write finishes in the
      background (call `wait()` before relying on it, `close()` at the end).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        save_every: int = 1000,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
        async_save: bool = True,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the latest step is needed to resume), got {keep}")
        if best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")
        if best_metric is not None and keep_best < 1:
            raise ValueError(f"keep_best must be >= 1 when best_metric is set, got {keep_best}")
        self.directory = paths.as_path(workdir) / "checkpoints"
        self.best_metric = best_metric
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
        best_fn = None if best_metric is None else _metric_getter(best_metric)
        if best_fn is not None:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn,
                reverse=best_mode == "min",
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            # Only the interval and JAX's multi-host preemption sync point, not Orbax's
            # default extra save of a run's first step.
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn only makes Orbax write each step's metrics, so a resumed run
            # still knows which steps are best; retention is the policy above.
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE_ITEM, DATA_ITEM), options=options)

    def save(
        self,
        step: int,
        state: PyTree,
        data_state: bytes,
        metrics: dict[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `step` if it is on the interval (or `force`); returns whether it saved.
        Every process calls it with its own `data_state`.

        A step that already exists is never overwritten (returns False). With keep-best,
        `metrics` should hold `best_metric` for the step to compete for best.
        """
        if not isinstance(data_state, bytes):
            raise TypeError(f"data_state must be bytes, got {type(data_state).__name__}")
        if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
            raise KeyError(f"metrics {sorted(metrics)} lack the best_metric {self.best_metric!r}")
        if force:
            self._manager.wait_until_finished()
            if step in self._manager.all_steps():
                return False
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self._manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(state),
                DATA_ITEM: HostBytes(data_state),
            }),
            metrics=metrics,
            force=force,
        )

    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree, bytes | None] | None:
        """(step, state, data_state) of the newest restorable step, or None if none exists.
        data_state is this process's bytes, or None if the step was saved by a different
        number of processes.

        `abstract_state` mirrors the saved state with jax.ShapeDtypeStruct leaves whose
        `sharding` says where each restored array goes (any mesh; arrays are resharded
        on read), e.g. `jax.eval_shape` of the init with the shardings attached. A step
        that fails to restore (damaged files) is logged and skipped for the one before;
        a step whose arrays differ from `abstract_state` by path or shape raises
        StateMismatch.
        """
        target = jax.tree.map(_abstract_leaf, abstract_state)
        steps = self.all_steps()
        error: Exception | None = None
        for step in reversed(steps):
            try:
                # Checked before Orbax reads any array: a mismatch that its restore finds
                # leaves reads behind that fail noisily, and earlier steps hold the same tree.
                problems = tree_differences(target, saved_tree(self.directory / str(step) / STATE_ITEM))
                if not problems:
                    restored = self._manager.restore(step, args=ocp.args.Composite(**{
                        STATE_ITEM: ocp.args.StandardRestore(target),
                        DATA_ITEM: HostBytes(),
                    }))
                    return step, restored[STATE_ITEM], restored[DATA_ITEM]
            except Exception as e:  # damaged files surface as many error types
                log.warning("Checkpoint step %d in %s cannot be restored (%s: %s); trying an earlier one",
                            step, self.directory, type(e).__name__, e)
                error = e
                continue
            raise StateMismatch(f"checkpoint step {step} in {self.directory} holds another state than the "
                                f"one to restore; its arrays differ: {'; '.join(problems)}")
        if error is not None:
            raise RuntimeError(f"None of the checkpoint steps {steps} in {self.directory} could be restored") from error
        return None

    def wait(self) -> None:
        """Blocks until any background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _metric_getter(name: str) -> Callable[[dict[str, float]], float]:
    return lambda metrics: float(metrics[name])


def _abstract_leaf(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


class DirectoryState(Protocol):
    """An object whose state is files in a directory (the data loader)."""

    def save(self, directory: str | os.PathLike) -> None: ...

    def restore(self, directory: str | os.PathLike) -> None: ...


def pack_loader_state(loader: DirectoryState) -> bytes:
    """The files `loader.save(dir)` writes, as an uncompressed tar archive."""
    with tempfile.TemporaryDirectory() as tmp:
        loader.save(tmp)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(pathlib.Path(tmp).rglob("*")):
                tar.add(path, arcname=str(path.relative_to(tmp)), recursive=False)
        return buffer.getvalue()


def unpack_loader_state(loader: DirectoryState, blob: bytes) -> None:
    """Restores `loader` from an archive made by `pack_loader_state`."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
            tar.extractall(tmp, filter="data")
        loader.restore(tmp)


_stop_reason: str | None = None  # set by a signal: "preempted" (SIGTERM) or "interrupted" (Ctrl-C)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGTERM (preemption) and a first Ctrl-C (SIGINT) do not kill the
    process but make `stop_requested` return True, so the loop can save and exit
    cleanly; a second Ctrl-C ends the process at once (exit status 130), unsaved: the
    last finished checkpoint stays as it was. The previous handlers come back on exit.
    Enter it from the main thread.

    With several processes (jax.distributed), JAX's preemption service already watches
    for SIGTERM and `stop_requested(step)` asks it, so all hosts stop on the same step;
    no handler is installed then, and Ctrl-C keeps its default.
    """
    global _stop_reason
    if jax.process_count() > 1:
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        global _stop_reason
        if signum == signal.SIGINT:
            if _stop_reason is not None:
                print("Ctrl-C again: stopping now, without saving", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(130)
            print("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, "
                  "without saving)", file=sys.stderr, flush=True)
        _stop_reason = "interrupted" if signum == signal.SIGINT else "preempted"

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop_reason = None


def stop_requested(step: int) -> bool:
    """Whether the loop should save `step` now and exit (preemption or Ctrl-C). Call once
    per step on every host."""
    if jax.process_count() > 1:
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # the preemption service is disabled
            return False
    return _stop_reason is not None


def stop_reason() -> str:
    """Why `stop_requested` said True, for the log: "preempted" or "interrupted"."""
    return _stop_reason or "preempted"


def export_params(params: PyTree, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes a params-only checkpoint (Orbax StandardSave) to `directory`, synchronously."""
    directory = paths.as_path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, params, force=overwrite)
        checkpointer.wait_until_finished()


def load_params(directory: str | os.PathLike, abstract: PyTree | None = None) -> PyTree:
    """Reads a checkpoint written by `export_params`.

    With `abstract` (ShapeDtypeStructs carrying shardings, or arrays) the params come back
    as jax.Arrays placed accordingly; without it, as host numpy arrays.
    """
    directory = paths.as_path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"No params checkpoint at {directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        if abstract is not None:
            return checkpointer.restore(directory, jax.tree.map(_abstract_leaf, abstract))
        metadata = checkpointer.metadata(directory).item_metadata
        as_numpy = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata)
        return checkpointer.restore(directory, as_numpy)
