"""Shared test set-up: 8 fake CPU devices (set before jax is imported anywhere)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO.parent / "shared" / "golden"


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> pathlib.Path:
    """A training workdir of the demo's tiny GLIP trained for 2 steps (no evaluation):
    config.json and checkpoints/2. About two minutes on two CPU cores, once per session."""
    from configs.demo import get_config
    from glipjax.config import apply_override
    from glipjax.train import train

    config = get_config("tiny")
    apply_override(config, "train.steps", "2")
    apply_override(config, "eval.splits", "()")
    workdir = tmp_path_factory.mktemp("tiny_run")
    train(config, workdir)
    return workdir
