"""Checkpointer: round trips, retention, async saves, resharding restore, SIGTERM and Ctrl-C resume,
damaged latest steps, per-process data states, params export. Restored values must be
bit-identical (tolerance 0)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import spawn_workers
from glipjax import checkpoint as ckpt
from glipjax.sharding import make_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]


def _state(mesh, seed=0):
    """A trainer-like state sharded over `mesh` (fsdp on the leading axes)."""
    rng = np.random.default_rng(seed)
    fsdp = NamedSharding(mesh, P("fsdp"))
    repl = NamedSharding(mesh, P())
    return {
        "params": {
            "dense": {"kernel": jax.device_put(rng.normal(size=(16, 4)).astype(np.float32), fsdp),
                      "bias": jax.device_put(rng.normal(size=(8,)).astype(np.float32), fsdp)},
            "half": jax.device_put(jnp.asarray(rng.normal(size=(8, 2)), jnp.bfloat16), fsdp),
        },
        "opt_state": {"mu": jax.device_put(rng.normal(size=(16, 4)).astype(np.float32), fsdp)},
        "step": jax.device_put(jnp.int32(7), repl),
        "rng": jax.random.key(seed),
    }


def _assert_identical(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh({"fsdp": 8})


@pytest.mark.parametrize("data_state, async_save", [(bytes(range(256)) * 3, False), (b"", True)])
def test_round_trip_bit_identical(tmp_path, mesh8, data_state, async_save):
    state = _state(mesh8)
    with ckpt.Checkpointer(tmp_path, save_every=1, async_save=async_save) as c:
        assert c.restore_latest(_abstract(state)) is None
        assert c.save(3, state, data_state)
        c.wait()
        step, restored, data = c.restore_latest(_abstract(state))
    assert step == 3 and data == data_state
    files = (tmp_path / "checkpoints" / "3" / "data").glob("process_*")
    assert [p.name for p in files] == ["process_0_of_1"]
    _assert_identical(state, restored)
    assert restored["params"]["dense"]["kernel"].sharding == state["params"]["dense"]["kernel"].sharding


def test_save_interval_force_and_no_overwrite(tmp_path, mesh8):
    state = _state(mesh8)
    with ckpt.Checkpointer(tmp_path, save_every=4, async_save=False) as c:
        assert not c.save(1, state, b"0")  # a run's first step is not saved off the interval
        assert c.save(4, state, b"a")
        assert not c.save(5, state, b"b")  # off the interval
        assert c.save(6, state, b"c", force=True)
        assert not c.save(6, _state(mesh8, seed=1), b"d", force=True)  # exists: kept as is
        assert c.all_steps() == [4, 6]
        step, restored, data = c.restore_latest(_abstract(state))
    assert (step, data) == (6, b"c")
    _assert_identical(state, restored)


def test_keep_last_and_best(tmp_path, mesh8):
    state = _state(mesh8)
    ap = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4}
    with ckpt.Checkpointer(tmp_path, save_every=1, keep=2, best_metric="ap50", best_mode="max",
                           async_save=False) as c:
        for step, value in ap.items():
            c.save(step, state, b"", metrics={"ap50": value})
        assert c.all_steps() == [2, 4, 5]
        c.save(6, state, b"")  # a periodic save without metrics only counts as recent
        assert c.all_steps() == [2, 5, 6]
    # Reopening the run keeps the same best (metrics are read back from disk).
    with ckpt.Checkpointer(tmp_path, save_every=1, keep=2, best_metric="ap50", async_save=False) as c:
        c.save(7, state, b"", metrics={"ap50": 0.5})
        assert c.all_steps() == [2, 6, 7]


def test_keep_best_min_mode(tmp_path, mesh8):
    state = _state(mesh8)
    with ckpt.Checkpointer(tmp_path, save_every=1, keep=1, best_metric="loss", best_mode="min",
                           keep_best=2, async_save=False) as c:
        for step, loss in {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0}.items():
            c.save(step, state, b"", metrics={"loss": loss})
        assert c.all_steps() == [2, 3, 4]
        with pytest.raises(KeyError, match="best_metric 'loss'"):
            c.save(5, state, b"", metrics={"ap50": 1.0})


def test_async_save_then_restore_after_wait(tmp_path, mesh8):
    state = _state(mesh8)
    c = ckpt.Checkpointer(tmp_path, save_every=2, async_save=True)
    assert c.save(2, state, b"one")
    assert c.save(4, _state(mesh8, seed=4), b"two")
    c.wait()
    assert c.all_steps() == [2, 4]
    step, restored, data = c.restore_latest(_abstract(state))
    c.close()
    assert (step, data) == (4, b"two")
    _assert_identical(_state(mesh8, seed=4), restored)


def test_restore_onto_different_mesh(tmp_path, mesh8):
    state = _state(mesh8)
    with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as c:
        c.save(1, state, b"")
    mesh = make_mesh({"data": 2, "fsdp": 4})
    targets = {
        "params": {"dense": {"kernel": NamedSharding(mesh, P("fsdp", None)),
                             "bias": NamedSharding(mesh, P(("data", "fsdp")))},
                   "half": NamedSharding(mesh, P(None))},
        "opt_state": {"mu": NamedSharding(mesh, P("fsdp"))},
        "step": NamedSharding(mesh, P()),
        "rng": NamedSharding(mesh, P()),
    }
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, targets)
    with ckpt.Checkpointer(tmp_path, save_every=1) as c:
        step, restored, _ = c.restore_latest(abstract)
    assert step == 1
    _assert_identical(state, restored)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(targets)):
        assert leaf.sharding == sharding
    kernel = restored["params"]["dense"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 4)}  # 16 rows over fsdp=4


def test_incomplete_or_damaged_latest_step_is_skipped(tmp_path, mesh8):
    state = _state(mesh8)
    with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as c:
        c.save(1, state, b"first")
        c.save(2, _state(mesh8, seed=2), b"second")
    root = tmp_path / "checkpoints"
    # A crash mid-save leaves Orbax's temporary folder behind.
    tmp_step = root / "3.orbax-checkpoint-tmp-1700000000000000"
    (tmp_step / "state").mkdir(parents=True)
    (tmp_step / "state" / "partial").write_bytes(b"\0" * 10)
    with ckpt.Checkpointer(tmp_path, save_every=1) as c:
        assert c.all_steps() == [1, 2]
        step, restored, data = c.restore_latest(_abstract(state))
    assert (step, data) == (2, b"second")
    _assert_identical(_state(mesh8, seed=2), restored)
    assert not tmp_step.exists()  # cleaned up when the manager opens
    # A published step whose data file was lost afterwards falls back to the one before.
    (root / "2" / "data" / "process_0_of_1").unlink()
    with ckpt.Checkpointer(tmp_path, save_every=1) as c:
        step, restored, data = c.restore_latest(_abstract(state))
    assert (step, data) == (1, b"first")
    _assert_identical(state, restored)


class _DirLoader:
    """Stand-in for the data loader: its state is files in a directory."""

    def __init__(self, position: int):
        self.position = position

    def save(self, directory):
        (pathlib.Path(directory) / "sub").mkdir(parents=True, exist_ok=True)
        (pathlib.Path(directory) / "sub" / "pos.txt").write_text(str(self.position))
        (pathlib.Path(directory) / "blob.bin").write_bytes(bytes(range(256)))

    def restore(self, directory):
        assert (pathlib.Path(directory) / "blob.bin").read_bytes() == bytes(range(256))
        self.position = int((pathlib.Path(directory) / "sub" / "pos.txt").read_text())


def test_loader_state_through_checkpoint(tmp_path, mesh8):
    state = _state(mesh8)
    with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as c:
        c.save(1, state, ckpt.pack_loader_state(_DirLoader(41)))
        _, _, blob = c.restore_latest(_abstract(state))
    loader = _DirLoader(0)
    ckpt.unpack_loader_state(loader, blob)
    assert loader.position == 41


def test_bad_arguments(tmp_path, mesh8):
    with pytest.raises(ValueError, match="best_mode"):
        ckpt.Checkpointer(tmp_path, best_metric="ap", best_mode="highest")
    with pytest.raises(ValueError, match="save_every"):
        ckpt.Checkpointer(tmp_path, save_every=0)
    with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as c:
        with pytest.raises(TypeError, match="data_state"):
            c.save(1, _state(mesh8), "a string")


def test_export_and_load_params(tmp_path, mesh8):
    params = _state(mesh8)["params"]
    ckpt.export_params(params, tmp_path / "params")
    with pytest.raises(FileExistsError):
        ckpt.export_params(params, tmp_path / "params")
    host = ckpt.load_params(tmp_path / "params")
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    _assert_identical(params, host)
    mesh = make_mesh({"data": 2, "fsdp": 4})
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("fsdp"))), params)
    placed = ckpt.load_params(tmp_path / "params", abstract)
    _assert_identical(params, placed)
    assert placed["half"].sharding == NamedSharding(mesh, P("fsdp"))
    with pytest.raises(FileNotFoundError):
        ckpt.load_params(tmp_path / "missing")


_LOOP = """
import pathlib, sys, time
import jax, jax.numpy as jnp
from glipjax import checkpoint as ckpt

