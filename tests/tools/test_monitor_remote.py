"""``monitor_process.py --hosts``: the command on other hosts over ssh, as one attempt with the one here.

- The remote command string, pure: parsed back with ``shlex.split`` and run by ``/bin/sh -c`` (what
  a login shell does with it) it gives exactly the original argv: spaces, quotes, ``$``, backticks,
  ``;``, newlines, empty strings.
- The agent (``monitor_process.py --agent``) on its own, stdin a pipe: the protocol lines and EOF.
- End to end with the real OpenSSH client (/usr/bin/ssh) against an SSH server on 127.0.0.1. No
  OpenSSH sshd can be started here (none installed, no root), so the server is asyncssh (``SERVER``)
  and does what sshd does with a command: runs ``/bin/sh -c STRING`` without a tty, returns its exit
  status, and on disconnect closes the command's stdin without killing it.

The fake job (``JOB``) appends what it received (argv, cwd, a variable) to ``calls.jsonl`` and does
what ``--plan=LOCAL+REMOTE/LOCAL+REMOTE/...`` says for its attempt (the last entry repeats). Which
attempt and part it is comes from its Z2ALL_MONITOR_JOB mark (``PID-ATTEMPT-TOKEN``, ``-hN`` on host
N). Every test asserts that no process carrying its monitor's marks is left, and kills any that is.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.tools.test_monitor_process import _gone
from tests.training.test_loop_real import prepare_corpus
from tests.training.test_train_cli import _tiny_flags
from z2all import monitor_jobs
from z2all.monitor_jobs import RemoteConfig, agent_command, parse_agent_args, ssh_argv
from z2all.training.metrics import read_metrics

MONITOR = REPO_ROOT / "monitor_process.py"
ODD = ["two words", "it's", 'say "hi"', "$HOME", "`id`", "$(id)", "a;b", "x && y", "line1\nline2", "",
       "back\\slash", "*", "~", "!", "-rf", "--out_dir=not this one"]  # fmt: skip
ODD_VALUE = "a b'c\"$d`e`\n"  # sent with --remote_env
pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the mark checks read /proc (Linux)")

PRINT_ARGV = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}))"

JOB = r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
out = Path(flags["out_dir"]).resolve()
mark = os.environ["Z2ALL_MONITOR_JOB"].split("-")
attempt, part = int(mark[1]), "remote" if len(mark) == 4 else "local"
plan = [a.split("+") for a in flags["plan"].split("/")]
action = plan[min(attempt, len(plan)) - 1][part == "remote"]
record = {"attempt": attempt, "part": part, "argv": sys.argv[1:], "cwd": os.getcwd(),
          "var": os.environ.get("Z2ALL_TEST_VAR")}
fd = os.open(out.parent / "calls.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(fd, (json.dumps(record) + "\n").encode())  # one write: the two parts' lines never mix
os.close(fd)
out.mkdir(exist_ok=True)
(out / "config.json").write_text("{}")  # now out_dir holds a run: restarts add --resume
tag = f"{part}-{attempt}"


def beat(step, phase):
    data = {"step": step, "time": time.time(), "phase": phase, "pid": os.getpid()}
    (out / f".hb.{part}").write_text(json.dumps(data))
    os.replace(out / f".hb.{part}", out / "heartbeat.json")


if action == "ok":
    beat(attempt, "step")
    sys.exit(0)
if action == "crash":
    time.sleep(0.5)
    sys.exit(1)
if action == "sigkill":
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
if action == "term":  # waits for SIGTERM, "saves", exits PREEMPTED
    got = []
    signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    (out.parent / f"ready-{tag}").write_text("")
    deadline = time.time() + 30
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # room for a second SIGTERM, which must not come
    (out.parent / f"sigterms-{tag}").write_text(str(len(got)))
    sys.exit(4)
if action == "hang":  # no heartbeat; only SIGKILL ends it and its children, one in a session of its own
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    kids = [subprocess.Popen(sleeper), subprocess.Popen(sleeper, start_new_session=True)]
    (out.parent / f"kids-{tag}.json").write_text(json.dumps([k.pid for k in kids]))
    time.sleep(60)
raise SystemExit(f"unknown action {action}")
"""

