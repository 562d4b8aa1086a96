"""The training loop's own parts: the progress and metrics writer, the stop after too
many consecutive non-finite steps (alone, and in a training run fed NaN images), and
the input's errors, raised while it opens in the background."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from etils import epath

from conftest import REPO, SMALL_TRAIN, child_env
from glipjax import train
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
