"""Evaluation: python -m glipjax.evaluate --config CONFIG --checkpoint DIR --dataset NAME[,NAME...]
                [--out report.json] [--ema] [--step N] [--max-images N] [--data-dir DIR] [--config.a=b ...]

The model and its params come from DIR, a training workdir or an export
(glipjax.runs.load_run); the config gives the evaluation sets, image sizes,
tokenizer and batch size. Datasets (fields under `eval`, see default_fields; a config
file without them gets the defaults, and any can be set with --config.eval.X=...):

  coco    COCO box AP                   eval.coco.annotations, eval.coco.images
  lvis    LVIS fixed AP, APr/APc/APf    eval.lvis.annotations, eval.lvis.images (300 boxes
                                        per image, 40-class prompt chunks, top 10,000 per class)
  flickr  Flickr30k entities R@1/5/10   eval.flickr.annotations, eval.flickr.images (MDETR format)
  odinw   ODinW AP per dataset, mean    eval.odinw.root, eval.odinw.datasets ("odinw13", "odinw35",
                                        names of glipjax.eval.odinw.ODINW_35, or COCO-format .json files)
  shapes  the demo's shapes AP          eval.splits, eval.prompt_modes, data.shapes

Each process evaluates its own part of a set on its own devices and the results are
gathered (glipjax.eval.datasets); process 0 prints the JSON report and writes it to
--out. Progress lines with images/s and ETA go to stderr. Multi-host runs initialise
jax.distributed as the trainer does (--coordinator, --num-processes, --process-id or
the environment).
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the command may re-execute itself once (glipjax/allocator.py)
    from glipjax import allocator

    allocator.use_huge_pages()

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections

from glipjax import logs, paths, sharding
from glipjax.config import parse_command_line
from glipjax.runs import Run, RunError, load_run
from glipjax.train import _initialize_hosts

DATASETS = ("coco", "lvis", "flickr", "odinw", "shapes")
log = logging.getLogger("glipjax.evaluate")


def default_fields() -> ml_collections.ConfigDict:
    """The `eval` fields this command reads, with their defaults ("" paths: not set)."""
    e = ml_collections.ConfigDict()
    e.batch_size = 0  # images per batch over all processes; 0: data.batch_size
    e.coco = ml_collections.ConfigDict(dict(annotations="", images="", classes_per_chunk=0))
    # LVIS: annotations of minival (MDETR's 5k images, the GLIP paper's table) or val;
    # images: the folder holding the COCO image folders (train2017/, val2017/).
    e.lvis = ml_collections.ConfigDict(dict(annotations="", images="", classes_per_chunk=40, max_detections=300,
                                            top_per_class=10_000))
    # Flickr30k entities: MDETR's final_flickr_separateGT_val.json or _test.json.
    e.flickr = ml_collections.ConfigDict(dict(annotations="", images=""))
    e.odinw = ml_collections.ConfigDict(dict(root="", datasets=("odinw13",), classes_per_chunk=0))
    e.splits = ("validation", "novel")  # shapes
    e.prompt_modes = ("true", "swapped_colors")  # shapes
    e.max_images = 0  # shapes, when --max-images is not given; 0: the whole split
    return ml_collections.ConfigDict({"eval": e})


def parse_datasets(text: str) -> list[str]:
    """"coco,odinw" -> ["coco", "odinw"]; unknown names raise ValueError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise ValueError(f"unknown dataset {', '.join(unknown) or repr(text)}; choose from {', '.join(DATASETS)}")
    return list(dict.fromkeys(names))


def _paths(config: ml_collections.ConfigDict, name: str) -> tuple[str, str]:
    group = config.eval[name]
    missing = [k for k in ("annotations", "images") if not group[k]]
    if missing:
        raise ValueError(f"--dataset {name}: set " + " and ".join(f"--config.eval.{name}.{k}" for k in missing))
    return group.annotations, group.images


def check_paths(config: ml_collections.ConfigDict, names: Sequence[str]) -> None:
    """Fails before any model is loaded when a dataset lacks its paths."""
    for name in names:
        if name in ("coco", "lvis", "flickr"):
            _paths(config, name)
        elif name == "odinw" and not config.eval.odinw.datasets:
            raise ValueError("--dataset odinw: set --config.eval.odinw.datasets (and eval.odinw.root)")


