"""glipjax.aot (memory check compiled ahead of time on simulated devices) and the
reference configs it checks (configs/glip_t.py, configs/glip_l.py)."""

import ast
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from conftest import child_env
from glipjax import aot, optim, sharding, train_state
from glipjax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/demo.py:tiny", "--config.model.text_encoder=", "--config.model.text_layers=0",
        "--config.data.batch_size=4"]


def test_parse_bytes_and_mesh():
    assert aot.parse_bytes("16GiB") == 16 * 2**30 and aot.parse_bytes("80GB") == 80 * 10**9
    assert aot.parse_bytes("1.5 MiB") == 3 * 2**19 and aot.parse_bytes("512") == 512
    assert aot.parse_mesh("data=2,fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert aot.parse_mesh("fsdp=-1") == {"fsdp": -1}
    for bad, message in [("16 parsecs", "cannot read a size"), ("", "cannot read a size")]:
        with pytest.raises(aot.AotError, match=message):
            aot.parse_bytes(bad)
    for bad, message in [("data:2", "not AXIS=SIZE"), ("fsdp=x", "not AXIS=SIZE"), ("fsdp=2,fsdp=4", "twice"),
                         (",", "empty")]:
        with pytest.raises(aot.AotError, match=message):
            aot.parse_mesh(bad)


def pipeline_batch_fields() -> tuple[str, ...]:
    """glipjax.data.pipeline.BATCH_FIELDS, read from its source (importing it loads TensorFlow)."""
    tree = ast.parse((REPO / "glipjax" / "data" / "pipeline.py").read_text())
    (value,) = [node.value for node in tree.body
                if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["BATCH_FIELDS"]]
    return ast.literal_eval(value)


def test_abstract_batch_matches_the_pipeline():
    config = load_config("configs/demo.py:tiny")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4])
    batch = aot.abstract_batch(config, mesh, sharding.DEFAULT_RULES)
    assert tuple(batch) == pipeline_batch_fields()
    b, (h, w), length, boxes = 8, config.data.canvas, config.data.max_text_len, config.data.max_boxes
    assert batch["images"].shape == (b, h, w, 3) and batch["positive_map"].shape == (b, boxes, length)
    assert batch["gt_mask"].dtype == bool and batch["input_ids"].dtype == "int32"
    assert aot.per_device_bytes({"images": batch["images"]}) == b // 4 * h * w * 3 * 4
    with pytest.raises(aot.AotError, match=r"global batch 6 .* does not divide over the 4 batch shards"):
        aot.abstract_batch(load_config("configs/demo.py:tiny", ["--config.data.batch_size=6"]), mesh,
                           sharding.DEFAULT_RULES)
    with pytest.raises(aot.AotError, match=r"data.batch_size must be at least 1, got 0"):
        aot.abstract_batch(load_config("configs/demo.py:tiny", ["--config.data.batch_size=0"]), mesh,
                           sharding.DEFAULT_RULES)


def test_glip_t_variants_are_the_papers_data_mixes():
    sources = {}
    for variant in ("o365", "o365_goldg", "cap4m"):
        config = load_config(f"configs/glip_t.py:{variant}")
        sources[variant] = {name: config.data.sources[name].kind for name in config.data.sources}
        assert config.train.steps == int(30 * sum(config.data.sources[n].weight for n in sources[variant]) * 1e6 / 64)
    assert sources["o365"] == {"objects365": "coco"}
    assert sources["o365_goldg"] == {"objects365": "coco", "goldg": "mdetr", "flickr30k": "mdetr"}
    assert sources["cap4m"] == {**sources["o365_goldg"], "cap4m": "pseudo_labels"}
    glip_l = load_config("configs/glip_l.py")
    assert {name: glip_l.data.sources[name].kind for name in glip_l.data.sources} == {
        **sources["o365_goldg"], "cap24m": "pseudo_labels"}
    assert glip_l.data.sources.cap24m.screen and glip_l.data.sources.cap24m.score_threshold == 0.5
    assert glip_l.optim.weight_decay == 0.01 and glip_l.optim.ema_decay == 0 and glip_l.train.steps == 1_000_000
    with pytest.raises(ValueError, match="Unknown variant 'o366'"):
        load_config("configs/glip_t.py:o366")


@pytest.mark.parametrize("spec, preset, params", [
    ("configs/glip_t.py", "glip_t", 231_780_222),
    ("configs/glip_l.py", "glip_l", 430_422_384),
])
def test_reference_configs_build_their_state(spec, preset, params):
    """The GLIP-T/L configs give the official parameter counts (abstract state, one device)."""
    config = load_config(spec)
    assert config.model.preset == preset and config.data.max_text_len == 256
    assert tuple(config.data.canvas) == (800, 1344) and all(c % 32 == 0 for c in config.data.canvas)
    assert config.data.batch_size == 64 and config.model.dtype == "bfloat16" and config.model.remat
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    model, _, text_params = train_state.build_model(config)
    assert text_params is None  # text_encoder "": a randomly initialised BERT-base
    tx, _ = train_state.make_tx(config)
    state = train_state.abstract_state(config, model, tx, mesh, sharding.rules_from_config(config))
    assert sum(x.size for x in jax.tree.leaves(state["params"])) == params
    assert bool(state["ema"]) == bool(config.optim.ema_decay)


