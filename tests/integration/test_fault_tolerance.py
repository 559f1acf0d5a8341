"""Failures under monitor_process.py with the real launcher (torchrun, 2 gloo ranks): the run survives
and its metrics.jsonl losses equal an uninterrupted run's, bit for bit.

- SIGKILL of a rank, twice in one run: torchrun fails, the monitor restarts with --resume from the
  newest checkpoint; the steps after it are redone (and their lines replaced), identically.
- SIGSTOP of a rank: no process dies and no collective fails; the heartbeat goes stale, the monitor
  kills every process of the attempt within --heartbeat_timeout and restarts.
- SIGTERM to a rank, and to the torchrun agent (which passes it on to every rank): a checkpoint at the
  step reached, exit code 4, resumed by the monitor without counting a crash and without computing
  any step twice.
Bounded in time (every wait has a deadline) and cleaned up (the monitor kills its job on failure).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.training.test_loop_real import prepare_corpus
from tests.training.test_train_cli import _tiny_flags
from z2all.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 12


def _flags(tok, pretok, out_dir) -> list[str]:
    return [*_tiny_flags(tok, pretok), f"--max_iters={STEPS}", "--save_interval=2", "--eval_interval=0",
            f"--out_dir={out_dir}"]  # fmt: skip


def _torchrun(*flags) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "train_my_ddp.py"), *flags]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _beat(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return None


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _saboteur(out_dir: Path, plan: list[tuple], log: list, stop: threading.Event) -> None:
    """For each (step, signal[, "agent"]): once a heartbeat shows that step done, send the signal to
    the rank that wrote it (rank 0), or to its parent, the torchrun agent. Each time the signal goes to
    a new attempt's process."""
    seen_pids = set()
    for step, sig, *to in plan:
        while not stop.is_set():
            beat = _beat(out_dir)
            if beat and beat["phase"] == "step" and beat["step"] >= step and beat["pid"] not in seen_pids:
                os.kill(_parent(beat["pid"]) if to == ["agent"] else beat["pid"], sig)
                seen_pids.add(beat["pid"])
                log.append((beat["step"], sig, time.time()))
                break
            time.sleep(0.02)


def _monitored(tmp_path, name, plan, *monitor_flags, timeout=300):
    tok, pretok = tmp_path / "tok", tmp_path / "pretok"
    out = tmp_path / name
    log, stop = [], threading.Event()
    t = threading.Thread(target=_saboteur, args=(out, plan, log, stop), daemon=True)
    t.start()
    cmd = [sys.executable, str(REPO / "monitor_process.py"), "--restart_delay=0.5", *monitor_flags, "--",
           *_torchrun(*_flags(tok, pretok, out))]  # fmt: skip
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    finally:
        stop.set()
    return r, out, log


@pytest.fixture(scope="module")
def reference(text_corpus, tmp_path_factory):
    """The corpus and the uninterrupted run's losses."""
    root = tmp_path_factory.mktemp("ft")
    tok, pretok = prepare_corpus(root, text_corpus, n_chars=66_000)
    assert (tok, pretok) == (root / "tok", root / "pretok")
    out = root / "uninterrupted"
    r = subprocess.run(_torchrun(*_flags(tok, pretok, out)), capture_output=True, text=True, timeout=300,
                       env=_env(), cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return root, [x["loss"] for x in read_metrics(out)]


@pytest.mark.slow
def test_sigkill_of_a_rank_twice_under_the_monitor_continues_the_exact_loss_curve(reference):
    root, losses = reference
    r, out, log = _monitored(root, "killed", [(5, signal.SIGKILL), (9, signal.SIGKILL)])
    assert r.returncode == 0, r.stderr[-4000:]
    assert [s for _, s, _ in log] == [signal.SIGKILL, signal.SIGKILL], log
    assert r.stderr.count("restart ") == 2, r.stderr[-4000:]
    recs = read_metrics(out)
    assert [x["step"] for x in recs] == list(range(1, STEPS + 1))  # each step once: redone lines replaced
    assert [x["loss"] for x in recs] == losses  # bit for bit


@pytest.mark.slow
def test_a_stopped_rank_is_detected_as_a_hang_and_the_run_recovers(reference):
    root, losses = reference
    r, out, log = _monitored(root, "stopped", [(5, signal.SIGSTOP)], "--heartbeat_timeout=10")
    assert r.returncode == 0, r.stderr[-4000:]
    hang = [line for line in r.stderr.splitlines() if "hangs: no heartbeat for" in line]
    assert len(hang) == 1, r.stderr[-4000:]
    waited = float(hang[0].split("no heartbeat for ")[1].split(" s")[0])
    assert 10 <= waited <= 14, hang  # detected within --heartbeat_timeout (+ the monitor's poll)
    assert [x["loss"] for x in read_metrics(out)] == losses


def _preempted_then_resumed(reference, name, plan):
    root, losses = reference
    r, out, log = _monitored(root, name, plan)
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(log) == 1, log
    assert r.stderr.count("saved and stopped: resuming it, not counted as a crash") == 1, r.stderr[-4000:]
    assert "restart " not in r.stderr, r.stderr[-4000:]
    # no step computed twice: the first attempt stopped right after its checkpoint, so the resumed one
    # found no metrics.jsonl line after it to drop
    assert "dropped" not in r.stderr, r.stderr[-4000:]
    recs = read_metrics(out)
    assert [x["step"] for x in recs] == list(range(1, STEPS + 1))
    assert [x["loss"] for x in recs] == losses  # bit for bit
    return r


@pytest.mark.slow
def test_sigterm_to_a_rank_saves_where_it_was_and_resumes_exactly(reference):
    _preempted_then_resumed(reference, "term_rank", [(5, signal.SIGTERM)])


@pytest.mark.slow
def test_sigterm_to_the_torchrun_agent_saves_where_it_was_and_resumes_exactly(reference):
    _preempted_then_resumed(reference, "term_agent", [(5, signal.SIGTERM, "agent")])
