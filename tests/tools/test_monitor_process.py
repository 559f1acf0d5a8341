"""``monitor_process.py`` against tiny fake jobs: what it restarts, what it never restarts, hangs,
signals, and the command line it passes on. No training runs here.

The fake job (``JOB``) appends its argv to ``<run>.calls.jsonl`` and does what the ``--plan=`` entry
for its call number says (the last entry repeats), writing ``heartbeat.json`` / ``exit_code.json``
the way the trainer does (z2all/training/heartbeat.py). Every process a test starts carries
``MONITOR_TEST=<token>`` in its environment; the autouse fixture fails the test if any of them
outlives it, and kills them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import monitor_process
from tests.conftest import REPO_ROOT

MONITOR = REPO_ROOT / "monitor_process.py"

JOB = r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
out, plan = Path(flags["out_dir"]), flags["plan"].split(",")
calls = out.parent / (out.name + ".calls.jsonl")
with open(calls, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
n = len(calls.read_text().splitlines())
action = plan[min(n, len(plan)) - 1]


def write(name, data):  # temp file + rename, as the trainer writes them
    (out / ("." + name)).write_text(json.dumps(data))
    os.replace(out / ("." + name), out / name)


def beat(step, phase):
    write("heartbeat.json", {"step": step, "time": time.time(), "phase": phase, "pid": os.getpid()})


if action == "startfail":  # dies before it has built anything
    sys.exit(1)
out.mkdir(exist_ok=True)
(out / "config.json").write_text("{}")  # now out_dir holds a run
if action == "preempt":  # saved and stopped before completing a new step
    beat(0, "startup")
    sys.exit(4)
if action == "timeup":  # a step, then --exit_after_minutes: saved, and the allocation's time is up
    beat(n, "step")
    write("exit_code.json", {"code": 4, "rank": 0, "time": time.time(), "reason": "exit_after_minutes"})
    sys.exit(4)
if action != "hang":
    beat(n, "step")  # call n completes step n: each call is progress
if action in ("ok", "crash", "exit2", "exit3"):
    sys.exit({"ok": 0, "crash": 1, "exit2": 2, "exit3": 3}[action])
if action.startswith("torchrun"):  # rank 0 records its code, the agent exits 1
    write("exit_code.json", {"code": int(action[-1]), "rank": 0, "time": time.time()})
    sys.exit(1)
if action == "hang":
    beat(n, "startup")  # longer than --heartbeat_timeout in start-up is fine: --startup_grace
    time.sleep(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited: only SIGKILL ends them
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    kids = [subprocess.Popen(sleeper), subprocess.Popen(sleeper, start_new_session=True)]
    (out.parent / "kids.json").write_text(json.dumps([k.pid for k in kids]))
    beat(n + 1, "step")
    time.sleep(60)
if action == "term":  # waits for SIGTERM, "saves", exits PREEMPTED (itself, or via exit_code.json)
    got = []
    signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    (out.parent / "ready").write_text("")
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # room for a second SIGTERM, which must not come
    (out.parent / "sigterms").write_text(str(len(got)))
    if flags.get("like_torchrun"):
        write("exit_code.json", {"code": 4, "rank": 0, "time": time.time()})
        sys.exit(1)
    sys.exit(4)
raise SystemExit(f"unknown action {action}")
"""


@pytest.fixture
def mark(monkeypatch):
    """The environment mark of this test's processes; none may be left at the end."""
    token = secrets.token_hex(6)
    monkeypatch.setenv("MONITOR_TEST", token)
    yield token
    left = _marked(f"MONITOR_TEST={token}")
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind: {left}"


def _marked(entry: str) -> list[int]:
    if not os.path.isdir("/proc"):
        return []
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if entry.encode() in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                pids.append(int(name))
        except OSError:
            pass
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"  # exited; only its parent has not collected it yet


@pytest.fixture
def job(tmp_path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB)
    return path


def _command(job: Path, plan: str, *extra: str) -> list[str]:
    return [sys.executable, str(job), f"--out_dir={job.parent / 'run'}", f"--plan={plan}", *extra]