def test_bad_requests_stop_before_compiling(capsys):
    for args, message in [
        (["--devices", "4", "--mesh", "fsdp=4", "--config.data.batch_size=6"], "does not divide over the 4 batch"),
        (["--devices", "4", "--mesh", "fsdp=3"], "needs 3 devices, but 4"),
        (["--devices", "4", "--mesh", "fsdp=4", "--hbm", "lots"], "cannot read a size from 'lots'"),
        (["--devices", "4", "--mesh", "pipeline=4"], "Unknown mesh axes"),
        (["--devices", "64", "--mesh", "fsdp=64"], "in a fresh process"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            aot.main([*TINY[:2], "--config.model.text_encoder=", "--config.model.text_layers=0", *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_state_only_report_without_compiling(tmp_path, capsys):
    out = tmp_path / "state.json"
    aot.main([*TINY, "--devices", "4", "--mesh", "fsdp=4", "--state-only", "--hbm", "1GiB", "--out", str(out)])
    report = json.loads(out.read_text())
    m = report["per_device"]
    assert report["compiled"] is False and report["fits"] is True and "temporaries" not in m
    assert m["total"] == m["params"] + m["opt_state"] + m["ema"] + m["batch"]
    assert report["param_bytes_total"] / m["params"] == pytest.approx(4, rel=0.02)
    printed = capsys.readouterr().out
    assert "not compiled (--state-only)" in printed and "total of the above" in printed


@pytest.fixture(scope="module")
def fsdp4_run(tmp_path_factory):
    """One compile of the tiny demo step on 4 simulated devices with fsdp=4, in a fresh
    process, against a 1 MiB budget."""
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = child_env()  # glipjax.aot adds the device count
    result = subprocess.run([sys.executable, "-m", "glipjax.aot", *TINY, "--devices", "4", "--mesh",
                             "data=1,fsdp=4,tensor=1", "--hbm", "1MiB", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return result, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.slow
def test_aot_per_device_params_fall_as_one_over_fsdp(fsdp4_run):
    result, report = fsdp4_run
    assert report is not None, result.stderr[-3000:]
    config = load_config(TINY[1], TINY[2:])
    model, _, _ = train_state.build_model(config)
    tx, _ = train_state.make_tx(config)
    one = train_state.abstract_state(config, model, tx, sharding.make_mesh({"data": 1}, jax.devices()[:1]),
                                     sharding.DEFAULT_RULES)
    one_device = aot.per_device_bytes(one["params"])
    assert one_device == report["param_bytes_total"]
    m = report["per_device"]
    # Measured: 4.0x; the few vectors whose size does not divide by 4 stay whole.
    assert one_device / m["params"] == pytest.approx(4, rel=0.02)
    assert aot.per_device_bytes(one["opt_state"]) / m["opt_state"] == pytest.approx(4, rel=0.02)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and report["batch_per_device"] == 1
    # The gradients program outputs the trainable params' gradients (frozen ones get no
    # buffer) and the losses; the update program's arguments are the state (plus step and
    # rng) and those gradients, and the donated state is aliased.
    grads, update = m["gradients"], m["update"]
    groups = jax.tree.leaves(optim.param_groups(one["params"], config.optim))
    trainable = sum(x.size * x.dtype.itemsize for x, group in zip(jax.tree.leaves(one["params"]), groups, strict=True)
                    if group != "frozen")
    assert trainable < one_device  # the demo freezes the text embeddings and first layers
    assert grads["outputs"] / trainable * 4 == pytest.approx(1, rel=0.02)
    state = m["params"] + m["opt_state"] + m["ema"]
    assert abs(update["arguments"] - state - grads["outputs"]) <= 4096
    assert state <= update["aliased"] <= update["outputs"]
    assert grads["temporaries"] > update["temporaries"] > 0  # activations live in the gradients program
    assert grads["peak"] >= state + m["batch"] + grads["outputs"] + grads["temporaries"]
    assert update["peak"] == update["arguments"] + update["outputs"] - update["aliased"] + update["temporaries"]
    assert m["total"] == max(grads["peak"], update["peak"])


def test_aot_over_budget_exits_with_a_message(fsdp4_run):
    result, report = fsdp4_run
    assert result.returncode == 1, result.stderr[-3000:]
    assert "exceeds the budget --hbm 1MiB" in result.stderr and "Raise fsdp" in result.stderr
    assert report["fits"] is False and report["hbm"] == 2**20
    for line in ("params (from shardings)", "gradients program", "update program", "total = the larger peak",
                 "XLA:CPU estimate"):
        assert line in result.stdout
    printed = float(result.stderr.split("per-device memory ")[1].split(" MiB")[0])  # one decimal
    assert abs(report["per_device"]["total"] / 2**20 - printed) <= 0.05
