"""The parts of one ``monitor_process.py`` attempt, and how each one is ended (docs/fault_tolerance.md,
"Multi-node: remote mode"). Standard library only and no other z2all import: the watchdog imports
none of the training code (STYLE.md, "Layers").

    LocalJob    the command here, in a session of its own: its processes are its process group and
                every process whose environment holds JOB_MARK=<mark> (torchrun starts each rank in a
                session of its own), found in /proc and killed all together
    RemoteJob   the command on another host: ``ssh -T -o BatchMode=yes ... -- HOST 'cd -- DIR &&
                exec PYTHON .../monitor_process.py --agent=MARK -- COMMAND'``; the agent runs it there
                as a LocalJob
    run_agent   that agent: it takes the head monitor's orders from its stdin, the ssh channel

Why an agent: killing the local ssh client does not end the remote command (sshd sends no SIGHUP to
a command without a tty), and sshd does not kill the command when the connection closes; it only
closes the command's stdin. So the remote side watches its stdin and ends its job itself.

The protocol, head -> agent, one line each on the agent's stdin:

    term     a stop request: SIGTERM once to the job's process group (the trainer saves and exits 4);
             SIGTERM or SIGINT to the agent itself means the same; a repeated request is the same one
    kill     SIGTERM to every process of the job, SIGKILL to what is left TERM_GRACE_S later
    EOF      the same as kill: the head closed the channel or died, or the connection broke (SIGHUP too)

agent -> head: the agent's exit status, which ssh exits with: the job's code; 128 + N when signal N
killed the job; USER_ERROR when the command cannot be started there; STUCK when processes of the job
outlived SIGKILL (the head then gives up, as it does for its own); ssh itself exits 255 on its errors.

Quoting: ssh joins its remote arguments into ONE string that the remote login shell parses (it runs
``$SHELL -c STRING``), so that string is built from ``shlex.quote``'d arguments and nothing else. It
needs a POSIX login shell there (sh, bash, dash, zsh; not csh).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

JOB_MARK = "Z2ALL_MONITOR_JOB"
USER_ERROR = 2  # the trainer's code for "a person must act" (mirrored: see monitor_process.py)
STUCK = 125  # an agent's exit status when processes of its job outlived SIGKILL there

POLL_S = 0.5  # how often the agent looks at its job and its stdin
TERM_GRACE_S = 5.0  # between SIGTERM and SIGKILL when a job is killed
KILL_WAIT_S = 60.0  # processes still there this long after SIGKILL: give up rather than start over them
SSH_WAIT_S = TERM_GRACE_S + KILL_WAIT_S + 10.0  # an agent ends its job within this after "kill"

logger = logging.getLogger("monitor_process")


class StuckProcesses(Exception):
    """Processes of an attempt outlived SIGKILL (uninterruptible, or zombies nobody reaps)."""


class CannotStartError(Exception):
    """The command cannot be executed at all (not found, not executable): a user error."""


@dataclass(frozen=True)
class RemoteConfig:
    """Where and how the command also runs on other hosts (monitor_process.py's remote flags)."""

    hosts: tuple[str, ...]  # the other hosts, each reached with ``ssh HOST``
    ssh: str  # the ssh client program
    options: tuple[str, ...]  # each passed to ssh as ``-o OPTION``, after BatchMode=yes
    cwd: str  # the directory the command runs in there
    python: str  # the Python there that runs the agent
    monitor: str  # the path of monitor_process.py there
    env: tuple[tuple[str, str], ...] = ()  # (NAME, value) set in the job's environment there


def add_remote_flags(parser: argparse.ArgumentParser) -> None:
    """monitor_process.py's flags for RemoteConfig."""
    group = parser.add_argument_group("remote mode (docs/fault_tolerance.md, 'Multi-node: remote mode')")
    group.add_argument("--hosts", default="", help="run the command on these hosts too (comma-separated), "
                       "over ssh, as one attempt with the one here")  # fmt: skip
    group.add_argument("--ssh", default="ssh", help="the ssh client (default: ssh)")
    group.add_argument("--ssh_option", action="append", default=[], metavar="OPTION",
                       help="passed to ssh as -o OPTION (repeatable), e.g. Port=2222")  # fmt: skip
    group.add_argument("--remote_cwd", default=os.getcwd(), help="the directory there (default: this one)")
    group.add_argument("--remote_python", default=sys.executable, help="the Python there (default: this one)")
    group.add_argument("--remote_env", default="", metavar="NAMES",
                       help="comma-separated variables whose values here are set there too")  # fmt: skip


def remote_config(flags: dict, monitor: str) -> RemoteConfig | None:
    """The flags of add_remote_flags checked (ValueError naming the flag); None without --hosts."""
    if not flags["hosts"]:
        return None
    hosts, names = flags["hosts"].split(","), [n for n in flags["remote_env"].split(",") if n]
    bad = [h for h in hosts if not h or any(c.isspace() for c in h)]
    if bad:
        raise ValueError(f"--hosts: not a host name: {bad[0]!r} (give --hosts=H1,H2)")
    if shutil.which(flags["ssh"]) is None:
        raise ValueError(f"--ssh: {flags['ssh']!r} not found")
    unset = [n for n in names if n not in os.environ]
    if unset:
        raise ValueError(f"--remote_env: {unset[0]} is not set here")
    env = tuple((n, os.environ[n]) for n in names)
    options = tuple(flags["ssh_option"])
    return RemoteConfig(
        tuple(hosts), flags["ssh"], options, flags["remote_cwd"], flags["remote_python"], monitor, env
    )


def agent_command(remote: RemoteConfig, mark: str, command: list[str]) -> str:
    """The one shell string the remote login shell runs: every piece is a quoted argument."""
    agent = [remote.python, remote.monitor, f"--agent={mark}"]
    agent += [f"--agent_env={name}={value}" for name, value in remote.env]
    return f"cd -- {shlex.quote(remote.cwd)} && exec {shlex.join([*agent, '--', *command])}"


def ssh_argv(remote: RemoteConfig, host: str, remote_command: str) -> list[str]:
    """The local argument list: ``--`` ends ssh's options, so no host name can be taken for one.
    BatchMode=yes comes first (ssh keeps the first value of an option): never a password prompt."""
    options = [word for option in ("BatchMode=yes", *remote.options) for word in ("-o", option)]
    return [remote.ssh, "-T", *options, "--", host, remote_command]


class LocalJob:
    """A command run here in a session of its own, its processes marked with ``JOB_MARK=mark``."""

    def __init__(self, argv: list[str], mark: str, where: str = "", stdin=None, env=None):
        self.mark = mark
        self.where = where  # how messages name this part: "" or " here"
        try:
            self.proc = subprocess.Popen(
                argv, start_new_session=True, stdin=stdin, env={**os.environ, **(env or {}), JOB_MARK: mark}
            )
        except OSError as e:
            raise CannotStartError(f"cannot run {argv[0]!r}: {e.strerror}") from None
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """A stop request: SIGTERM to the process group (under torchrun: the agent, which passes it on)."""
        _signal(os.killpg, self.pid, signal.SIGTERM)

    def start_kill(self, grace: float) -> None:
        """SIGTERM (SIGKILL when ``grace`` is 0) to every process of the job, if any is left."""
        if self.alive():
            self._signal_all(signal.SIGTERM if grace > 0 else signal.SIGKILL)

    def finish_kill(self, grace: float) -> None:
        """Return once no process of the job is left: SIGKILL what is there after ``grace`` s;
        StuckProcesses when some are still there KILL_WAIT_S after that."""
        if grace > 0 and self._gone_within(grace):
            return
        self._signal_all(signal.SIGKILL)
        if not self._gone_within(KILL_WAIT_S):
            left = ", ".join(map(str, self._outside_group())) or "none outside it"
            raise StuckProcesses(
                f"processes of the job{self.where} are still there {KILL_WAIT_S:g} s after SIGKILL (process "
                f"group {self.pid}; other pids: {left}): not starting another attempt over them"
            )

    def kill(self, grace: float) -> None:
        self.start_kill(grace)
        self.finish_kill(grace)

    def alive(self) -> bool:
        """Any process of the job left. A process that has exited but was not reaped still counts in
        its group, so reap the job (and, once it is reaped, any orphan of its group inherited as PID 1
        of a container)."""
        if self.proc.poll() is not None:
            _reap_group_orphans(self.pid)
        try:
            os.killpg(self.pid, 0)
            return True
        except ProcessLookupError:
            pass
        except PermissionError:
            return True  # a member changed user: it exists
        return bool(self._outside_group())

    def _gone_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _signal_all(self, sig: int) -> None:
        _signal(os.killpg, self.pid, sig)
        for pid in self._outside_group():  # torchrun's ranks, each in a session of its own
            _signal(os.kill, pid, sig)

    def _outside_group(self) -> list[int]:
        """Live processes of the job outside its process group, found by ``JOB_MARK=mark`` in
        ``/proc/PID/environ`` (the environment a process started with, inherited through fork and exec
        whatever its session). A zombie's reads empty; another user's cannot be read; no /proc: none."""
        entry = f"{JOB_MARK}={self.mark}".encode()
        try:
            names = [n for n in os.listdir("/proc") if n.isdigit()]
        except OSError:
            return []
        pids = []
        for name in names:
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if entry in f.read().split(b"\0") and os.getpgid(int(name)) != self.pid:
                        pids.append(int(name))
            except OSError:
                continue  # exited meanwhile, or not ours to read
        return pids


class RemoteJob:
    """The command on ``host``, run there by an agent (see the module docstring) that ssh starts."""

    def __init__(self, remote: RemoteConfig, host: str, argv: list[str], mark: str):
        self.host = host
        self.where = f" on {host}"
        self.argv = ssh_argv(remote, host, agent_command(remote, mark, argv))
        try:  # a session of its own: a Ctrl-C in the terminal must not close the channel
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise CannotStartError(f"cannot run {remote.ssh!r}: {e.strerror}") from None
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None  # the agent there ends its job before it exits

    def stop(self) -> None:
        self._send(b"term\n")

    def start_kill(self, grace: float) -> None:
        """Order the agent to kill its job (it grants TERM_GRACE_S itself), and close the channel."""
        self._send(b"kill\n")
        try:
            self.proc.stdin.close()
        except OSError:
            pass  # the pipe broke: ssh is gone already

    def finish_kill(self, grace: float) -> None:
        """Wait for the agent to report; a client that does not end is killed (the job there then
        ends once its sshd sees the connection close). StuckProcesses when the agent gave up."""
        try:
            self.proc.wait(timeout=SSH_WAIT_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "ssh to %s did not end %g s after 'kill': killing the client", self.host, SSH_WAIT_S
            )
            _signal(os.killpg, self.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.returncode == STUCK:
            raise StuckProcesses(
                f"processes of the job on {self.host} outlived SIGKILL there (its log above)"
            )

    def _send(self, line: bytes) -> None:
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass  # ssh has exited (broken pipe) or the channel is closed already


def parse_agent_args(argv: list[str], prog: str) -> tuple[str, dict[str, str], list[str]]:
    """``--agent=MARK [--agent_env=NAME=VALUE ...] -- COMMAND`` (built by agent_command): (MARK, the
    variables, COMMAND); exits with status 2 on a bad command line."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} --agent", usage="%(prog)s=MARK [--agent_env=N=V] -- COMMAND"
    )
    parser.add_argument(
        "--agent", required=True, metavar="MARK", help=f"the {JOB_MARK} of the job's processes"
    )
    parser.add_argument("--agent_env", action="append", default=[], metavar="NAME=VALUE")
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not command:
        parser.error("no command to run after --")
    return args.agent, dict(pair.partition("=")[::2] for pair in args.agent_env), command


def run_agent(command: list[str], mark: str, env: dict[str, str]) -> int:
    """Run ``command`` as a LocalJob marked ``mark`` (with ``env`` added) under the orders on stdin;
    returns the agent's exit status (see the module docstring)."""
    orders: list[tuple[str, str]] = []  # (term | kill, why), in arrival order
    for sig, order in ((signal.SIGTERM, "term"), (signal.SIGINT, "term"), (signal.SIGHUP, "kill")):
        signal.signal(sig, lambda signum, frame, order=order: orders.append((order, sig_name(signum))))
    try:
        job = LocalJob(command, mark, stdin=subprocess.DEVNULL, env=env)  # stdin is for the orders
    except CannotStartError as e:
        logger.error("%s", e)
        return USER_ERROR
    logger.info("job started (pid %d): %s", job.pid, shlex.join(command))
    fd, pending, stopped = sys.stdin.fileno(), b"", False
    try:
        while job.poll() is None:
            if fd >= 0 and select.select([fd], [], [], POLL_S)[0]:
                data = os.read(fd, 4096)
                if not data:
                    fd = -1  # EOF: nothing more will come
                    orders.append(("kill", "stdin closed (the monitor or its connection is gone)"))
                *lines, pending = (pending + data).split(b"\n")
                orders += [(line.decode(errors="replace").strip(), "the monitor") for line in lines]
            elif fd < 0:
                time.sleep(POLL_S)
            kills = [why for order, why in orders if order == "kill"]
            if kills:
                logger.warning("kill (%s): killing the job", kills[0])
                job.kill(TERM_GRACE_S)
                break
            if not stopped and any(order == "term" for order, _ in orders):
                logger.info("stop request: forwarding SIGTERM to the job, waiting for it to save and exit")
                job.stop()
                stopped = True
        rc = job.proc.wait()
        logger.info("job exited with %s", f"code {rc}" if rc >= 0 else sig_name(-rc))
        if job.alive():
            logger.warning("processes of the job outlived it: stopping them")
            job.kill(TERM_GRACE_S)
    except StuckProcesses as e:
        logger.error("giving up: %s", e)
        return STUCK
    return rc if rc >= 0 else 128 - rc


def _signal(send, target: int, sig: int) -> None:
    """``send(target, sig)`` (os.killpg or os.kill); a target already gone is fine."""
    try:
        send(target, sig)
    except ProcessLookupError:
        pass


def _reap_group_orphans(pgid: int) -> None:
    """Reap the exited children of this process that belong to process group ``pgid``, found in
    ``/proc/PID/stat`` (state Z, parent us): never ``waitpid(-1)``, which could take the status of
    another child (an ssh client of another part) from the Popen that waits for it."""
    try:
        names = [n for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return
    for name in names:
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                stat = f.read()
            state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]  # after "pid (comm) "
            if state == "Z" and int(ppid) == os.getpid() and int(pgrp) == pgid:
                os.waitpid(int(name), os.WNOHANG)
        except (OSError, ValueError):
            continue  # gone meanwhile, or reaped by someone else


def sig_name(signum: int) -> str:
    return signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