SERVER = r"""
import asyncio, os, signal, sys
import asyncssh
PIPE = asyncio.subprocess.PIPE


async def run(process):
    # As sshd: the one command string goes to the login shell, no tty (so no SIGHUP); when the
    # connection closes, the command's stdin is closed and the command is NOT killed.
    if not process.command:
        process.exit(1)
        return
    child = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", process.command, stdin=PIPE, stdout=PIPE, stderr=PIPE)
    await process.redirect(stdin=child.stdin, stdout=child.stdout, stderr=child.stderr)
    rc = await child.wait()
    try:
        if rc < 0:
            process.exit_with_signal(signal.Signals(-rc).name[3:])
        else:
            process.exit(rc)
    except Exception:  # the client is gone
        pass


async def main(folder):
    server = await asyncssh.create_server(
        asyncssh.SSHServer, "127.0.0.1", 0, process_factory=run, encoding=None,
        server_host_keys=[os.path.join(folder, "host_key")],
        authorized_client_keys=os.path.join(folder, "authorized_keys"))
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


def _config(cwd: str, monitor: str, env=()) -> RemoteConfig:
    return RemoteConfig(("node 1",), "ssh", ("Port=2222",), cwd, sys.executable, monitor, tuple(env))


def _marked(prefix: str) -> dict[int, str]:
    """pid -> mark of the live processes whose Z2ALL_MONITOR_JOB starts with ``prefix`` (a zombie's
    environ reads empty)."""
    entry = f"{monitor_jobs.JOB_MARK}=".encode()
    found = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for e in environ:
            if e.startswith(entry) and e[len(entry) :].decode().startswith(prefix):
                found[int(name)] = e[len(entry) :].decode()
    return found


def _none_left(prefix: str, within: float = 10.0, remote_only: bool = False) -> list[int]:
    """[] once no process marked ``prefix...`` (``...-hN`` only: ``remote_only``) is left, waiting up
    to ``within`` s; else kill them and return their pids."""
    deadline = time.monotonic() + within
    while True:
        left = [pid for pid, mark in _marked(prefix).items() if not remote_only or "-h" in mark]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


# ------------------------------------------------------------------------------- the command string
def test_the_remote_string_parses_back_to_exactly_the_argv(tmp_path):
    cwd = str(tmp_path / 'it\'s a "dir" $x')
    cfg = _config(cwd, "/repo/monitor_process.py", [("Z2ALL_TEST_VAR", ODD_VALUE)])
    command = ["torchrun", "train_my_ddp.py", *ODD]
    remote = agent_command(cfg, "123-1-ab", command)
    agent = [
        sys.executable,
        "/repo/monitor_process.py",
        "--agent=123-1-ab",
        f"--agent_env=Z2ALL_TEST_VAR={ODD_VALUE}",
    ]
    assert shlex.split(remote) == ["cd", "--", cwd, "&&", "exec", *agent, "--", *command]
    assert ssh_argv(cfg, "node 1", remote) == ["ssh", "-T", "-o", "BatchMode=yes", "-o", "Port=2222", "--",
                                               "node 1", remote]  # fmt: skip
    assert parse_agent_args(shlex.split(remote)[7:], "m") == (
        "123-1-ab",
        {"Z2ALL_TEST_VAR": ODD_VALUE},
        command,
    )


@pytest.mark.parametrize("shell", ["/bin/sh", "bash", "dash"])
def test_a_login_shell_runs_it_with_exactly_the_argv(tmp_path, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell} here")
    cwd = tmp_path / 'it\'s a "dir" $x `y`'
    cwd.mkdir()
    printer = tmp_path / "print argv.py"
    printer.write_text(PRINT_ARGV)
    remote = agent_command(_config(str(cwd), str(printer), [("V", ODD_VALUE)]), "m", ["job", *ODD])
    res = subprocess.run([shell, "-c", remote], capture_output=True, text=True, timeout=20)  # as sshd does
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"argv": ["--agent=m", f"--agent_env=V={ODD_VALUE}", "--", "job", *ODD],
                                      "cwd": str(cwd)}  # fmt: skip


# ------------------------------------------------------------------------------- the agent on its own
@pytest.fixture
def job(tmp_path) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB)
    return path


def _agent(job: Path, mark: str, plan: str) -> subprocess.Popen:
    argv = [sys.executable, str(MONITOR), f"--agent={mark}", "--", sys.executable, str(job),
            f"--out_dir={job.parent / 'run'}", f"--plan={plan}"]  # fmt: skip
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["term line", "SIGTERM to the agent"])
def test_agent_term_is_one_sigterm_and_the_jobs_code_comes_back(job, how):
    mark = f"{os.getpid()}-1-{how[0]}"  # a local part's mark: the job reads itself as attempt 1, "local"
    agent = _agent(job, mark, "term+term")
    try:
        _wait_for(job.parent / "ready-local-1")
        for _ in range(2):  # a repeated request is the same one
            if how == "term line":
                agent.stdin.write("term\n")
                agent.stdin.flush()
            else:
                agent.send_signal(signal.SIGTERM)
            time.sleep(0.1)
        agent.wait(timeout=20)
        err = agent.stderr.read()
    finally:
        agent.kill()
    assert agent.returncode == 4, err
    assert (job.parent / "sigterms-local-1").read_text() == "1"
    assert "stop request: forwarding SIGTERM to the job" in err
    assert not _none_left(mark)


@pytest.mark.parametrize("how", ["kill line", "EOF"])
def test_agent_kill_or_eof_kills_every_process_of_the_job(job, how):
    """kill: a job that ignores SIGTERM (and its children, one in a session of its own) gets SIGKILL
    after the grace; EOF: a job that takes the SIGTERM exits by itself within it."""
    mark, action = f"{os.getpid()}-1-{how[0]}", "hang" if how == "kill line" else "term"
    agent = _agent(job, mark, f"{action}+{action}")
    try:
        _wait_for(job.parent / ("kids-local-1.json" if action == "hang" else "ready-local-1"))
        if how == "kill line":
            agent.stdin.write("kill\n")
            agent.stdin.flush()
        else:
            agent.stdin.close()  # EOF: the head or its connection is gone
        agent.wait(timeout=30)
        err = agent.stderr.read()
    finally:
        agent.kill()
    if action == "hang":
        assert agent.returncode == 128 + signal.SIGKILL, err
        assert "kill (the monitor): killing the job" in err
        assert all(_gone(pid) for pid in json.loads((job.parent / "kids-local-1.json").read_text()))
    else:
        assert agent.returncode == 4, err  # the job's own code after the kill's SIGTERM
        assert "kill (stdin closed (the monitor or its connection is gone))" in err
    assert not _none_left(mark)


def test_agent_reports_a_signal_death_as_128_plus_n_and_a_missing_program_as_2(job, tmp_path):
    agent = _agent(job, f"{os.getpid()}-1-s", "sigkill+sigkill")
    agent.wait(timeout=20)  # stdin stays open: closing it would be an order to kill
    err = agent.stderr.read()
    assert agent.returncode == 128 + signal.SIGKILL, err
    res = subprocess.run([sys.executable, str(MONITOR), "--agent=m", "--", str(tmp_path / "no such program")],
                         stdin=subprocess.PIPE, capture_output=True, text=True, timeout=20)  # fmt: skip
    assert res.returncode == 2 and "cannot run" in res.stderr


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--hosts=a,,b", "--hosts: not a host name: ''"),
        ("--hosts=a,b c", "--hosts: not a host name: 'b c'"),
        ("--ssh=no-such-ssh-z2all", "--ssh: 'no-such-ssh-z2all' not found"),
        ("--remote_env=Z2ALL_UNSET_VARIABLE", "--remote_env: Z2ALL_UNSET_VARIABLE is not set here"),
    ],
)
def test_bad_remote_flags_are_one_clean_line(tmp_path, flag, message):
    hosts = [] if flag.startswith("--hosts") else ["--hosts=h"]
    res = subprocess.run([sys.executable, str(MONITOR), *hosts, flag, "--", "x", "--out_dir=d"],
                         capture_output=True, text=True, timeout=20, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.splitlines()[-1].startswith(f"monitor_process.py: error: {message}"), res.stderr


# ------------------------------------------------------------------------------- over a real ssh client
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An SSH server on 127.0.0.1 and the --ssh_option flags that reach it with /usr/bin/ssh."""
    asyncssh = pytest.importorskip("asyncssh", reason="asyncssh (the test extras) runs the SSH server here")
    if shutil.which("ssh") is None:
        pytest.skip("no OpenSSH client (ssh) here")
    folder = tmp_path_factory.mktemp("sshd")
    host_key, client_key = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    host_key.write_private_key(str(folder / "host_key"))
    client_key.write_private_key(str(folder / "client_key"))
    os.chmod(folder / "client_key", 0o600)
    client_key.write_public_key(str(folder / "authorized_keys"))
    log = open(folder / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(folder)], stdout=subprocess.PIPE, stderr=log,
                              text=True)  # fmt: skip
    try:
        port = int(server.stdout.readline())
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
        yield [f"--ssh_option={o}" for o in (f"Port={port}", f"IdentityFile={folder / 'client_key'}",
               "IdentitiesOnly=yes", f"UserKnownHostsFile={folder / 'known_hosts'}",
               "StrictHostKeyChecking=yes", "LogLevel=ERROR")]  # fmt: skip
    finally:
        server.kill()
        server.wait()
        log.close()


