"""A trained or exported model ready for inference: its config, model and params.

`load_run(path)` reads either kind of directory:

    training workdir   config.json + checkpoints/<step>/state       (python -m glipjax.train)
    export             config.json + export.json + params/ ...     (python -m glipjax.export)

The model is rebuilt from config.json (the text encoder's sizes come from its
config.json; its weights, like all others, from the checkpoint). Only the params (or
their EMA copy) are read from a training state, placed on a mesh over this process's
devices; the optimizer state is never loaded. A checkpoint whose params do not fit
the config's model is reported with the config fields that size the model and the
first differing params.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from glipjax import checkpoint, paths, sharding, train_state
from glipjax.models.glip import GLIP, GLIPConfig

CONFIG_FILE = "config.json"
EXPORT_FILE = "export.json"
PARAMS_DIR = "params"
TEXT_ENCODER_DIR = "text_encoder"  # an export's copy of the text encoder's config.json
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"


class RunError(ValueError):
    """A run or export directory that cannot be loaded (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A loaded model. `params` are jax.Arrays on `mesh` (replicated unless the
    config's sharding rules split them); `step` is the training step they come from."""

    config: ml_collections.ConfigDict
    model: GLIP
    glip_config: GLIPConfig
    params: Any
    step: int
    mesh: jax.sharding.Mesh


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the config files write."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def read_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    """The run config saved as <directory>/config.json (locked ConfigDict)."""
    file = paths.as_path(directory) / CONFIG_FILE
    if not file.is_file():
        raise RunError(f"{directory} has no {CONFIG_FILE}: not a training workdir or an export directory")
    try:
        config = ml_collections.ConfigDict(_tuples(json.loads(file.read_text())))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise RunError(f"{file} is not a valid config: {e}") from e
    for group in ("model", "data"):
        if group not in config:
            raise RunError(f"{file} has no '{group}' group; it is not a glipjax run config")
    config.lock()
    return config


def model_summary(config: ml_collections.ConfigDict) -> str:
    """The config fields that size the model, for error messages."""
    fields = ", ".join(f"{k}={config.model[k]!r}" for k in sorted(config.model)
                       if k not in ("dtype", "remat", "scan_layers"))
    return f"model.{{{fields}}}, data.max_text_len={config.data.max_text_len}"


def check_params_match(expected: Any, stored: Any, config: ml_collections.ConfigDict, where: str) -> None:
    """Raises RunError naming missing, unexpected and mis-shaped params when the stored
    tree (shapes from Orbax metadata) is not the tree the config's model expects."""
    if problems := checkpoint.tree_differences(expected, stored):
        raise RunError(f"{where} does not hold params of the model in its {CONFIG_FILE} "
                       f"({model_summary(config)}): {'; '.join(problems)}. Was the directory written "
                       f"with another config?")


def _metadata(directory: epath.Path) -> Any:
    try:
        return checkpoint.saved_tree(directory)
    except Exception as e:  # unreadable or damaged files surface as many error types
        raise RunError(f"cannot read the checkpoint at {directory}: {type(e).__name__}: {e}") from e


def _restore(directory: epath.Path, target: dict[str, Any]) -> dict[str, Any]:
    """The subtrees named in `target` (ShapeDtypeStructs with shardings) of a saved tree."""
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), target)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:
        raise RunError(f"cannot restore {directory}: {type(e).__name__}: {e}") from e


def _with_dtypes(abstract: Any, stored: Any) -> Any:
    """The abstract params with the stored dtypes (an export may hold bfloat16)."""
    return jax.tree.map(lambda a, m: jax.ShapeDtypeStruct(a.shape, m.dtype, sharding=a.sharding), abstract, stored)


def _training_step(directory: epath.Path, step: int | None) -> int:
    checkpoints = directory / CHECKPOINTS_DIR
    steps = sorted(ocp.utils.checkpoint_steps(checkpoints)) if checkpoints.is_dir() else []
    if not steps:
        raise RunError(f"{directory} has no finished checkpoint steps under {CHECKPOINTS_DIR}/")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise RunError(f"{directory} has no checkpoint of step {step}; its steps are {steps}")
    return step


def load_run(path: str | os.PathLike, *, ema: bool = False, step: int | None = None,
             mesh: jax.sharding.Mesh | None = None) -> Run:
    """Config, model and params of a training workdir or an export directory.

    ema: the EMA params of a training state (RunError if the run keeps none); an
    export holds one set of params, and ema=True asks that it be the EMA. step: a training step
    (default the latest finished one); for an export, its source step must agree.
    mesh: where the params go (default: a "data" mesh over this process's devices, so
    they are replicated unless the config's rules split them over other axes).
    """
    directory = paths.as_path(path)
    if not directory.is_dir():
        raise RunError(f"no such directory: {directory}")
    config = read_config(directory)
    exported = (directory / EXPORT_FILE).is_file()
    if not exported and not (directory / CHECKPOINTS_DIR).is_dir():
        raise RunError(f"{directory} has neither {CHECKPOINTS_DIR}/ (a training workdir) nor "
                       f"{EXPORT_FILE} (an export)")
    # What the directory holds is checked first: building the model takes seconds.
    if exported:
        info = json.loads((directory / EXPORT_FILE).read_text())
        if ema and not info["ema"]:
            raise RunError(f"{directory} was exported without --ema; it holds the raw params only")
        if step is not None and step != info["step"]:
            raise RunError(f"{directory} was exported from step {info['step']}, not {step}")
        step, params_dir = int(info["step"]), directory / PARAMS_DIR
        stored, where, key = _metadata(params_dir), str(params_dir), None
    else:
        step = _training_step(directory, step)
        state_dir = directory / CHECKPOINTS_DIR / str(step) / STATE_ITEM
        stored, key = _metadata(state_dir), "ema" if ema else "params"
        if ema and (not config.optim.get("ema_decay") or not stored.get("ema")):
            raise RunError(f"{directory} keeps no EMA params (optim.ema_decay is "
                           f"{config.optim.get('ema_decay')}); load its params without ema")
        if key not in stored:
            raise RunError(f"{state_dir} holds no '{key}' (is it a glipjax training state?)")
        stored, where, params_dir = stored[key], f"{state_dir} ({key})", state_dir

    model_config = config
    if exported and (directory / TEXT_ENCODER_DIR).is_dir():
        model_config = config.copy_and_resolve_references()
        model_config.model.text_encoder = str(directory / TEXT_ENCODER_DIR)
    try:
        model, glip_config, _ = train_state.build_model(model_config, load_text_weights=False)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        raise RunError(f"cannot build the model of {directory / CONFIG_FILE}: {e}") from e
    mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1}, jax.local_devices())
    rules = sharding.rules_from_config(config)
    tx, _ = train_state.make_tx(config)
    abstract = train_state.abstract_state(config, model, tx, mesh, rules)["params"]
    check_params_match(abstract, stored, config, where)
    abstract = _with_dtypes(abstract, stored)
    restored = _restore(params_dir, {key: abstract} if key else abstract)
    params = restored[key] if key else restored
    return Run(config, model, glip_config, params, step, mesh)
