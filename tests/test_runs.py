"""load_run on a tiny training workdir: the params the trainer restores, the config
with its tuples, and clear errors for every way a directory can be wrong."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from conftest import TRAIN_STEPS
from glipjax import checkpoint, sharding, train_state
from glipjax.models.glip import GLIP
from glipjax.runs import Run, RunError, load_run, read_config


@pytest.fixture(scope="module")
def run(tiny_run) -> Run:
    return load_run(tiny_run)


def test_loads_the_trained_params_of_the_latest_step(tiny_run, run):
    assert run.step == TRAIN_STEPS and isinstance(run.model, GLIP)
    assert run.glip_config.max_text_len == run.config.data.max_text_len == 64
    assert run.config.data.canvas == (96, 96) and run.config.model.anchor_sizes == (16, 32, 64, 128, 256)
    assert run.glip_config.anchor_sizes == (16, 32, 64, 128, 256)
    # The trainer's own restore of the whole state gives the same params, bit for bit.
    config = read_config(tiny_run)
    tx, _ = train_state.make_tx(config)
    abstract = train_state.abstract_state(config, run.model, tx, run.mesh, sharding.rules_from_config(config))
    with checkpoint.Checkpointer(tiny_run, save_every=2, keep=2) as ckpt:
        step, state, _ = ckpt.restore_latest(abstract)
    assert step == TRAIN_STEPS
    leaves = jax.tree_util.tree_leaves_with_path(run.params)
    assert len(leaves) == len(jax.tree.leaves(state["params"])) > 100
    for (path, ours), theirs in zip(leaves, jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=jax.tree_util.keystr(path))
        assert ours.sharding.mesh.devices.size == len(jax.local_devices())


def test_explicit_step_and_mesh(tiny_run, run):
    mesh = sharding.make_mesh({"data": 1}, jax.local_devices()[:1])
    one = load_run(tiny_run, step=TRAIN_STEPS, mesh=mesh)
    leaf = jax.tree.leaves(one.params)[0]
    assert leaf.sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(jax.tree.leaves(run.params)[0]))


def test_missing_things_are_named(tiny_run, tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        load_run(tmp_path / "absent")
    with pytest.raises(RunError, match="has no config.json"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="no EMA params"):
        load_run(tiny_run, ema=True)
    with pytest.raises(RunError, match=rf"no checkpoint of step 7; its steps are \[{TRAIN_STEPS}\]"):
        load_run(tiny_run, step=7)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / "config.json", bare)
    with pytest.raises(RunError, match="neither checkpoints/"):
        load_run(bare)
    (bare / "checkpoints").mkdir()
    with pytest.raises(RunError, match="no finished checkpoint steps"):
        load_run(bare)
    (bare / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="not a valid config"):
        load_run(bare)


def test_checkpoint_of_another_model_config(tiny_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").symlink_to(tiny_run / "checkpoints")
    config = json.loads((tiny_run / "config.json").read_text())
    config["model"]["fusion_embed_dim"] = 128
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="fusion_embed_dim=128") as error:
        load_run(other)
    assert "of another shape" in str(error.value) and "head/" in str(error.value)
    config["model"]["preset"] = "glip_t_a"  # no fusion layers: their params are unexpected
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="unexpected") as error:
        load_run(other)
    assert "preset='glip_t_a'" in str(error.value)
