"""python -m glipjax.data.inspect, and the drawing helpers it uses (glipjax.draw)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from glipjax import draw
from glipjax.config import load_config


def test_inspect_command_builds_summarises_and_writes_png(tmp_path, repo_root):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "glipjax.data.inspect", "--config", "configs/demo.py:tiny",
        "--workdir", str(workdir), "--num", "6", "--cols", "3", "--config.data.shapes.num_train=12",
    ]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split sizes: train 12, validation 16, captions 16, novel 16" in result.stdout
    assert "objects per image" in result.stdout and "category counts" in result.stdout
    assert (workdir / "tfds" / "shapes").is_dir(), "relative data_dir lies under the workdir"
    with Image.open(workdir / "samples.png") as png:
        # 3 columns of 96 px images enlarged 3x (288 px) with 6 px padding.
        assert png.size[0] == 6 + 3 * (288 + 6) and png.size[1] > 2 * 288
        sheet = np.asarray(png.convert("RGB"))
    assert (sheet != 255).any(axis=-1).mean() > 0.5, "the sheet holds images, not just white space"


def test_inspect_command_rejects_unknown_split(tmp_path, repo_root):
    cmd = [
        sys.executable, "-m", "glipjax.data.inspect", "--config", "configs/demo.py:tiny",
        "--workdir", str(tmp_path), "--split", "test",
    ]
    result = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'test'" in result.stderr


def test_inspect_dataset_draws_the_caption_only_split(tmp_path):
    from glipjax.data.inspect import inspect_dataset

    cfg = load_config("configs/demo.py:tiny", ["data.shapes.num_train=4", "data.shapes.num_validation=2"])
    path = inspect_dataset(cfg, tmp_path, split="captions", num=2, cols=2)
    assert path == tmp_path / "samples.png" and path.is_file()


def test_draw_boxes_outlines_each_box_in_its_label_colour():
    image = np.full((40, 50, 3), 128, np.uint8)
    out = draw.draw_boxes(image, [[10, 20, 30, 35]], ["red circle"], scale=2, line_width=1)
    assert out.size == (100, 80)
    pixels = np.asarray(out)
    color = draw.label_color("red circle")
    # Bottom edge at y = 2 * 35 - 1, away from the label tag drawn above the box.
    assert tuple(pixels[69, 30]) == color and tuple(pixels[69, 50]) == color
    assert tuple(pixels[50, 40]) == (128, 128, 128), "the inside of the box is untouched"
    assert tuple(pixels[5, 5]) == (128, 128, 128)
    assert np.array_equal(np.asarray(image), np.full((40, 50, 3), 128, np.uint8)), "input not modified"


def test_draw_boxes_with_scores_and_without_boxes():
    image = np.zeros((48, 160, 3), np.uint8)
    with_scores = np.asarray(draw.draw_boxes(image, [[4, 20, 20, 40]], ["blue star"], [0.5]))
    without = np.asarray(draw.draw_boxes(image, [[4, 20, 20, 40]], ["blue star"]))
    assert not np.array_equal(with_scores, without), "the score is written into the tag"
    assert np.array_equal(np.asarray(draw.draw_boxes(image, np.zeros((0, 4)), [])), image)


def test_draw_rejects_bad_input():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="labels"):
        draw.draw_boxes(image, [[0, 0, 4, 4]], [])
    with pytest.raises(ValueError, match="shape"):
        draw.draw_boxes(image, [[0, 0, 4]], ["a"])
    with pytest.raises(ValueError, match="uint8"):
        draw.draw_boxes(np.zeros((8, 8), np.uint8), [], [])
    with pytest.raises(ValueError, match="captions"):
        draw.image_grid([image], [], cols=1)


def test_image_grid_lays_out_cells_and_wraps_captions():
    images = [np.full((20, 30, 3), v, np.uint8) for v in (0, 60, 120)]
    short = draw.image_grid(images, ["a", "b", "c"], cols=2, pad=4)
    assert short.size[0] == 4 + 2 * (30 + 4)
    sheet = np.asarray(short)
    assert tuple(sheet[4, 4]) == (0, 0, 0) and tuple(sheet[4, 4 + 34]) == (60, 60, 60)
    long = draw.image_grid(images, ["a", "b", "many words " * 6], cols=2, pad=4)
    assert long.size[0] == short.size[0] and long.size[1] > short.size[1], "long captions wrap onto more lines"


def test_draw_boxes_draws_a_box_under_a_pixel_as_one_pixel():
    image = np.zeros((60, 60, 3), np.uint8)
    out = np.asarray(draw.draw_boxes(image, [[5, 40, 5.3, 40.2]], ["red circle"], line_width=1))
    assert out[40, 5].any() and not out[50:, 10:].any()  # the pixel; nothing below the tag
