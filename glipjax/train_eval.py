"""Evaluation during training (eval.every steps and at the end), as flat metrics.

Two kinds, both optional:
- the demo's shapes splits (eval.splits x eval.prompt_modes, glipjax.eval.shapes), as
  "<split>/<mode>/<metric>", with a picture of each split's true-prompt predictions at
  the end;
- the evaluator's sets (eval.datasets: any of coco, lvis, flickr, odinw, with the
  paths of glipjax.evaluate's eval.<dataset> fields), as "<dataset>/<metric>", e.g.
  "coco/AP50" for a fine-tuning run's own COCO-format validation set.

Either can be the checkpoint's best_metric. In a multi-host run every process gets
the whole params for the evaluator's sets, which each process evaluates in part
(glipjax.eval.datasets).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from glipjax import runs, sharding
from glipjax.models.glip import GLIP, GLIPConfig

SHAPES_METRICS = ("AP", "AP50", "novel_AP", "novel_AP50", "found", "color_right", "shape_right")


def default_fields() -> ml_collections.ConfigDict:
    """The eval fields the trainer adds where a config file lacks them: the
    evaluator's sets (glipjax.evaluate.default_fields, without shapes splits) and
    eval.datasets = (): none of them evaluated."""
    from glipjax import evaluate

    fields = evaluate.default_fields()
    fields.eval.splits = ()
    fields.eval.prompt_modes = ()
    fields.eval.datasets = ()
    return fields


def datasets(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """config.eval.datasets, checked: known evaluator sets with their paths set
    (ValueError otherwise, before training starts)."""
    names = tuple(config.eval.get("datasets") or ())
    if not names:
        return ()
    from glipjax import evaluate

    if "shapes" in names:
        raise ValueError("eval.datasets: the shapes splits are evaluated through eval.splits and eval.prompt_modes")
    evaluate.parse_datasets(",".join(names))
    evaluate.check_paths(config, names)
    return names


def enabled(config: ml_collections.ConfigDict) -> bool:
    return bool(config.eval.splits and config.eval.prompt_modes) or bool(config.eval.get("datasets"))


def evaluate(config: ml_collections.ConfigDict, model: GLIP, glip_config: GLIPConfig, params: Any, step: int,
             mesh: jax.sharding.Mesh, data_dir: epath.Path, pictures: epath.Path | None = None) -> dict[str, float]:
    """The configured evaluations of `params` (on the training `mesh`) as flat metrics.
    With `pictures`, the shapes splits' true-prompt predictions are drawn to
    <pictures>/predictions_<split>.png."""
    from glipjax.eval.shapes import evaluate_shapes

    results: dict[str, float] = {}
    max_images = config.eval.max_images or None
    for split in config.eval.splits:
        for mode in config.eval.prompt_modes:
            picture = pictures / f"predictions_{split}.png" if pictures is not None and mode == "true" else None
            report = evaluate_shapes(model, params, config, data_dir, split, mode, max_images, progress=False,
                                     picture=picture)
            results.update({f"{split}/{mode}/{key}": float(report[key]) for key in SHAPES_METRICS if key in report})
    if names := datasets(config):
        from glipjax import evaluate as evaluator

        local_params, local_mesh = _on_local_devices(params, mesh)
        run = runs.Run(config, model, glip_config, local_params, step, local_mesh)
        for name, report in evaluator.evaluate(config, run, names, data_dir, progress=False).items():
            results.update(flat_numbers(report, name))
    return results


def _on_local_devices(params: Any, mesh: jax.sharding.Mesh) -> tuple[Any, jax.sharding.Mesh]:
    """The params on a mesh of this process's devices, as the evaluator runs: the
    training mesh itself on one host; on several, a copy of the whole params."""
    if jax.process_count() == 1:
        return params, mesh
    local = sharding.make_mesh({"data": -1}, jax.local_devices())
    whole = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_put(whole, NamedSharding(local, PartitionSpec())), local


def flat_numbers(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a nested report as {"<prefix>/<key>[/<key>...]": value}."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat.update(flat_numbers(value, f"{prefix}/{key}"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = float(value)
    return flat
