"""Self-training: noun phrases of captions, the teacher's pseudo-labels (format,
screening, resume without duplicates) and the pseudo-label source in the training mix."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, SMALL_TRAIN, TRAIN_STEPS, child_env, train_in_child
from glipjax import phrases, pseudo_label
from glipjax.config import load_config
from glipjax.data.builders import common
from glipjax.data.export_captions import write_image_text

CONFIG = "configs/demo_selftrain.py"


@pytest.mark.parametrize("caption, expected", [
    ("a red circle left of a blue star", ["red circle", "blue star"]),
    ("There is a small green square. The orange diamond is above the purple hexagon.",
     ["small green square", "orange diamond", "purple hexagon"]),
    ("an image with a yellow star, a large red triangle and a blue circle on a striped background",
     ["image", "yellow star", "large red triangle", "blue circle", "striped background"]),
    ("Two dogs play with a frisbee in the park", ["dogs play", "frisbee", "park"]),
    ("A man's well-worn hat; nothing else!", ["man's well-worn hat", "nothing else"]),
    ("", []),
    ("the of and", []),
])
def test_rule_based_phrases(caption, expected):
    spans = phrases.noun_phrases(caption, "rules")
    assert [caption[a:b] for a, b in spans] == expected
    assert all(0 <= a < b <= len(caption) for a, b in spans)


def test_phrase_method_checked():
    with pytest.raises(ValueError, match="auto, spacy or rules"):
        phrases.noun_phrases("a cat", "nltk")
    if phrases.phrase_method() == "rules":  # no spaCy English pipeline on this machine
        with pytest.raises(RuntimeError, match="en_core_web_sm"):
            phrases.noun_phrases("a cat", "spacy")


def test_screen_threshold_then_nms():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9.5], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.8, 0.9, 0.6, 0.3], np.float32)
    # 3 is below the threshold; 0 overlaps the better 1 with IoU 0.95 > 0.9.
    assert pseudo_label.screen(boxes, scores, 0.5, 0.9).tolist() == [1, 2]
    assert pseudo_label.screen(boxes, scores, 0.5, 0.0).tolist() == [1, 0, 2]  # NMS off
    assert pseudo_label.screen(boxes, scores, 0.95, 0.9).tolist() == []


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    config = load_config(CONFIG + ":tiny_teacher")
    return write_image_text(config.data.shapes, "captions", tmp_path_factory.mktemp("captions"))


def _config(**fields):
    return load_config(CONFIG + ":tiny_teacher", [f"pseudo_label.{k}={v}" for k, v in fields.items()])


@pytest.fixture(scope="module")
def labelled(detecting_run, captions, tmp_path_factory):
    """The tiny teacher's pseudo-labels of the 16 captions (score > 0.1, parts of 5):
    (output folder, summary)."""
    out = tmp_path_factory.mktemp("pseudo")
    summary = pseudo_label.pseudo_label(_config(score_threshold=0.1, part_size=5), str(detecting_run), str(captions),
                                        None, str(out))
    return out, summary


def _records(out):
    return [json.loads(line) for line in (out / pseudo_label.RECORDS_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_pseudo_labels_format(labelled, captions, tmp_path):
    out, summary = labelled
    records = _records(out)
    lines = captions.read_text().splitlines()
    assert summary["lines"] == summary["images"] == len(lines) == 16
    assert summary["records"] == len(records) > 0
    assert sum(summary["score_histogram"]["counts"]) >= summary["boxes"] == sum(len(r["bboxes"]) for r in records)
    assert (out / pseudo_label.HISTOGRAM_FILE).stat().st_size > 0
    assert sorted(p.name for p in (out / pseudo_label.PARTS_DIR).iterdir()) == [
        "000000000-000000005.json", "000000005-000000010.json", "000000010-000000015.json",
        "000000015-000000016.json"]

    # The format (glip-reference section 3, v1): every box scored above the threshold,
    # inside its image, its span one of the caption's noun phrases.
    pairs = [json.loads(line) for line in lines]
    for record in records:
        pair = pairs[record["image_id"]]
        assert record["caption"] == pair["caption"]
        assert (out / record["file_name"]).resolve() == (captions.parent / pair["image"]).resolve()
        nouns = [list(s) for s in phrases.noun_phrases(record["caption"], "rules")]
        assert len(record["bboxes"]) == len(record["scores"]) == len(record["tokens_positive"]) >= 1
        for box, score, spans in zip(record["bboxes"], record["scores"], record["tokens_positive"]):
            assert score > 0.1 and len(spans) == 1 and spans[0] in nouns
            assert 0 <= box[0] <= box[2] <= record["img_w"] and 0 <= box[1] <= box[3] <= record["img_h"]
        assert record["scores"] == sorted(record["scores"], reverse=True)
    # ... and the pseudo-label source reads every record and every box back.
    _, meta = common.load_source("pseudo_labels", data_dir=tmp_path / "tfds", annotations=out / "pseudo_labels.jsonl")
    assert meta["num_examples"] == len(records) and not meta["drops"]

    assert len({r["image_id"] for r in records}) == len(records)


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(labelled, detecting_run, captions, tmp_path):
    """SIGKILL once the first part is written; the rerun labels only the rest and ends
    with the records of an uninterrupted run, none twice."""
    out = tmp_path / "pseudo"
    overrides = ["--config.pseudo_label.score_threshold=0.1", "--config.pseudo_label.part_size=1"]
    command = [sys.executable, "-m", "glipjax.pseudo_label", "--config", CONFIG + ":tiny_teacher", "--teacher",
               str(detecting_run), "--captions", str(captions), "--out", str(out), *overrides]
    proc = subprocess.Popen(command, cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = out / pseudo_label.PARTS_DIR
    deadline = time.time() + 600
    while not (parts.is_dir() and any(p.suffix == ".json" for p in parts.iterdir())) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    done = {p.name: p.stat().st_mtime_ns for p in parts.iterdir() if p.suffix == ".json"}
    assert 1 <= len(done) < 16 and not (out / pseudo_label.RECORDS_FILE).exists()

    summary = pseudo_label.pseudo_label(_config(score_threshold=0.1, part_size=1), str(detecting_run),
                                        str(captions), None, str(out))
    assert all((parts / name).stat().st_mtime_ns == mtime for name, mtime in done.items())
    assert len([p for p in parts.iterdir() if p.suffix == ".json"]) == 16
    records = _records(out)
    ids = [r["image_id"] for r in records]
    assert ids == sorted(set(ids)) and len(ids) == summary["records"]
    # Images the rerun labelled match the uninterrupted run exactly (same process and
    # compilation); the killed process compiled its own program.
    killed = {int(name.split("-")[0]) for name in done}

    def by_id(folder, rows):  # file_name is relative to each output folder
        return {r["image_id"]: dict(r, file_name=(folder / r["file_name"]).resolve()) for r in rows
                if r["image_id"] not in killed}

    assert by_id(out, records) == by_id(labelled[0], _records(labelled[0]))

def test_bad_command_lines(tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as info:
            pseudo_label.main(["--config", CONFIG + ":tiny_teacher", "--teacher", str(tmp_path), "--out",
                               str(tmp_path / "out"), *argv])
        assert info.value.code == 2
        return capsys.readouterr().err

    assert "no such file" in error(["--captions", str(tmp_path / "absent.jsonl")])
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", "caption": "a cat"}\n')
    assert "score_threshold must be in [0, 1)" in error(
        ["--captions", str(tmp_path / "c.jsonl"), "--config.pseudo_label.score_threshold=1.5"])
    assert "has no config.json" in error(["--captions", str(tmp_path / "c.jsonl")])


@pytest.mark.slow
def test_pseudo_label_source_trains_in_the_mix(labelled, tmp_path):
    out, _ = labelled
    workdir = tmp_path / "student"
    metrics = train_in_child(CONFIG + ":tiny_student", workdir,
                             f"--config.data.sources.pseudo.annotations={out / 'pseudo_labels.jsonl'}",
                             "--config.data.sources.pseudo.weight=0.6", "--config.eval.splits=()", *SMALL_TRAIN)
    assert [m["step"] for m in metrics] == list(range(1, TRAIN_STEPS + 1))
    assert all(np.isfinite(m["loss"]) and m["positives"] > 0 for m in metrics)

    from glipjax.data.pipeline import DataLoader

    config = load_config(CONFIG + ":tiny_student", [f"data.sources.pseudo.annotations={out / 'pseudo_labels.jsonl'}",
                                                    "data.sources.pseudo.weight=0.6"])
    loader = DataLoader(config, tmp_path / "tfds", process_index=0, process_count=1)
    pseudo = [b for b in (next(loader) for _ in range(4)) for s, m in zip(b["source"], b["gt_mask"])
              if s == list(config.data.sources).index("pseudo") and m.any()]
    loader.close()
    assert pseudo, "no batch drew a pseudo-labelled image with boxes"
