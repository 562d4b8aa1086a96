"""Shared test set-up: 8 fake CPU devices and XLA's cheaper CPU compilation for the
test processes (set before jax is imported anywhere), and `child_env` for the
processes they start: the same cheaper compilation on one CPU device."""

import os

# XLA's cheaper CPU compilation: the suite compiles many small programs and runs each a
# few times. Most of what is left is XLA:CPU's MLIR fusion emitters: without them the
# tiny GLIP's training step compiled in 9.1 s against 13.8 s, and the suite took 8.7
# minutes against 12.3 on two cores.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
# Child processes (training runs, commands) use one device: an 8-way partitioned
# program on the same two cores compiles and runs slower, and they test no sharding.
# (pytest-xdist's workers inherit the flags below: drop what is already there.)
_USER_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if f not in FAST_COMPILE_FLAGS.split() and not f.startswith("--xla_force_host_platform_device_count")]
CHILD_XLA_FLAGS = " ".join([*_USER_FLAGS, FAST_COMPILE_FLAGS])
os.environ["XLA_FLAGS"] = CHILD_XLA_FLAGS + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO.parent / "shared" / "golden"


# The training runs of the tests that need no pretrained text encoder: the tiny GLIP
# with a random BERT for this many steps. Sharing the settings that shape the step
# (model, batch, steps: the schedule's boundaries are constants of the program) lets
# the session's compilation cache turn every run's compile after the first into a load.
TRAIN_STEPS = 6
SMALL_TRAIN = ("--config.model.text_encoder=", "--config.model.text_layers=0", "--config.model.fusion_embed_dim=64",
               f"--config.train.steps={TRAIN_STEPS}")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: this one's, on one CPU device, plus `extra`."""
    return dict(os.environ, XLA_FLAGS=CHILD_XLA_FLAGS, **extra)


def train_in_child(config: str, workdir: pathlib.Path, *overrides: str, timeout: float = 900) -> list[dict]:
    """`python -m glipjax.train` in a child process (child_env); asserts it succeeds
    and returns the records of its metrics.jsonl."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "glipjax.train", "--config", config, "--workdir", str(workdir), *overrides]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def spawn_workers(script: pathlib.Path, counts: list[int], timeout: float = 900) -> list[list[dict]]:
    """Runs `script` as jax.distributed jobs on 127.0.0.1, one job of n processes per n
    in `counts`, all at once. Each process gets argv (port, process id, process count)
    and must print one JSON line last; returns those, per job in process order."""
    import json
    import socket
    import subprocess
    import sys

    env = child_env(PYTHONPATH=str(REPO))
    jobs = []
    for count in counts:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        jobs.append([subprocess.Popen([sys.executable, str(script), port, str(p), str(count)], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for p in range(count)])
    results = []
    for job in jobs:
        outputs = []
        for worker in job:
            out, err = worker.communicate(timeout=timeout)
            assert worker.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
        results.append(outputs)
    return results


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


def golden_cases() -> list[pathlib.Path]:
    """Case folders of ../shared/golden holding golden_*.npz (discovered, never named)."""
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(p for p in GOLDEN_DIR.iterdir() if p.is_dir() and any(p.glob("golden_*.npz")))


def golden_npz_files() -> list[pathlib.Path]:
    return [f for case in golden_cases() for f in sorted(case.glob("golden_*.npz"))]


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    """../shared/golden next to the repository (CI lays it beside the clone)."""
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden_files() -> list[pathlib.Path]:
    """Every golden_*.npz of every case; a missing golden folder fails the test."""
    files = golden_npz_files()
    assert files, f"no golden_*.npz files under {GOLDEN_DIR}"
    return files


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding slow tests first (a stable sort): pytest-xdist with --dist
    loadfile --no-loadscope-reorder hands out whole files in this order (its default
    reorders them by test count), so the longest start early instead of leaving one
    worker busy alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def session_root(tmp_path_factory, worker_id: str) -> pathlib.Path:
    """The temp folder of the whole test session (shared by pytest-xdist's workers)."""
    root = tmp_path_factory.getbasetemp()
    return root if worker_id == "master" else root.parent  # xdist: each worker's is inside it


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory, worker_id) -> pathlib.Path:
    """One persistent XLA compilation cache for the session's processes, children
    included, in its temp folder (never the user's): a program compiled once, such as
    the tiny demo's training step, is loaded from it afterwards."""
    import jax

    folder = session_root(tmp_path_factory, worker_id) / "xla_cache"
    folder.mkdir(exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    # Children also cache their quick compiles (evaluation's small programs). This
    # process keeps jax's default: jax read the variable when it was imported.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id) -> pathlib.Path:
    """A training workdir of the demo's tiny GLIP with SMALL_TRAIN's settings (its step
    is the one the other training tests compile), without evaluation: config.json and
    checkpoints/<TRAIN_STEPS>. Trained in a child process (its memory, TensorFlow
    included, is returned when it ends) with XLA's cheaper CPU compilation, once per
    test session: under pytest-xdist the first worker that asks builds it in the
    session's shared temp folder while the others wait on a file lock."""
    import shutil

    from filelock import FileLock

    root = session_root(tmp_path_factory, worker_id)
    workdir, done = root / "tiny_run", root / "tiny_run.done"
    with FileLock(str(root / "tiny_run.lock")):
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a failed earlier attempt
            train_in_child("configs/demo.py:tiny", workdir, *SMALL_TRAIN, "--config.eval.splits=()",
                           "--config.checkpoint.save_every=100", timeout=1800)
            done.touch()
    return workdir


@pytest.fixture(scope="session")
def detecting_run(tiny_run, tmp_path_factory) -> pathlib.Path:
    """tiny_run's params with the head's bias0 raised from its prior (-4.6) to -1, so
    the barely trained head scores above the 0.05 candidate threshold and every image
    gets detections: a workdir with config.json and checkpoints/<TRAIN_STEPS> holding the params."""
    import shutil

    import numpy as np

    from glipjax import checkpoint
    from glipjax.runs import load_run

    run = load_run(tiny_run)
    params = {k: dict(v) if isinstance(v, dict) else v for k, v in run.params.items()}
    params["head"]["bias0"] = np.full(run.params["head"]["bias0"].shape, -1.0, np.float32)
    workdir = tmp_path_factory.mktemp("detecting_run")
    shutil.copy(tiny_run / "config.json", workdir)
    with checkpoint.Checkpointer(workdir, save_every=1, keep=1) as ckpt:
        ckpt.save(run.step, {"params": params, "ema": {}}, b"", force=True)
    return workdir