@pytest.fixture
def work(tmp_path, job) -> Path:
    """The monitor's working directory, hence the remote one: a name the remote shell must get right."""
    path = tmp_path / 'it\'s "the" $dir'
    path.mkdir()
    shutil.move(job, path / "job.py")
    return path


def _head(work: Path, sshd: list[str], plan: str, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, str(MONITOR), "--restart_delay=0", "--hosts=127.0.0.1", *sshd,
           "--remote_env=Z2ALL_TEST_VAR", *flags, "--", sys.executable, str(work / "job.py"), "--out_dir=run",
           f"--plan={plan}", *ODD]  # fmt: skip
    env = {**os.environ, "Z2ALL_TEST_VAR": ODD_VALUE}
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(head: subprocess.Popen, timeout: float = 90) -> str:
    """The head's stderr once it exited; afterwards no process of its attempts may be left."""
    try:
        _, err = head.communicate(timeout=timeout)
    finally:
        head.kill()
        left = _none_left(f"{head.pid}-")
    assert not left, f"processes left behind: {left}\n{err}"
    return err


def _calls(work: Path) -> dict[tuple[int, str], dict]:
    lines = (work / "calls.jsonl").read_text().splitlines()
    return {(c["attempt"], c["part"]): c for c in map(json.loads, lines)}


