"""The training loop's own parts: the progress and metrics writer, the stop after too
many consecutive non-finite steps (alone, and in a training run fed NaN images), the
input's errors, raised while it opens in the background, and reruns in a workdir that
holds a run: finished, of another model, or with other fields."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from etils import epath

from conftest import REPO, SMALL_TRAIN, TRAIN_STEPS, child_env
from glipjax import runs, train, train_eval
from glipjax.config import load_config
from glipjax.train import MetricWriter, check_bad_streak

# `python -m glipjax.train` whose loader multiplies every batch's images by NaN.
NAN_TRAIN = """
import sys
import numpy as np
from glipjax import train
from glipjax.data import pipeline

read = pipeline.DataLoader.__next__
pipeline.DataLoader.__next__ = lambda self: dict(batch := read(self), images=batch["images"] * np.nan)
train.main(sys.argv[1:])
"""


def test_bad_streak_stops_at_the_limit(tmp_path):
    check_bad_streak(0, 3, epath.Path(tmp_path))
    check_bad_streak(2, 3, epath.Path(tmp_path))
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .* \(train.max_bad_steps = 3\)"):
        check_bad_streak(3, 3, epath.Path(tmp_path))


@pytest.mark.slow
def test_training_on_nan_images_stops_at_the_limit_without_saving(tmp_path, tiny_run):
    """Every step is non-finite: the run stops with the limit's error once two are in a
    row (train.max_bad_steps=2), before any checkpoint (tiny_run compiled the step)."""
    workdir = tmp_path / "nan"
    command = [sys.executable, "-c", NAN_TRAIN, "--config", "configs/demo.py:tiny", "--workdir", str(workdir),
               *SMALL_TRAIN, "--config.eval.splits=()", "--config.checkpoint.save_every=100",
               "--config.train.max_bad_steps=2"]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode != 0
    assert "FloatingPointError: 2 consecutive steps with a non-finite loss or gradient" in result.stderr, \
        result.stderr[-3000:]
    assert not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # The tiny config logs every step: the run stopped at the third, before logging it.
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["bad_streak"] == r["step"] for r in logged)


def test_a_bad_input_config_stops_the_run_before_the_step_compiles(tmp_path, monkeypatch):
    """The input opens in a background thread while the step compiles; its error
    (here an unknown source kind) stops the run first, not after the compile."""
    config = load_config("configs/demo.py:tiny", [*SMALL_TRAIN, "--config.data.sources.shapes_detection.kind=nope"])

    def no_compile(*args, **kwargs):
        raise AssertionError("the update step was compiled before the input's error was raised")

    monkeypatch.setattr(train.aot, "abstract_batch", no_compile)
    with pytest.raises(ValueError, match=r"data.sources.shapes_detection.kind: unknown kind 'nope'"):
        train.train(config, tmp_path / "run")


def test_metric_writer_logs_rate_eta_jsonl_and_tensorboard(tmp_path, capsys):
    workdir = epath.Path(tmp_path)
    writer = MetricWriter(workdir, total_steps=10)
    writer.write(2, {"loss": 2.5}, images_per_step=8)
    writer.write(4, {"loss": 2.0}, images_per_step=8)
    writer.write(4, {"validation/true/AP50": 0.5})
    writer.close()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 4]
    assert "images_per_s" not in records[0]  # the first logged step starts the clock
    rate = records[1]["images_per_s"] / 8  # steps per second
    assert rate > 0 and records[1]["eta_s"] == pytest.approx(6 / rate)
    assert records[2] == {"step": 4, "validation/true/AP50": 0.5}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 2/10 loss 2.5"
    assert lines[1].startswith("step 4/10 loss 2 images_per_s ") and " eta " in lines[1]
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())


# The config file and overrides of the shared tiny_run (conftest); the command adds train_eval.default_fields().
TINY_RUN = ("configs/demo.py:tiny", [*SMALL_TRAIN, "--config.eval.splits=()", "--config.checkpoint.save_every=100"])


def _no(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} should not have happened")
    return fail


def test_rerun_of_a_finished_run_says_so_and_changes_nothing(tiny_run, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    monkeypatch.setattr(train.train_state, "build_model", _no("building the model"))
    assert train.train(load_config(*TINY_RUN, train_eval.default_fields()), tiny_run) == {}  # tiny_run evaluates nothing
    assert capsys.readouterr().out == (
        f"{tiny_run} has finished: its last checkpoint is step {TRAIN_STEPS}, and train.steps is {TRAIN_STEPS}. "
        "To train on, rerun with a larger --config.train.steps.\n")
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")} == before


def test_resume_with_another_model_stops_naming_the_fields(tiny_run, tmp_path, monkeypatch):
    """Before any array is read or the input opens; the run's config.json stays."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints", workdir / "checkpoints", copy_function=os.link)  # only read
    shutil.copy(tiny_run / "config.json", workdir)
    saved = (workdir / "config.json").read_text()
    name, overrides = TINY_RUN
    config = load_config(name, [*overrides, f"--config.train.steps={TRAIN_STEPS + 2}",
                                "--config.model.fusion_embed_dim=32"], train_eval.default_fields())
    monkeypatch.setattr(train, "_in_background", _no("opening the input"))
    with pytest.raises(runs.RunError) as raised:
        train.train(config, workdir)
    message = str(raised.value)
    assert f"cannot resume {workdir} with this config: checkpoint step {TRAIN_STEPS} in" in message
    assert "of another shape (" in message and "vs (32," in message
    assert (f"Config fields changed since the run's config.json: model.fusion_embed_dim: 64 -> 32; "
            f"train.steps: {TRAIN_STEPS} -> {TRAIN_STEPS + 2}. Rerun with the run's own config") in message
    assert f"--config.train.init_from={workdir}" in message
    assert (workdir / "config.json").read_text() == saved

    # The same config as the run's, and still other arrays: a checkpoint of another version.
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    with pytest.raises(runs.RunError, match="The config is the run's own config.json, so another version"):
        train.train(config, workdir)


def test_resume_with_other_fields_keeps_the_earlier_config(tmp_path, caplog):
    workdir = epath.Path(tmp_path)
    first = load_config("configs/demo.py:tiny")
    train._write_config(first, workdir, [], 0)
    second = load_config("configs/demo.py:tiny", ["--config.train.steps=900", "--config.optim.lr=0.001"])
    changes = train._config_changes(second, workdir)
    assert changes == [f"optim.lr: {first.optim.lr!r} -> 0.001", f"train.steps: {first.train.steps} -> 900"]
    with caplog.at_level(logging.WARNING, logger="glipjax.train"):
        train._write_config(second, workdir, changes, 40)
    assert json.loads((workdir / "config_to_step_40.json").read_text()) == json.loads(first.to_json_best_effort())
    assert json.loads((workdir / "config.json").read_text()) == json.loads(second.to_json_best_effort())
    assert "resuming at step 40 with a config that differs from the run's config.json in: optim.lr" in caplog.text

