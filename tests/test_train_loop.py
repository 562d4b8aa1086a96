"""The training loop's own parts: the progress and metrics writer, and the stop after
too many consecutive non-finite steps."""

from __future__ import annotations

import json

import pytest
from etils import epath

from glipjax.train import MetricWriter, check_bad_streak


def test_bad_streak_stops_at_the_limit(tmp_path):
    check_bad_streak(0, 3, epath.Path(tmp_path))
    check_bad_streak(2, 3, epath.Path(tmp_path))
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .* \(train.max_bad_steps = 3\)"):
        check_bad_streak(3, 3, epath.Path(tmp_path))


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