def _monitor(job: Path, plan: str, *flags: str, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(MONITOR), "--restart_delay=0", *flags, "--", *_command(job, plan, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=40)


def _calls(job: Path) -> list[list[str]]:
    path = job.parent / "run.calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_crash_is_restarted_once_with_resume_added(job, mark):
    run = job.parent / "run"
    run.mkdir()  # an earlier attempt's deliberate exit, from before this monitor started: not ours
    (run / "exit_code.json").write_text(json.dumps({"code": 2, "rank": 0, "time": 0.0}))
    res = _monitor(job, "crash,ok")
    assert res.returncode == 0, res.stderr
    first, second = _calls(job)
    assert "--resume" not in first and second == [*first, "--resume"]
    log = (run / "monitor.log").read_text()
    for event in ("attempt 1 started", "exited with code 1 (CRASH)", "restart 1 of 10", "finished the run"):
        assert event in res.stderr and event in log
    assert re.search(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d monitor INFO\] attempt 1 started", log, re.M)


def test_resume_is_added_once(job, mark):
    res = _monitor(job, "crash,crash,ok", "--crash_loop=5")
    assert res.returncode == 0, res.stderr
    assert [c.count("--resume") for c in _calls(job)] == [0, 1, 1]


def test_resume_already_asked_for_is_not_repeated(job, mark):
    res = _monitor(job, "crash,ok", extra=["--resume=yes"])
    assert res.returncode == 0, res.stderr
    assert [c.count("--resume=yes") + c.count("--resume") for c in _calls(job)] == [1, 1]


@pytest.mark.parametrize("plan, code", [("exit2", 2), ("exit3", 3), ("torchrun2", 2), ("torchrun3", 3)])
def test_user_errors_and_nonfinite_stops_are_never_restarted(job, mark, plan, code):
    res = _monitor(job, plan)
    assert res.returncode == code, res.stderr
    assert len(_calls(job)) == 1
    assert "not restarting" in res.stderr
    if plan.startswith("torchrun"):
        assert f"rank 0 recorded exit code {code} in exit_code.json" in res.stderr


def test_a_preemption_is_resumed_without_counting_as_a_crash(job, mark):
    res = _monitor(job, "preempt,preempt,preempt,ok", "--max_restarts=0", "--crash_loop=1")
    assert res.returncode == 0, res.stderr
    calls = _calls(job)
    assert len(calls) == 4 and [c.count("--resume") for c in calls] == [0, 1, 1, 1]
    assert res.stderr.count("not counted as a crash") == 3


def test_exit_after_minutes_is_not_resumed_within_the_allocation(job, mark):
    res = _monitor(job, "timeup,ok")
    assert res.returncode == 4 and len(_calls(job)) == 1
    assert "not resuming (--exit_after_minutes: time is up here)" in res.stderr


def test_preemptions_without_progress_do_not_loop_forever(job, mark):
    res = _monitor(job, ",".join(["preempt"] * 12), "--max_restarts=0")
    assert res.returncode == 4 and len(_calls(job)) == 10
    assert "not resuming (10 stops in a row without a new step)" in res.stderr


def test_a_crash_loop_stops_with_the_message(job, mark):
    res = _monitor(job, "startfail", "--crash_loop=3")
    assert res.returncode == 1
    assert len(_calls(job)) == 3
    assert "giving up: crash loop, 3 failures in a row without a new completed step" in res.stderr


def test_max_restarts_bounds_crashes_that_make_progress(job, mark):
    res = _monitor(job, "crash", "--max_restarts=2")
    assert res.returncode == 1
    assert len(_calls(job)) == 3 and "giving up after 2 restarts" in res.stderr


def test_a_hang_kills_the_whole_job_and_restarts(job, mark):
    res = _monitor(job, "hang,ok", "--heartbeat_timeout=2", "--startup_grace=30")
    assert res.returncode == 0, res.stderr
    assert len(_calls(job)) == 2
    (hang,) = re.findall(r"attempt 1 hangs: no heartbeat for ([\d.]+) s \(last: phase 'step'", res.stderr)
    assert 2 < float(hang) < 4  # --heartbeat_timeout, plus at most one poll (0.5 s) and some slack
    kids = json.loads((job.parent / "kids.json").read_text())  # one in the group, one in its own session
    assert all(_gone(pid) for pid in kids)
    assert "restart 1 of 10" in res.stderr


@pytest.mark.parametrize(
    "sig, like_torchrun", [(signal.SIGTERM, True), (signal.SIGINT, False)], ids=["SIGTERM-torchrun", "SIGINT"]
)
def test_a_signal_to_the_monitor_is_forwarded_once_and_not_restarted(job, mark, sig, like_torchrun):
    extra = ["--like_torchrun=1"] if like_torchrun else []
    cmd = [sys.executable, str(MONITOR), "--", *_command(job, "term", *extra)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (job.parent / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 4, err  # the job's code: it saved
    assert (job.parent / "sigterms").read_text() == "1"
    assert len(_calls(job)) == 1
    assert f"{sig.name} received: forwarding SIGTERM to the job" in err
    assert "stopped on" in err and "not restarting: exit status 4" in err


def test_arguments_with_spaces_and_quotes_pass_through_unchanged(job, mark):
    odd = ["two words", '--note=it\'s "quoted"; $HOME *', "", "back\\slash"]
    res = _monitor(job, "ok", extra=odd)
    assert res.returncode == 0, res.stderr
    assert _calls(job)[0][-len(odd) :] == odd


@pytest.mark.parametrize(
    "flags, command, message",
    [
        ([], [sys.executable, "-c", "pass"], "the command names no run folder"),
        ([], [], "no command to run"),
        (["--heartbeat_timeout=0"], ["x", "--out_dir=d"], "--heartbeat_timeout must be >= 1"),
        ([], ["x", "train.py", "missing.json"], "config file missing.json: No such file"),
        ([], ["no-such-program-z2all", "--out_dir=d"], "cannot run 'no-such-program-z2all'"),
    ],
)
def test_bad_input_is_one_clean_line(tmp_path, mark, flags, command, message):
    res = subprocess.run(
        [sys.executable, str(MONITOR), *flags, "--", *command],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert res.stderr.splitlines()[-1].startswith(f"monitor_process.py: error: {message}"), res.stderr
    assert "Traceback" not in res.stderr


def test_out_dir_comes_from_the_flag_else_the_json_config(tmp_path):
    find = monitor_process.find_out_dir
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"out_dir": "runs/from_json"}))
    torchrun = ["torchrun", "--nproc_per_node=2", "train_my_ddp.py", str(cfg)]
    assert find(torchrun) == Path("runs/from_json")
    assert find([*torchrun, "--out_dir=runs/flag"]) == Path("runs/flag")
    assert find(["python", "t.py", "--out_dir", "a b", "--out-dir=c"]) == Path("c")  # the last one wins
    cfg.write_text(json.dumps({"max_iters": 3}))
    with pytest.raises(ValueError, match='has no "out_dir"'):
        find(torchrun)


def test_restart_delay_doubles_and_is_capped():
    delays = [monitor_process.restart_delay(10, n) for n in range(7)]
    assert delays == [10, 10, 20, 40, 80, 160, 300]
    assert monitor_process.restart_delay(600, 3) == 600  # a longer base is not cut
