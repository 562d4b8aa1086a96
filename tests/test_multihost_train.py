"""Multi-host training: two processes on 127.0.0.1 (jax.distributed with CPU
collectives), each feeding its half of the global batch, give the losses of one
process that sees the whole batch; in both, a step on NaN images leaves the params
as they were and is counted."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SMALL_TRAIN, spawn_workers

STEPS = 3

_WORKER = """
import json, sys
import jax
import numpy as np
port, pid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if count > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", count, pid)
from glipjax import sharding, train_state
from glipjax.config import load_config
# The suite's training settings: once a training run has compiled their step, the 1-process job loads it from the cache.
config = load_config("configs/demo.py:tiny", %(small_train)r)
mesh = sharding.make_mesh(dict(config.sharding.mesh))
rules = sharding.rules_from_config(config)
model, glip_config, _ = train_state.build_model(config)
tx, schedule = train_state.make_tx(config)
state = train_state.init_state(config, model, tx, mesh, rules)
step = train_state.jit_train_step(config, model, glip_config, tx, schedule, state, mesh, rules)
rng = np.random.default_rng(0)  # the same global batch in every process
b, (h, w), length, boxes = config.data.batch_size, config.data.canvas, config.data.max_text_len, config.data.max_boxes
corner = rng.uniform(0, 40, (b, boxes, 2)).astype(np.float32)
positive = np.zeros((b, boxes, length), np.float32)
positive[:, :, 1:3] = 0.5
batch = {
    "images": rng.normal(size=(b, h, w, 3)).astype(np.float32),
    "input_ids": rng.integers(1000, 2000, (b, length)).astype(np.int32),
    "attention_mask": np.ones((b, length), np.int32),
    "gt_boxes": np.concatenate([corner, corner + rng.uniform(12, 40, (b, boxes, 2))], -1).astype(np.float32),
    "gt_mask": np.arange(boxes)[None, :] < rng.integers(1, boxes, (b, 1)),
    "positive_map": positive,
}
share = b // jax.process_count()
mine = {k: v[pid * share:(pid + 1) * share] for k, v in batch.items()}
losses = []
for _ in range(%(steps)d):
    state, metrics = step(state, sharding.shard_batch(mine, mesh, rules))
    losses.append(float(metrics["loss"]))
def local_params():  # copies: the step donates the state's buffers
    return [np.array(s.data) for x in jax.tree.leaves(state["params"]) for s in x.addressable_shards]
before = local_params()
nan_images = dict(mine, images=np.full_like(mine["images"], np.nan))
state, metrics = step(state, sharding.shard_batch(nan_images, mesh, rules))
nan_step = {"loss": float(metrics["loss"]), "bad_steps": int(metrics["bad_steps"]),
            "params_kept": all(np.array_equal(a, b) for a, b in zip(before, local_params(), strict=True))}
print(json.dumps({"devices": jax.device_count(), "losses": losses, "nan_step": nan_step}))
""" % {"steps": STEPS, "small_train": list(SMALL_TRAIN)}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    single, double = spawn_workers(script, [1, 2])  # the two jobs run at once
    assert single[0]["devices"] == 1 and [r["devices"] for r in double] == [2, 2]
    assert double[0]["losses"] == double[1]["losses"]  # one global computation
    assert len(single[0]["losses"]) == STEPS and np.isfinite(single[0]["losses"]).all()
    # float32 sums split over two devices: tolerance 1e-5 relative.
    np.testing.assert_allclose(double[0]["losses"], single[0]["losses"], rtol=1e-5)
    for result in (*single, *double):
        nan_step = result["nan_step"]
        assert np.isnan(nan_step["loss"]) and nan_step["bad_steps"] == 1 and nan_step["params_kept"], nan_step


_EVAL_WORKER = """
import json, sys
import jax
import numpy as np
port, pid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if count > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", count, pid)
from etils import epath
from glipjax import sharding, train_eval, train_state
from glipjax.config import load_config
config = load_config("configs/demo.py:tiny", [*%(small_train)r, "--config.eval.splits=()",
                     "--config.eval.coco.annotations=tests/fixtures/coco_instances.json",
                     "--config.eval.coco.images=tests/fixtures/images", "--config.eval.datasets=('coco',)",
                     "--config.data.batch_size=2"], train_eval.default_fields())
mesh = sharding.make_mesh({"fsdp": -1})  # the params split over both processes
rules = sharding.rules_from_config(config)
model, glip_config, _ = train_state.build_model(config)
tx, _ = train_state.make_tx(config)
params = train_state.init_state(config, model, tx, mesh, rules)["params"]
local, _ = train_eval._on_local_devices(params, mesh)
checksum = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(local)))
data_dir = epath.Path(%(data_dir)r) / f"{count}-{pid}"  # its own, as on a host with a local disk
results = train_eval.evaluate(config, model, glip_config, params, 0, mesh, data_dir)
print(json.dumps(dict(results, checksum=checksum)))
"""


@pytest.mark.slow
def test_evaluator_sets_during_two_process_training_match_one(tmp_path):
    """Each process gets the whole params (fsdp-split over both: the same as one
    process's, by their checksum) and evaluates half the set; the metrics (of an
    untrained model, so mostly zero) are gathered to both."""
    script = tmp_path / "eval_worker.py"
    script.write_text(_EVAL_WORKER % {"small_train": list(SMALL_TRAIN), "data_dir": str(tmp_path / "data")})
    (single,), double = spawn_workers(script, [1, 2])
    for result in (single, *double):
        del result["coco/seconds"]
    np.testing.assert_equal(double[0], double[1])  # gathered to every process
    assert single["coco/num_images"] == 4
    assert double[0].keys() == single.keys()
    for key, value in single.items():
        np.testing.assert_allclose(double[0][key], value, rtol=1e-5, err_msg=key)