workdir, ready = sys.argv[1], pathlib.Path(sys.argv[2])
state = {"w": jnp.zeros((4,), jnp.float32), "step": jnp.int32(0)}
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
c = ckpt.Checkpointer(workdir, save_every=1000)
start = 0
restored = c.restore_latest(abstract)
if restored is not None:
    start, state, data = restored
    assert data == str(start).encode(), data
    print("resumed", start, float(state["w"][0]), flush=True)
with ckpt.stop_on_signals():
    for step in range(start + 1, start + 100000):
        state = {"w": state["w"] + 1.0, "step": state["step"] + 1}
        if step == start + 3:
            ready.write_text("ok")
        if ckpt.stop_requested(step):
            c.save(step, state, str(step).encode(), force=True)
            c.wait()
            print("stopped", step, ckpt.stop_reason(), flush=True)
            break
        time.sleep(0.01)
c.close()
"""


def _run_until_signal(args, env, ready, signum, what):
    """Starts the loop script, sends `signum` once it is ready, returns its stdout."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{what} never started"
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


@pytest.mark.parametrize("signum, reason", [(signal.SIGTERM, "preempted"), (signal.SIGINT, "interrupted")])
def test_signal_saves_and_rerun_resumes(tmp_path, signum, reason):
    script = tmp_path / "loop.py"
    script.write_text(_LOOP)
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    ready = tmp_path / "ready"
    args = [sys.executable, str(script), str(tmp_path / "run"), str(ready)]
    out = _run_until_signal(args, env, ready, signum, "the loop")
    saved, said = out.split("stopped")[1].split()[:2]
    saved = int(saved)
    assert saved >= 3 and said == reason
    ready.unlink()
    out = _run_until_signal(args, env, ready, signum, "the resumed loop")
    assert f"resumed {saved} {float(saved)}" in out
    assert int(out.split("stopped")[1].split()[0]) > saved


