"""The training command end to end: a run that is preempted (SIGTERM) and resumed
ends with bit-identical params to an uninterrupted run of the same steps (the shared
tiny_run: periodic evaluation changes no param); periodic evaluation keeps the best
evaluated checkpoint beside the latest, also across the resume; the evaluator's sets
(eval.datasets) give the figures of `python -m glipjax.evaluate`."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, SMALL_TRAIN, TRAIN_STEPS as STEPS, child_env, train_in_child
from glipjax.checkpoint import load_params

OVERRIDES = [
    *SMALL_TRAIN, "--config.checkpoint.save_every=100", "--config.checkpoint.keep=1",
    # Evaluation every 2 steps; the lowest AP is "best" so that it is rarely the latest.
    "--config.eval.every=2", '--config.eval.splits=("validation",)', '--config.eval.prompt_modes=("true",)',
    "--config.checkpoint.best_metric=validation/true/AP", "--config.checkpoint.best_mode=min",
]
METRIC = "validation/true/AP"


def _command(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "glipjax.train", "--config", "configs/demo.py:tiny",
            "--workdir", str(workdir), *OVERRIDES]


def _logged(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps_logged(workdir: pathlib.Path) -> list[int]:
    """The training steps in metrics.jsonl (evaluation records left out)."""
    return [m["step"] for m in _logged(workdir) if "loss" in m]


def _check_keep_best(workdir: pathlib.Path) -> None:
    evaluated = {m["step"]: m[METRIC] for m in _logged(workdir) if METRIC in m}
    assert sorted(evaluated) == list(range(2, STEPS + 1, 2))
    lowest = min(evaluated.values())
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    others = [s for s in kept if s != STEPS]
    assert STEPS in kept and len(others) <= 1  # the latest (keep=1), plus one best step
    assert all(evaluated[s] == lowest for s in others)
    if evaluated[STEPS] > lowest:
        assert len(others) == 1
    assert json.loads((workdir / "eval.json").read_text())[METRIC] == evaluated[STEPS]


def _final_params(workdir: pathlib.Path):
    return load_params(workdir / "checkpoints" / str(STEPS) / "state")["params"]


@pytest.mark.slow
def test_sigterm_resume_matches_uninterrupted_run(tmp_path, repo_root, tiny_run):
    env = child_env()  # the session's compilation cache: the step compiled by tiny_run is loaded
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_command(resumed), cwd=repo_root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not _steps_logged(resumed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "preempted at step" in output, output[-3000:]
    stopped = int(output.split("preempted at step ")[1].split(":")[0])
    assert stopped < STEPS

    again = subprocess.run(_command(resumed), cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(set(_steps_logged(resumed))) == list(range(1, STEPS + 1))
    _check_keep_best(resumed)

    a, b = _final_params(tiny_run), _final_params(resumed)
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_evaluator_sets_during_training_give_the_evaluate_commands_figures(tiny_run, tmp_path):
    """tiny_run resumed for one more step evaluates the fixture COCO set at its end."""
    workdir = tmp_path / "run"
    for part in ("checkpoints", "tfds"):  # only read: hard links
        shutil.copytree(tiny_run / part, workdir / part, copy_function=os.link)
    shutil.copy(tiny_run / "config.json", workdir)
    coco = ["--config.eval.coco.annotations=tests/fixtures/coco_instances.json",
            "--config.eval.coco.images=tests/fixtures/images"]
    logged = train_in_child("configs/demo.py:tiny", workdir, *SMALL_TRAIN, "--config.eval.splits=()",
                            "--config.checkpoint.save_every=100", f"--config.train.steps={STEPS + 1}", *coco,
                            "--config.eval.datasets=('coco',)", "--config.checkpoint.best_metric=coco/AP50")
    evaluated = json.loads((workdir / "eval.json").read_text())
    assert evaluated["coco/num_images"] == 4 and logged[-1] == {"step": STEPS + 1, **evaluated}

    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "glipjax.evaluate", "--config", "configs/demo.py:tiny", *SMALL_TRAIN, *coco,
               "--checkpoint", str(workdir), "--dataset", "coco", "--out", str(report)]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads(report.read_text())["datasets"]["coco"]
    assert expected["num_images"] == 4
    for key, value in expected.items():
        if key in ("seconds", "dropped"):
            continue
        mine = evaluated[f"coco/{key}"]
        assert (value is None and math.isnan(mine)) or mine == value, (key, mine, value)
    assert evaluated["coco/dropped/boxes/iscrowd"] == expected["dropped"]["boxes/iscrowd"]
