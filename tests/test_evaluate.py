"""python -m glipjax.evaluate: every dataset end to end on the tiny demo run (one call,
so the compiled forward passes are shared), the JSON report's fields, progress
lines, clear errors for bad command lines, and result gathering over two real
processes (jax.distributed on 127.0.0.1)."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from conftest import TRAIN_STEPS, spawn_workers
from eval_sets import write_coco_set, write_lvis_set, write_mdetr_set
from glipjax import evaluate
from glipjax.eval.coco import STAT_NAMES
from glipjax.eval.hosts import host_bounds
from glipjax.eval.lvis import METRICS

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.py") + ":tiny"


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_command_line_errors(capsys, tmp_path):
    base = ["--config", CONFIG, "--checkpoint", str(tmp_path)]
    assert "unknown dataset cityscapes; choose from coco, lvis, flickr, odinw, shapes" in _error(
        capsys, base + ["--dataset", "coco,cityscapes"])
    assert "--dataset coco: set --config.eval.coco.annotations and --config.eval.coco.images" in _error(
        capsys, base + ["--dataset", "coco"])
    assert "--dataset lvis: set --config.eval.lvis.images" in _error(
        capsys, base + ["--dataset", "lvis", "--config.eval.lvis.annotations=lvis.json"])
    assert "--max-images must be at least 1" in _error(capsys, base + ["--dataset", "shapes", "--max-images", "0"])
    assert "no such directory" in _error(
        capsys, ["--config", CONFIG, "--checkpoint", str(tmp_path / "absent"), "--dataset", "shapes"])
    assert "has no config.json" in _error(capsys, base + ["--dataset", "shapes"])
    assert "Unknown config field: eval.cocoa" in _error(
        capsys, base + ["--dataset", "coco", "--config.eval.cocoa.images=x"])


def test_parse_datasets_and_host_parts():
    assert evaluate.parse_datasets("odinw, coco,odinw") == ["odinw", "coco"]
    with pytest.raises(ValueError, match="unknown dataset"):
        evaluate.parse_datasets(",")
    # 10 records over 3 processes: contiguous, disjoint, covering, sizes differing by at most one.
    parts = [host_bounds(10, p, 3) for p in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 10)]


_WORKER = """
import json, sys
import jax
import numpy as np
port, pid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", count, pid)
from glipjax.eval.hosts import gather
sizes = [3, 2]  # process 0 holds 3 rows, process 1 two (both pad to 4)
ids = np.array([2**40 + 10 * pid + i for i in range(4)], np.int64)  # beyond int32
rows = np.full((4, 2), pid + 0.5, np.float32)
out_ids, out_rows = gather((ids, rows), sizes[pid], sizes)
print(json.dumps({"ids": out_ids.tolist(), "dtype": str(out_ids.dtype), "rows": out_rows.tolist()}))
"""


def test_gather_across_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    [results] = spawn_workers(script, [2], timeout=120)
    for result in results:
        assert result["dtype"] == "int64"
        assert result["ids"] == [2**40, 2**40 + 1, 2**40 + 2, 2**40 + 10, 2**40 + 11]
        assert result["rows"] == [[0.5, 0.5]] * 3 + [[1.5, 1.5]] * 2


def _in_unit(value):
    return value is None or 0.0 <= value <= 1.0


@pytest.mark.slow
def test_every_dataset_end_to_end(tiny_run, tmp_path, capfd):
    coco = write_coco_set(tmp_path / "coco" / "val", seed=3, count=10)
    lvis = write_lvis_set(tmp_path / "lvis", seed=4, count=4)
    flickr = write_mdetr_set(tmp_path / "flickr", seed=5, count=4)
    for name, seed in (("a", 6), ("b", 7)):
        write_coco_set(tmp_path / "odinw" / name / "valid", seed, 3)
    out = tmp_path / "report.json"
    argv = [
        "--config", CONFIG, "--checkpoint", str(tiny_run), "--dataset", "shapes,coco,lvis,flickr,odinw",
        "--max-images", "8", "--out", str(out), "--data-dir", str(tmp_path / "tfds"),
        # Chunks of at most 12 classes (16 phrases with padding) and 100 boxes per image: every
        # set but shapes shares one compiled forward pass.
        f"--config.eval.coco.annotations={coco}", f"--config.eval.coco.images={coco.parent}",
        "--config.eval.coco.classes_per_chunk=12",
        f"--config.eval.lvis.annotations={lvis}", f"--config.eval.lvis.images={lvis.parent / 'images'}",
        "--config.eval.lvis.classes_per_chunk=12", "--config.eval.lvis.max_detections=100",
        f"--config.eval.flickr.annotations={flickr}", f"--config.eval.flickr.images={flickr.parent}",
        f"--config.eval.odinw.root={tmp_path / 'odinw'}",
        "--config.eval.odinw.datasets=('a/valid/annotations.json', 'b/valid/annotations.json')",
        "--config.eval.splits=('novel',)", "--config.eval.prompt_modes=('true',)",
    ]
    returned = evaluate.main(argv)
    report = json.loads(out.read_text())
    assert report == returned
    assert report["step"] == TRAIN_STEPS and report["ema"] is False and report["max_images"] == 8
    sets = report["datasets"]
    assert list(sets) == ["shapes", "coco", "lvis", "flickr", "odinw"]

    shapes = sets["shapes"]["novel/true"]
    assert shapes["num_images"] == 8 and all(_in_unit(shapes[k]) for k in ("AP", "AP50", "novel_AP", "novel_AP50"))

    assert sets["coco"]["num_images"] == 8  # --max-images cuts the 10 images
    num_classes = len(json.loads(coco.read_text())["categories"])
    assert all(_in_unit(sets["coco"][k]) for k in STAT_NAMES) and sets["coco"]["num_chunks"] == -(-num_classes // 12)

    lvis_report = sets["lvis"]
    assert lvis_report["num_images"] == 4 and lvis_report["num_chunks"] == 3  # 36 classes in chunks of 12
    assert all(_in_unit(lvis_report[k]) for k in METRICS)

    flickr_report = sets["flickr"]
    phrases = len(json.loads(flickr.read_text())["annotations"])  # every object has its own mention
    assert flickr_report["num_phrases"] == phrases and flickr_report["num_records"] == 4
    for protocol in ("any_box", "merged_box"):
        recalls = [flickr_report[f"{protocol}/R@{k}"] for k in (1, 5, 10)]
        assert all(_in_unit(r) for r in recalls) and recalls == sorted(recalls)

    odinw_report = sets["odinw"]
    assert odinw_report["num_datasets"] == 2 and all(
        odinw_report["datasets"][f"{n}/valid/annotations.json"]["num_images"] == 3 for n in "ab")
    aps = [r["AP"] for r in odinw_report["datasets"].values()]
    assert odinw_report["AP"] == pytest.approx(float(np.mean(aps))) and not math.isnan(odinw_report["AP"])
    assert all(sets[name]["seconds"] > 0 for name in sets)

    err = capfd.readouterr().err
    for line in ("eval coco: 8/8 images", "eval lvis: 4/4 images", "eval flickr: 4/4 captions",
                 "eval odinw/a/valid/annotations.json: 3/3 images", "images/s, ETA"):
        assert line in err, line
