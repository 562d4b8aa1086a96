"""Starting a training run from trained weights (config field `train.init_from`).

The source is a training workdir or an export (read with glipjax.runs.load_run), or
an official GLIP .pth checkpoint with its yaml (`train.init_yaml`, read with
glipjax.convert.load_official_glip). Every param of the new model takes the source's
value; params the source lacks (e.g. the prompt-tuning offset) keep their fresh
initialisation and are listed in the log. A source param the new model lacks, one of
another shape, or a glipjax source whose model fields differ is an error.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from glipjax import convert, runs
from glipjax.optim import param_path

log = logging.getLogger(__name__)

# Model fields that may differ from the source run: they change no pretrained param
# (log_scale_init only sets the value that the source's log_scale replaces; dropout
# acts only in training).
_FREE_FIELDS = ("dtype", "remat", "scan_layers", "prompt_tuning", "log_scale_init", "dropout")


# Fields newer than some saved runs, with the value their absence means.
_ABSENT_MEANS = {"head_layers": 0, "fpn_channels": 0, "text_layers": 0, "head_deformable": True}


def _differing_fields(config: ml_collections.ConfigDict, source: ml_collections.ConfigDict) -> list[str]:
    keys = sorted((set(config.model) | set(source.model)) - set(_FREE_FIELDS))
    differ = [f"model.{k}: {source.model.get(k)!r} in the source, {config.model.get(k)!r} here"
              for k in keys if config.model.get(k, _ABSENT_MEANS.get(k)) != source.model.get(k, _ABSENT_MEANS.get(k))]
    if config.data.max_text_len != source.data.max_text_len and (
            config.model.get("prompt_tuning") or source.model.get("prompt_tuning")):
        differ.append(f"data.max_text_len: {source.data.max_text_len} in the source, "
                      f"{config.data.max_text_len} here (sizes the prompt offset)")
    return differ


def source_params(config: ml_collections.ConfigDict) -> Any:
    """The params tree named by config.train.init_from (host or device arrays)."""
    source = config.train.init_from
    if source.endswith(".pth"):
        if not config.train.get("init_yaml"):
            raise runs.RunError(f"train.init_from={source!r} is an official GLIP checkpoint: set train.init_yaml "
                                "to its config yaml (e.g. glip_Swin_T_O365_GoldG.yaml)")
        return convert.load_official_glip(source, config.train.init_yaml)[1]
    run = runs.load_run(source)
    differ = _differing_fields(config, run.config)
    if differ:
        raise runs.RunError(f"train.init_from={source!r} holds another model; set these fields as in the source: "
                            + "; ".join(differ))
    return run.params


def merge(params: Any, init: Any) -> Any:
    """`params` (the fresh, sharded params) with every leaf `init` has, placed on the
    fresh leaf's sharding."""
    loaded = {param_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]}
    used, kept = set(), []

    def take(path, fresh):
        name = param_path(path)
        if name not in loaded:
            kept.append(name)
            return fresh
        value = loaded[name]
        if tuple(value.shape) != tuple(fresh.shape):
            raise ValueError(f"init param {name} has shape {tuple(value.shape)}; the model expects {tuple(fresh.shape)}")
        used.add(name)
        return jax.device_put(np.asarray(value, fresh.dtype), fresh.sharding)

    merged = jax.tree_util.tree_map_with_path(take, params)
    unexpected = sorted(set(loaded) - used)
    if unexpected:
        raise ValueError(f"{len(unexpected)} init params have no place in the model, e.g. {unexpected[:4]}")
    if kept:
        log.info("warm start: %d params not in the source keep their initialisation: %s", len(kept), kept[:8])
    log.info("warm start: %d params loaded", len(used))
    return merged