class _Exited(Exception):
    pass


def test_second_ctrl_c_exits_at_once_and_handlers_come_back(monkeypatch, capsys):
    def exit_now(status):
        raise _Exited(status)

    monkeypatch.setattr(os, "_exit", exit_now)  # the handler's exit, caught instead of ending pytest
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with ckpt.stop_on_signals():
        assert not ckpt.stop_requested(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs in the main thread between bytecodes
        assert ckpt.stop_requested(2) and ckpt.stop_reason() == "interrupted"
        with pytest.raises(_Exited, match="130"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert not ckpt.stop_requested(3)
    assert "Ctrl-C again: stopping now, without saving" in capsys.readouterr().err


def test_mismatched_target_fails_clearly(tmp_path, mesh8):
    """Checked against the saved arrays' metadata before any array is read: the error
    names the differences, and Orbax leaves no failed reads behind."""
    state = _state(mesh8)
    with ckpt.Checkpointer(tmp_path, save_every=1, async_save=False) as c:
        c.save(1, state, b"")
        c.save(2, state, b"")
        wrong = _abstract(state)
        wrong["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct(
            (5, 4), jnp.float32, sharding=NamedSharding(mesh8, P()))
        wrong["opt_state"]["nu"] = wrong["opt_state"]["mu"]
        del wrong["params"]["half"]
        with pytest.raises(ckpt.StateMismatch) as raised:
            c.restore_latest(wrong)
    message = str(raised.value)
    assert "checkpoint step 2 in" in message
    assert "1 missing (e.g. opt_state/nu)" in message
    assert "1 unexpected (e.g. params/half)" in message
    assert "1 of another shape (params/dense/kernel (16, 4) vs (5, 4) expected)" in message


_HOSTS = """
import json, sys
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
port, pid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if count > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", count, pid)
from glipjax import checkpoint as ckpt
from glipjax.sharding import make_mesh
sharding = NamedSharding(make_mesh({"fsdp": jax.device_count()}), P("fsdp"))
values = np.arange(8, dtype=np.float32)
abstract = {"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=sharding)}
with ckpt.Checkpointer(%(workdir)r, save_every=1) as c:
    if count > 1:  # each process saves its own data state, of its own length
        c.save(1, {"w": jax.make_array_from_callback((8,), sharding, lambda i: values[i])},
               f"process {pid};".encode() * (pid + 2))
        c.wait()
    step, state, data = c.restore_latest(abstract)
local = [np.asarray(s.data).tolist() for s in state["w"].addressable_shards]
print(json.dumps({"step": step, "local": local, "data": None if data is None else data.decode()}))
"""


def test_each_process_restores_its_own_data_state(tmp_path):
    script = tmp_path / "hosts.py"
    script.write_text(_HOSTS % {"workdir": str(tmp_path / "run")})
    [double] = spawn_workers(script, [2])
    assert [r["data"] for r in double] == ["process 0;" * 2, "process 1;" * 3]
    assert [r["local"] for r in double] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "1" / "data").glob("process_*"))
    assert files == ["process_0_of_2", "process_1_of_2"]
    # One process resumes the params; the data states of two hosts do not fit it.
    [[single]] = spawn_workers(script, [1])
    assert single == {"step": 1, "local": [list(range(8))], "data": None}
