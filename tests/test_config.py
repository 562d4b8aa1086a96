"""Config files, variants, overrides and their errors; the fields two configs differ in."""

import argparse
import pathlib

import pytest

from glipjax.config import ConfigError, changed_fields, load_config, parse_command_line

CONFIGS = sorted(pathlib.Path(__file__).resolve().parents[1].glob("configs/*.py"))


def test_variants_differ():
    default = load_config("configs/demo.py")
    tiny = load_config("configs/demo.py:tiny")
    assert default.variant == "default" and tiny.variant == "tiny"
    assert tiny.data.shapes.num_train < default.data.shapes.num_train


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_documents_its_command(path):
    config = load_config(str(path))
    assert config.keys()
    text = path.read_text()
    assert "python -m glipjax." in text.split('"""')[1], f"{path.name}: docstring lacks its run command"


def test_overrides_set_typed_values():
    c = load_config("configs/demo.py:tiny", ["--config.data.shapes.seed=3", "data.name=other"])
    assert c.data.shapes.seed == 3 and c.data.name == "other"


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.data.shapes.nope=3", "Unknown config field: data.shapes.nope"),
        ("--config.nope.seed=3", "Unknown config field: nope"),
        ("--config.data.shapes.seed=abc", "data.shapes.seed: expected int"),
        ("--config.data.shapes.seed=1.5", "data.shapes.seed: expected int"),
        ("--config.data.shapes=3", "data.shapes is a group"),
        ("--config.data.shapes.seed", "has no value"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("configs/demo.py", [override])


def test_unknown_variant_and_missing_file():
    with pytest.raises(ConfigError, match="huge"):
        load_config("configs/demo.py:huge")
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/missing.py")


def test_config_is_locked_after_loading():
    c = load_config("configs/demo.py:tiny")
    with pytest.raises(AttributeError):
        c.data.brand_new_field = 1


def test_command_line_forms(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir")
    args, c = parse_command_line(
        parser, ["--config", "configs/demo.py:tiny", "--workdir", "w",
                 "--config.data.shapes.seed", "7", "--config.data.shapes.image_size=64"])
    assert args.workdir == "w" and c.data.shapes.seed == 7 and c.data.shapes.image_size == 64
    with pytest.raises(SystemExit):
        parse_command_line(argparse.ArgumentParser(), ["--config", "configs/demo.py", "--config.data.nope=1"])
    assert "Unknown config field: data.nope" in capsys.readouterr().err


def test_changed_fields_lists_nested_added_and_removed_fields():
    before = {"a": 1, "g": {"x": [1, 2], "y": "s"}, "old": 3}
    after = {"a": 1, "g": {"x": [1, 3], "y": "s"}, "new": {"z": 0}}
    assert changed_fields(before, after) == ["g.x: [1, 2] -> [1, 3]", "new: (absent) -> {'z': 0}",
                                             "old: 3 -> (absent)"]
    assert changed_fields(before, before) == []
