"""Run a training command, watch it, restart it when it crashes or hangs (docs/fault_tolerance.md).

    python monitor_process.py [--max_restarts=10] [--restart_delay=10] [--heartbeat_timeout=300]
        [--startup_grace=900] [--crash_loop=3] [--log_file=PATH]
        [--hosts=H1,H2 [--ssh=ssh] [--ssh_option=OPT ...] [--remote_cwd=DIR] [--remote_python=PATH]
         [--remote_env=NAME,...]] -- COMMAND ...
    e.g. -- torchrun --standalone --nproc_per_node=4 train_my_ddp.py cfg.json --out_dir=runs/a

Imports none of the training code (STYLE.md): a watchdog must survive whatever breaks training, so
it only spawns, watches and restarts. What it knows of the trainer is a contract, mirrored here:
the exit codes of ``z2all/training/exit_codes.py`` and two files rank 0 writes in the run folder
(``z2all/training/heartbeat.py``): ``heartbeat.json`` and ``exit_code.json``.

One attempt::

    start  the command [+ --resume once the run folder holds a run], here (a session of its own) and,
           with --hosts, on each host over ssh (z2all/monitor_jobs.py: an agent there runs it)
    watch  every POLL_S: a part exited?  newest heartbeat too old?  SIGTERM/SIGINT to the monitor?
    end    exit code (or exit_code.json under torchrun) -> done | restart | stop
           hang, or a part that failed -> kill every process of every part; counts as a crash

Invariant: no process of an attempt is left, here or on a host, when the next one starts, so a hung
rank cannot keep its GPU memory or its port (how its processes are all found: z2all/monitor_jobs.py).

``monitor_process.py --agent=MARK [--agent_env=NAME=VALUE ...] -- COMMAND`` is the remote side of
--hosts, started by the head monitor over ssh; it is not meant to be typed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from z2all import monitor_jobs as jobs

# The trainer's exit codes (z2all/training/exit_codes.py, mirrored: see the module docstring).
OK = 0  # the run reached --max_iters: done
CRASH = 1  # an unexpected exception (also torchrun's code for any failed rank): restart
USER_ERROR = 2  # a flag, config, data file or checkpoint to fix: never restart
NONFINITE = 3  # the loss or the state became NaN/Inf: never restart (it would diverge again)
PREEMPTED = 4  # a checkpoint was saved on SIGTERM/SIGINT or --exit_after_minutes: resume, not a crash
MAX_IDLE_STOPS = 10  # preempted this often in a row without a new completed step: stop (a loop)
CODE_NAMES = dict(enumerate(("OK", "CRASH", "USER_ERROR", "NONFINITE", "PREEMPTED")))  # codes 0..4
DELIBERATE = (USER_ERROR, NONFINITE, PREEMPTED)  # the codes rank 0 records in exit_code.json

HEARTBEAT = "heartbeat.json"
EXIT_CODE = "exit_code.json"

POLL_S = 0.5  # how often the job and its heartbeat are looked at: hangs are seen this much late at most
SETTLE_S = 5.0  # a part failed: the others get this long to end by themselves (and rank 0 to record a
# deliberate exit: a node's torchrun may exit 1 for its ranks' 4 before rank 0 has written the file)
MAX_RESTART_DELAY_S = 300.0
TRUE_VALUES = ("1", "true", "yes", "on")  # z2all.cli_args.parse_bool's "true" spellings

PROG = "monitor_process.py"
logger = logging.getLogger("monitor_process")


@dataclass(frozen=True)
class MonitorConfig:
    command: list[str]  # the job, passed to Popen as an argument list, never through a shell
    out_dir: Path  # the run folder: heartbeat.json, exit_code.json, config.json, step_* live here
    log_file: Path
    max_restarts: int
    restart_delay: float
    heartbeat_timeout: float
    startup_grace: float
    crash_loop: int
    remote: jobs.RemoteConfig | None = None  # --hosts: where the command runs too


# flag: (type, default, least value, help). A limit under POLL_S could not be watched: at least 1 s.
FLAGS = {
    "max_restarts": (int, 10, 0, "restarts after crashes and hangs before giving up"),
    "restart_delay": (float, 10.0, 0, "seconds before a restart, doubled after each consecutive crash"),
    "heartbeat_timeout": (float, 300.0, 1, "seconds without a heartbeat after a training step: a hang"),
    "startup_grace": (float, 900.0, 1, "the same limit in start-up, evaluation and checkpoint saves"),
    "crash_loop": (int, 3, 1, "stop after this many failures in a row without a new completed step"),
}


def parse_args(argv: list[str]) -> MonitorConfig:
    """Flags before ``--``, the command after it; a bad value exits with ``PROG: error: ...``, status 2."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [flags] -- COMMAND ...",
        description="Run COMMAND (a training run naming its --out_dir), restart it with --resume when "
        "it crashes or hangs. See docs/fault_tolerance.md.",
    )
    for name, (typ, default, _, text) in FLAGS.items():
        parser.add_argument(f"--{name}", type=typ, default=default, help=f"{text} (default: {default})")
    parser.add_argument("--log_file", help="where events are logged too (default: <out_dir>/monitor.log)")
    jobs.add_remote_flags(parser)
    split = argv.index("--") if "--" in argv else len(argv)
    args = vars(parser.parse_args(argv[:split]))
    command = argv[split + 1 :]
    if not command:
        parser.error(
            "no command to run: give it after --, e.g. -- torchrun ... train_my_ddp.py --out_dir=DIR"
        )
    for name, (_, _, least, _) in FLAGS.items():
        if args[name] < least:
            parser.error(f"--{name} must be >= {least}, got {args[name]}")
    try:
        out_dir = find_out_dir(command)
    except ValueError as e:
        parser.error(str(e))
    log_file = Path(args.pop("log_file") or out_dir / "monitor.log")
    try:  # monitor_process.py at the same path there (a shared file system)
        remote = jobs.remote_config(
            {k: args.pop(k) for k in list(args) if k not in FLAGS}, str(Path(__file__).resolve())
        )
    except ValueError as e:
        parser.error(str(e))
    return MonitorConfig(command, out_dir, log_file, **args, remote=remote)