def test_the_remote_part_gets_the_exact_argv_and_its_failures_restart_every_part(work, sshd):
    head = _head(work, sshd, "term+crash/term+sigkill/ok+ok")
    err = _finish(head)
    assert head.returncode == 0, err
    calls = _calls(work)
    assert sorted(calls) == [(a, p) for a in (1, 2, 3) for p in ("local", "remote")]
    first = calls[1, "local"]["argv"]
    assert first[-len(ODD) :] == ODD and "--resume" not in first
    for (attempt, _), call in calls.items():
        assert call["argv"] == (first if attempt == 1 else [*first, "--resume"])
        assert call["cwd"] == str(work)
    assert calls[1, "remote"]["var"] == ODD_VALUE
    assert "attempt 1 on 127.0.0.1 exited with code 1 (CRASH)" in err
    assert "attempt 2 on 127.0.0.1 exited with code 137 (not a trainer code)" in err  # SIGKILL: a crash
    assert err.count("a part failed (CRASH): ending the others") == 2
    assert (work / "sigterms-local-1").read_text() == "1"  # the local part was ended, not left running
    assert "restart 2 of 10" in err and "attempt 3 finished the run" in err


def test_sigterm_to_the_head_reaches_every_part_once(work, sshd):
    head = _head(work, sshd, "term+term")
    try:
        _wait_for(work / "ready-local-1")
        _wait_for(work / "ready-remote-1")
        head.send_signal(signal.SIGTERM)
    finally:
        err = _finish(head)
    assert head.returncode == 4, err
    assert (work / "sigterms-local-1").read_text() == (work / "sigterms-remote-1").read_text() == "1"
    assert "not restarting: exit status 4" in err and len(_calls(work)) == 2


def test_a_head_killed_by_sigkill_takes_its_remote_job_with_it(work, sshd):
    head = _head(work, sshd, "term+term")
    try:
        _wait_for(work / "ready-local-1")
        _wait_for(work / "ready-remote-1")
        head.kill()  # its ssh client reads EOF on stdin, the channel closes, the agent kills its job
        head.wait(timeout=10)
        remote_left = _none_left(f"{head.pid}-", within=20, remote_only=True)
    finally:
        head.kill()
        local_left = _none_left(f"{head.pid}-", within=0)
    assert not remote_left
    assert (work / "sigterms-remote-1").read_text() == "1"  # SIGTERM first (the kill's grace): it exited
    assert local_left  # the local part outlives a SIGKILLed head (a session of its own), as without --hosts