def evaluate(config: ml_collections.ConfigDict, run: Run, names: Sequence[str], data_dir: os.PathLike, *,
             max_images: int | None = None, progress: bool = True) -> dict[str, Any]:
    """{dataset name: its report} for a loaded run; `config` carries default_fields()
    (parse_command_line adds them)."""
    from glipjax.data.pipeline import transform_config
    from glipjax.data.tokenizer import load_tokenizer
    from glipjax.eval import datasets

    check_paths(config, names)
    global_batch = config.eval.batch_size or config.data.batch_size
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} is not divisible by the {jax.process_count()} processes")
    batch_size = global_batch // jax.process_count()
    rules = sharding.rules_from_config(config)
    data = datasets.EvalData(paths.as_path(data_dir), transform_config(config.data),
                             load_tokenizer(config.data.tokenizer or None), max_images, progress)
    detectors: dict[int, datasets.Detector] = {}

    def detector(max_detections: int = run.glip_config.postprocess.max_detections) -> datasets.Detector:
        """One Detector (one compiled forward pass) per number of boxes kept."""
        if max_detections not in detectors:
            detectors[max_detections] = datasets.Detector(run.model, run.glip_config, run.params, run.mesh, rules,
                                                          batch_size=batch_size, max_detections=max_detections)
        return detectors[max_detections]

    reports: dict[str, Any] = {}
    for name in names:
        start = time.monotonic()
        e = config.eval
        if name == "coco":
            report = datasets.evaluate_coco(detector(), data, *_paths(config, name),
                                            classes_per_chunk=e.coco.classes_per_chunk)
        elif name == "lvis":
            report = datasets.evaluate_lvis(detector(e.lvis.max_detections), data, *_paths(config, name),
                                            classes_per_chunk=e.lvis.classes_per_chunk,
                                            top_per_class=e.lvis.top_per_class)
        elif name == "flickr":
            report = datasets.evaluate_flickr(detector(), data, *_paths(config, name))
        elif name == "odinw":
            from glipjax.eval.odinw import evaluate_odinw

            report = evaluate_odinw(detector(), data, e.odinw.root, e.odinw.datasets,
                                    classes_per_chunk=e.odinw.classes_per_chunk)
        else:
            report = _evaluate_shapes(config, run, data_dir, batch_size, max_images or e.max_images or None, progress)
        report["seconds"] = time.monotonic() - start
        reports[name] = report
    return reports


def _evaluate_shapes(config: ml_collections.ConfigDict, run: Run, data_dir: os.PathLike, batch_size: int,
                     max_images: int | None, progress: bool) -> dict[str, Any]:
    """glipjax.eval.shapes.evaluate_shapes for every configured split and prompt mode,
    as {"<split>/<mode>": report}. Every process evaluates the whole (small) split."""
    from glipjax.eval.shapes import evaluate_shapes

    if not config.eval.splits or not config.eval.prompt_modes:
        raise ValueError("--dataset shapes: set --config.eval.splits and --config.eval.prompt_modes")
    return {f"{split}/{mode}": evaluate_shapes(run.model, run.params, config, data_dir, split, mode,
                                               max_images, batch_size=batch_size, progress=progress)
            for split in config.eval.splits for mode in config.eval.prompt_modes}


def _finite(value: Any) -> Any:
    """The report with NaN / inf as null (strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training workdir or an export directory")
    parser.add_argument("--dataset", required=True, help=f"one or more of {', '.join(DATASETS)}, comma-separated")
    parser.add_argument("--out", help="write the JSON report here (process 0)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA params")
    parser.add_argument("--step", type=int, help="a training step (default: the latest)")
    parser.add_argument("--max-images", type=int, help="evaluate the first N records of each set")
    parser.add_argument("--data-dir", help="where evaluation sets are built (default: data.data_dir, relative "
                                           "to the checkpoint directory)")
    parser.add_argument("--coordinator", help="multi-host: address:port of process 0")
    parser.add_argument("--num-processes", type=int, default=0, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=0, help="multi-host: this process's index")
    args, config = parse_command_line(parser, argv, default_fields())
    try:
        names = parse_datasets(args.dataset)
        if args.max_images is not None and args.max_images < 1:
            raise ValueError(f"--max-images must be at least 1, got {args.max_images}")
        check_paths(config, names)
    except ValueError as e:
        parser.error(str(e))
    checkpoint = paths.as_path(args.checkpoint)
    if not checkpoint.is_dir():
        parser.error(f"--checkpoint {checkpoint}: no such directory")
    logs.to_console()
    _initialize_hosts(args)
    paths.enable_compilation_cache()
    try:
        run = load_run(checkpoint, ema=args.ema, step=args.step)
    except RunError as e:
        parser.error(str(e))
    log.info("evaluating step %d of %s on %s", run.step, checkpoint, ", ".join(names))
    reports = evaluate(config, run, names, paths.as_path(args.data_dir) if args.data_dir else paths.data_dir(config, checkpoint), max_images=args.max_images)
    report = _finite({"checkpoint": os.fspath(checkpoint), "step": run.step, "ema": args.ema,
                      "max_images": args.max_images, "datasets": reports})
    if jax.process_index() == 0:
        text = json.dumps(report, indent=2)
        if args.out:
            paths.as_path(args.out).write_text(text + "\n")
        print(text, file=sys.stdout, flush=True)
    return report


if __name__ == "__main__":
    main()