def find_out_dir(command: list[str]) -> Path:
    """The run folder the command trains into: its ``--out_dir=DIR`` / ``--out_dir DIR`` (the last one
    wins, as in the trainer), else ``out_dir`` in the JSON config file that follows the ``*.py``
    script. ValueError when neither names one: the trainer's default folder is not guessed."""
    out_dir = None
    for i, arg in enumerate(command):
        for flag in ("--out_dir", "--out-dir"):  # the trainer reads - and _ alike
            if arg.startswith(flag + "="):
                out_dir = arg[len(flag) + 1 :]
            elif arg == flag and i + 1 < len(command):
                out_dir = command[i + 1]
    if out_dir is None:
        config = _config_file(command)
        if config is None:
            raise ValueError(
                "the command names no run folder: give it --out_dir=DIR, or a JSON config file "
                '(right after the .py script) with an "out_dir"'
            )
        try:
            settings = json.loads(Path(config).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"config file {config}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"config file {config}: invalid JSON: {e}") from None
        out_dir = settings.get("out_dir") if isinstance(settings, dict) else None
        if not isinstance(out_dir, str):
            raise ValueError(f'config file {config} has no "out_dir" (nor has the command an --out_dir=DIR)')
    if not out_dir:
        raise ValueError("--out_dir must not be empty")
    return Path(out_dir)


def _config_file(command: list[str]) -> str | None:
    """The argument right after the first ``*.py`` one, when it is a ``*.json`` file."""
    for script, nxt in zip(command, command[1:]):
        if script.endswith(".py"):
            return nxt if nxt.endswith(".json") and not nxt.startswith("-") else None
    return None


def _asks_resume(command: list[str]) -> bool:
    """The command already resumes: its last ``--resume[=VALUE]`` is true (the trainer's last one wins)."""
    value = None
    for arg in command:
        if arg == "--resume":
            value = "true"
        elif arg.startswith("--resume="):
            value = arg.partition("=")[2]
    return value is not None and value.strip().lower() in TRUE_VALUES


def _holds_run(out_dir: Path) -> bool:
    """A run to resume: the trainer has written its config, or a checkpoint."""
    ckpts = out_dir.is_dir() and any(p.name.startswith("step_") and p.is_dir() for p in out_dir.iterdir())
    return ckpts or (out_dir / "config.json").is_file()


def restart_delay(base: float, failures: int) -> float:
    """Seconds before the next attempt after ``failures`` consecutive failures (0: a preemption)."""
    return min(base * 2 ** max(failures - 1, 0), max(MAX_RESTART_DELAY_S, base))


@dataclass(frozen=True)
class _Beat:
    step: int  # completed optimizer steps
    time: float  # the writer's time.time()
    phase: str  # "startup" | "step" | "eval" | "save"
    pid: int


def _read_json(path: Path) -> dict | None:
    """The object in ``path``; None when it is missing or not a JSON object (writers rename
    complete files into place, so a half-written file is never seen)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_beat(out_dir: Path) -> _Beat | None:
    data = _read_json(out_dir / HEARTBEAT)
    try:
        return _Beat(int(data["step"]), float(data["time"]), str(data["phase"]), int(data.get("pid", 0)))
    except (TypeError, KeyError, ValueError):
        return None  # no heartbeat yet, or not one of ours


@dataclass
class _Attempt:
    number: int
    started: float  # time.time() just before Popen: files written before it belong to an earlier attempt
    best_before: int  # the highest completed step any earlier heartbeat showed
    parts: list  # a LocalJob here, then a RemoteJob per --hosts entry (z2all/monitor_jobs.py)
    beat: _Beat | None = None  # its newest heartbeat
    max_step: int = -1  # the highest step its heartbeats showed after start-up
    exited: set = field(default_factory=set)  # the indices of the parts whose exit was logged
    rc: int | None = None  # the first non-zero exit code of a part: the attempt's code (0 if none)
    failed_at: float = 0.0  # when that part exited (time.monotonic())

    @property
    def progressed(self) -> bool:
        """It completed a step no earlier attempt had (redoing steps since the checkpoint is not new)."""
        return self.max_step > self.best_before


class Monitor:
    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.signals: list[int] = []  # SIGTERM/SIGINT the monitor received, in order
        old = _read_beat(cfg.out_dir)  # a run being continued: its steps are not new progress
        self.best_step = old.step if old else -1  # the highest completed step any heartbeat showed
        self.restarts = 0  # restarts after failures (crashes and hangs), bounded by --max_restarts
        self.failures = 0  # failures in a row without a new completed step, bounded by --crash_loop
        self.reason: str | None = None  # the last attempt's exit_code.json "reason"
        self.idle_stops = 0  # PREEMPTED exits in a row without a new step, bounded by MAX_IDLE_STOPS

    def _on_signal(self, signum: int, frame) -> None:  # acted on by the loops, which look every POLL_S
        self.signals.append(signum)

    def run(self) -> int:
        """Attempts until one ends the run; returns the monitor's exit status (docs/fault_tolerance.md)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        number = 0
        while True:
            number += 1
            argv = list(self.cfg.command)
            if number > 1 and _holds_run(self.cfg.out_dir) and not _asks_resume(argv):
                argv.append("--resume")
            attempt = self._start(number, argv)
            try:
                rc = self._watch(attempt)  # None: it hung and was killed
            except jobs.StuckProcesses as e:
                logger.error("giving up: %s", e)
                return CRASH
            self.best_step = max(self.best_step, attempt.max_step)
            status, delay = self._decide(attempt, rc)
            if status is not None:
                return status
            if self.best_step >= 0:
                logger.info("last completed step seen in a heartbeat: %d", self.best_step)
            if not self._sleep(delay):
                logger.info("stopped on %s before restarting", jobs.sig_name(self.signals[0]))
                return 128 + self.signals[0]

    def _decide(self, attempt: _Attempt, rc: int | None) -> tuple[int | None, float]:
        """After an attempt: (the monitor's exit status, or None to restart; seconds to wait first)."""
        code = CRASH if rc is None else self._effective_code(rc, attempt)  # a hang is a crash
        if self.signals:
            status = code if rc is not None and rc >= 0 else 128 + self.signals[0]
            logger.info(
                "stopped on %s, not restarting: exit status %d", jobs.sig_name(self.signals[0]), status
            )
            return status, 0
        if code == OK:
            logger.info("attempt %d finished the run", attempt.number)
            return OK, 0
        if code in (USER_ERROR, NONFINITE):
            logger.error("not restarting: %s would only fail again (a person must act)", CODE_NAMES[code])
            return code, 0
        if code == PREEMPTED:  # not a crash; but stopping again and again without a step is a loop
            self.idle_stops = 0 if attempt.progressed else self.idle_stops + 1
            if self.reason == "exit_after_minutes" or self.idle_stops >= MAX_IDLE_STOPS:
                why = "--exit_after_minutes: time is up here" if self.idle_stops < MAX_IDLE_STOPS else (
                    f"{self.idle_stops} stops in a row without a new step")  # fmt: skip
                logger.info("attempt %d saved and stopped; not resuming (%s)", attempt.number, why)
                return PREEMPTED, 0
            logger.info("attempt %d saved and stopped: resuming it, not counted as a crash", attempt.number)
            return None, restart_delay(self.cfg.restart_delay, 0)
        self.failures = 0 if attempt.progressed else self.failures + 1
        if self.failures >= self.cfg.crash_loop:
            last = self.best_step if self.best_step >= 0 else "none"
            logger.error(
                "giving up: crash loop, %d failures in a row without a new completed step "
                "(last completed step: %s; --crash_loop=%d)",
                self.failures,
                last,
                self.cfg.crash_loop,
            )
            return CRASH, 0
        if self.restarts >= self.cfg.max_restarts:
            logger.error("giving up after %d restarts (--max_restarts)", self.restarts)
            return CRASH, 0
        self.restarts += 1
        delay = restart_delay(self.cfg.restart_delay, self.failures)
        logger.info("restart %d of %d in %.0f s", self.restarts, self.cfg.max_restarts, delay)
        return None, delay

    def _start(self, number: int, argv: list[str]) -> _Attempt:
        """The parts of one attempt: the command here, then on each host (each its own JOB_MARK)."""
        mark = f"{os.getpid()}-{number}-{secrets.token_hex(4)}"
        hosts = self.cfg.remote.hosts if self.cfg.remote else ()
        started = time.time()
        local = jobs.LocalJob(argv, mark, " here" if hosts else "")
        logger.info("attempt %d started%s (pid %d): %s", number, local.where, local.pid, shlex.join(argv))
        attempt = _Attempt(number, started, self.best_step, [local])
        try:
            for i, host in enumerate(hosts, 1):
                attempt.parts.append(jobs.RemoteJob(self.cfg.remote, host, argv, f"{mark}-h{i}"))
                logger.info("attempt %d started on %s: %s", number, host, shlex.join(attempt.parts[-1].argv))
        except jobs.CannotStartError:
            self._end(attempt, jobs.TERM_GRACE_S)
            raise
        return attempt

    def _watch(self, attempt: _Attempt) -> int | None:
        """Poll until every part has exited (the attempt's code: the first non-zero one, else 0) or
        it hangs (None: killed). A part that failed ends the others SETTLE_S later unless its code,
        by then, is OK or PREEMPTED (they are finishing or stopping too). A stop signal is forwarded
        once to every part; a second one kills them."""
        forwarded = False
        while self._note_exits(attempt):
            if self.signals and not forwarded:
                what = "forwarding SIGTERM to the job, waiting for it to save and exit"
                logger.info(
                    "%s received: %s (a second signal kills it)", jobs.sig_name(self.signals[0]), what
                )
                for part in attempt.parts:
                    part.stop()
                forwarded = True
            elif len(self.signals) > 1:
                logger.warning("second signal: killing the job")
                self._end(attempt, term_grace=0)
                break
            if attempt.rc is not None and time.monotonic() - attempt.failed_at > SETTLE_S:
                code = self._effective_code(attempt.rc, attempt, log=False)
                if code not in (OK, PREEMPTED):
                    logger.warning("attempt %d: a part failed (%s): ending the others", attempt.number,
                                   CODE_NAMES.get(code, code))  # fmt: skip
                    self._end(attempt, jobs.TERM_GRACE_S)
                    break
            self._look_at_heartbeat(attempt)
            hang = self._hang(attempt)
            if hang:
                logger.warning("attempt %d hangs: %s; killing it", attempt.number, hang)
                self._end(attempt, jobs.TERM_GRACE_S)
                return None
            time.sleep(POLL_S)
        self._note_exits(attempt)
        self._look_at_heartbeat(attempt)  # its last steps count as progress too
        if any(part.alive() for part in attempt.parts):
            logger.warning("processes of attempt %d outlived it: stopping them", attempt.number)
        self._end(attempt, jobs.TERM_GRACE_S)  # also learns of an agent that gave up on its processes
        return attempt.rc or 0

    def _note_exits(self, attempt: _Attempt) -> bool:
        """Log each part that exited since the last look and keep the first non-zero code; True while
        any part still runs."""
        running = False
        for i, part in enumerate(attempt.parts):
            rc = part.poll()
            if rc is None:
                running = True
            elif i not in attempt.exited:
                attempt.exited.add(i)
                if rc != 0 and attempt.rc is None:
                    attempt.rc, attempt.failed_at = rc, time.monotonic()
                how = f"exited with code {rc} ({CODE_NAMES.get(rc, 'not a trainer code')})" if rc >= 0 else ""
                logger.info(
                    "attempt %d%s %s",
                    attempt.number,
                    part.where,
                    how or f"was killed by {jobs.sig_name(-rc)}",
                )
        return running

    def _look_at_heartbeat(self, attempt: _Attempt) -> None:
        beat = _read_beat(self.cfg.out_dir)
        if beat is None or beat.time < attempt.started or beat == attempt.beat:
            return  # none, an earlier attempt's, or seen already
        if beat.phase == "startup" and (attempt.beat is None or attempt.beat.phase != "startup"):
            logger.info("attempt %d starts from step %d (startup heartbeat)", attempt.number, beat.step)
        elif beat.phase != "startup":
            attempt.max_step = max(attempt.max_step, beat.step)
        attempt.beat = beat

    def _hang(self, attempt: _Attempt) -> str | None:
        """Why the attempt counts as hung now, or None. After a step the next heartbeat is due within
        --heartbeat_timeout; start-up, evaluation and saves (or no heartbeat yet) get --startup_grace."""
        beat = attempt.beat
        flag = "heartbeat_timeout" if beat is not None and beat.phase == "step" else "startup_grace"
        limit = getattr(self.cfg, flag)
        age = time.time() - (beat.time if beat else attempt.started)
        if age <= limit:
            return None
        last = (
            f"phase {beat.phase!r} at step {beat.step}, pid {beat.pid}" if beat else "none since it started"
        )
        return f"no heartbeat for {age:.1f} s (last: {last}; --{flag}={limit:g})"

    def _end(self, attempt: _Attempt, term_grace: float) -> None:
        """Kill every process of every part (all asked first, then each waited for) and return once
        none is left; StuckProcesses, for all of them together, when some outlive SIGKILL."""
        for part in attempt.parts:
            part.start_kill(term_grace)
        stuck = []
        for part in attempt.parts:
            try:
                part.finish_kill(term_grace)
            except jobs.StuckProcesses as e:
                stuck.append(f"attempt {attempt.number}: {e}")
        if stuck:
            raise jobs.StuckProcesses("; ".join(stuck))

    def _effective_code(self, rc: int, attempt: _Attempt, log: bool = True) -> int:
        """The trainer's code: its own, or under torchrun (which exits 1 for any failed rank) the one
        rank 0 recorded in exit_code.json during this attempt (its ``reason`` kept). Else a crash."""
        recorded, self.reason = _read_json(self.cfg.out_dir / EXIT_CODE), None
        try:
            code, when = int(recorded["code"]), float(recorded["time"])
        except (TypeError, KeyError, ValueError):
            code, when = CRASH, -1.0
        if when >= attempt.started:
            self.reason = recorded.get("reason")
        if rc in (OK, *DELIBERATE):
            return rc
        if code not in DELIBERATE or when < attempt.started:
            return CRASH
        if log:
            logger.info("rank %s recorded exit code %d in %s", recorded.get("rank"), code, EXIT_CODE)
        return code

    def _sleep(self, seconds: float) -> bool:
        """Sleep; False as soon as a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while not self.signals and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, POLL_S))
        return not self.signals


def _setup_logging(log_file: Path | None, who: str = "monitor") -> None:
    """Every event to stderr and to the log file (appended; none for an agent), each line with date
    and time."""
    logger.handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    formatter = logging.Formatter(f"[%(asctime)s {who} %(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in logger.handlers:
        h.setFormatter(formatter)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str]) -> int:
    """The monitor's exit status: see the table in docs/fault_tolerance.md."""
    if argv[:1] and argv[0].startswith("--agent="):  # the remote side of --hosts (z2all/monitor_jobs.py)
        mark, env, command = jobs.parse_agent_args(argv, PROG)
        _setup_logging(None, f"agent {socket.gethostname()}")  # stderr: ssh carries it to the head's
        return jobs.run_agent(command, mark, env)
    cfg = parse_args(argv)
    try:
        _setup_logging(cfg.log_file)
    except OSError as e:
        print(f"{PROG}: error: cannot write the log file {cfg.log_file}: {e.strerror}", file=sys.stderr)
        return USER_ERROR
    try:
        return Monitor(cfg).run()
    except jobs.CannotStartError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