def test_a_hang_kills_the_remote_processes_too(work, sshd):
    head = _head(work, sshd, "term+hang/ok+ok", "--startup_grace=3")
    err = _finish(head)
    assert head.returncode == 0, err
    assert "attempt 1 hangs: no heartbeat for" in err
    assert all(_gone(pid) for pid in json.loads((work / "kids-remote-1.json").read_text()))
    assert "kill (the monitor): killing the job" in err  # the agent's log, carried over ssh


def test_an_unreachable_host_is_a_crash(work, sshd):
    closed = [f for f in sshd if not f.startswith("--ssh_option=Port=")] + ["--ssh_option=Port=1"]
    head = _head(work, closed, "term+ok", "--crash_loop=1")
    err = _finish(head)
    assert head.returncode == 1, err
    assert "attempt 1 on 127.0.0.1 exited with code 255" in err and "giving up: crash loop" in err


# ------------------------------------------------------------------------------- the real trainer
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_remote_rank(out: Path, head_pid: int, stop: threading.Event, log: list) -> None:
    """Once a heartbeat shows step 4 done, SIGKILL the trainer process of the "remote node" (found by
    its -h1 mark; torchrun's own process is spared: a rank dies, as with an OOM kill)."""
    while not stop.wait(0.05):
        try:
            beat = json.loads((out / "heartbeat.json").read_text())
        except (OSError, ValueError):
            continue
        if beat["phase"] != "step" or beat["step"] < 4:
            continue
        for pid, mark in _marked(f"{head_pid}-1-").items():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if (
                mark.endswith("-h1")
                and b"torch.distributed.run" not in cmdline
                and any(c.endswith(b"train_my_ddp.py") for c in cmdline)
            ):
                os.kill(pid, signal.SIGKILL)
                log.append((beat["step"], pid))
                return


@pytest.mark.slow
def test_the_real_trainer_on_two_nodes_over_ssh_survives_a_killed_remote_rank(text_corpus, tmp_path, sshd):
    """Two "nodes" on 127.0.0.1, one torchrun agent each (c10d rendezvous), the second over ssh; a
    SIGKILLed rank there restarts both with --resume; the run completes every step once, with the
    losses of an uninterrupted 2-rank run on one node, bit for bit."""
    tok, pretok = prepare_corpus(tmp_path, text_corpus, n_chars=66_000)
    out = tmp_path / "run"
    trainer = [str(REPO_ROOT / "train_my_ddp.py"), *_tiny_flags(tok, pretok), "--max_iters=8",
               "--save_interval=2", "--eval_interval=0"]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    torchrun = [*launcher, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_id=z2all-test",
                f"--rdzv_endpoint=127.0.0.1:{_free_port()}", *trainer, f"--out_dir={out}"]  # fmt: skip
    cmd = [sys.executable, str(MONITOR), "--restart_delay=0.5", "--hosts=127.0.0.1", *sshd, "--", *torchrun]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    stop, log = threading.Event(), []
    saboteur = threading.Thread(target=_kill_remote_rank, args=(out, head.pid, stop, log), daemon=True)
    saboteur.start()
    try:
        err = _finish(head, timeout=240)
    finally:
        stop.set()
    assert head.returncode == 0, err[-4000:]
    assert len(log) == 1, err[-4000:]
    assert "attempt 1 on 127.0.0.1 exited with code 1 (CRASH)" in err and "restart 1 of 10" in err
    recs = read_metrics(out)
    assert [x["step"] for x in recs] == list(range(1, 9))  # each step once: redone lines replaced
    one_node = [*launcher, "--standalone", "--nproc_per_node=2", *trainer, f"--out_dir={tmp_path / 'one'}"]
    one_node = subprocess.run(one_node, capture_output=True, text=True, timeout=240, env=env, cwd=REPO_ROOT)
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    assert [x["loss"] for x in recs] == [x["loss"] for x in read_metrics(tmp_path / "one")]  # bit for bit
