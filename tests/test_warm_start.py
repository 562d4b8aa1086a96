"""Warm start (train.init_from) and prompt tuning: a run started from another run's
checkpoint holds its params, and prompt tuning trains nothing but the offset."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import train_in_child
from glipjax import train, warm_start
from glipjax.config import load_config
from glipjax.runs import RunError, load_run, read_config

FIXTURES = "tests/fixtures"


def _fresh():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"a": {"kernel": jax.device_put(np.zeros((2, 3), np.float32), sharding)},
            "prompt_offset": jax.device_put(np.zeros((4,), np.float32), sharding)}


def test_merge_loads_present_params_and_keeps_new_ones():
    init = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    merged = warm_start.merge(_fresh(), init)
    np.testing.assert_array_equal(merged["a"]["kernel"], init["a"]["kernel"])
    np.testing.assert_array_equal(merged["prompt_offset"], np.zeros(4))
    assert merged["a"]["kernel"].sharding == _fresh()["a"]["kernel"].sharding


def test_merge_rejects_wrong_shapes_and_unknown_params():
    with pytest.raises(ValueError, match=r"a/kernel has shape \(3, 2\)"):
        warm_start.merge(_fresh(), {"a": {"kernel": np.zeros((3, 2), np.float32)}})
    with pytest.raises(ValueError, match="no place in the model.*b/kernel"):
        warm_start.merge(_fresh(), {"b": {"kernel": np.zeros((2, 3), np.float32)}})


def _finetune_overrides(source, init_from) -> list[str]:
    """Overrides of configs/finetune.py:prompt that give it the `source` run config's
    model and shapes and train 2 steps from `init_from` on the fixture images."""
    fields = [(f"model.{key}", source.model[key]) for key in (
        "preset", "text_encoder", "text_layers", "head_layers", "fpn_channels", "fusion_embed_dim", "fusion_heads",
        "align_fused_text", "head_deformable", "anchor_sizes")]
    fields += [(f"data.{key}", source.data[key]) for key in (
        "canvas", "short_sides", "max_size", "eval_short_side", "eval_max_size", "max_text_len", "max_boxes")]
    fields += [("train.steps", 2), ("train.log_every", 1), ("data.batch_size", 8),
               ("data.sources.train.annotations", f"{FIXTURES}/coco_instances.json"),
               ("data.sources.train.images", f"{FIXTURES}/images"), ("train.init_from", init_from)]
    return [f"--config.{key}={value}" for key, value in fields]


def test_init_from_another_model_names_the_fields_before_the_input_opens(tiny_run, tmp_path, monkeypatch):
    config = load_config("configs/finetune.py:prompt", [*_finetune_overrides(read_config(tiny_run), tiny_run),
                                                        "--config.model.fusion_heads=4"])

    def no_input(*args, **kwargs):
        raise AssertionError("the input was opened")

    monkeypatch.setattr(train, "_in_background", no_input)
    with pytest.raises(RunError, match="model.fusion_heads: 8 in the source, 4 here"):
        train.train(config, tmp_path)


def test_a_field_newer_than_the_source_run_reads_as_its_default():
    import ml_collections

    def config(**model):
        return ml_collections.ConfigDict(dict(model=dict(preset="glip_tiny", **model), data=dict(max_text_len=64)))

    older = config()  # saved before model.head_layers and fpn_channels existed: the preset's
    assert warm_start._differing_fields(config(head_layers=0, fpn_channels=0, head_deformable=True), older) == []
    assert warm_start._differing_fields(config(head_layers=1), older) == [
        "model.head_layers: None in the source, 1 here"]
    assert warm_start._differing_fields(config(dropout=True), config(dropout=False)) == []  # training only


@pytest.mark.slow
def test_prompt_tuning_from_a_run_changes_only_the_offset(tiny_run, tmp_path):
    source = load_run(tiny_run)
    train_in_child("configs/finetune.py:prompt", tmp_path, *_finetune_overrides(source.config, tiny_run))
    tuned = load_run(tmp_path).params
    offset = np.asarray(tuned.pop("prompt_offset"))
    assert offset.shape == (source.config.data.max_text_len, source.glip_config.text.hidden_size)
    assert np.abs(offset).max() > 0  # trained at lr 0.05 from zero
    for a, b in zip(jax.tree_util.tree_leaves(source.params), jax.tree_util.tree_leaves(tuned), strict=True):
        np.testing.assert_array_equal(a, b)
