"""Stopping on request (issue 13, trainer side): SIGTERM / SIGINT on any rank, or --exit_after_minutes,
stops every rank after the same step with a checkpoint there; the resumed run continues the
uninterrupted loss curve bit for bit. The heartbeat and exit_code.json are what a watchdog reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed
from tests.training.test_checkpoint import saved_steps
from tests.training.test_loop import TinyLM, make_cfg, make_components
from tests.training.test_loop_real import prepare_corpus
from z2all.training import exit_codes, train
from z2all.training.metrics import read_metrics
from z2all.training.stop_signal import PreemptedStop

REPO = Path(__file__).resolve().parents[2]


class SignallingLM(TinyLM):
    """TinyLM that sends ``sig`` to its own process during the first training forward of ``at_step``
    (1-based), on rank ``on_rank`` only."""

    def __init__(self, micro: int, at_step: int, sig=signal.SIGTERM, on_rank: int = 0, times: int = 1):
        super().__init__()
        self.micro, self.at_step, self.sig, self.on_rank, self.calls = micro, at_step, sig, on_rank, 0
        self.times = times

    def forward(self, input_ids, targets=None, return_logits: bool = True):
        if self.training:
            self.calls += 1
            rank = int(os.environ.get("RANK", "0"))
            if self.calls == (self.at_step - 1) * self.micro + 1 and rank == self.on_rank:
                for _ in range(self.times):
                    os.kill(os.getpid(), self.sig)
        return super().forward(input_ids, targets, return_logits)


def _signalling(cfg, at_step, sig=signal.SIGTERM, on_rank=0, world=1, times=1):
    comp = make_components(cfg)
    model = SignallingLM(cfg.gradient_accumulation_steps // world, at_step, sig, on_rank, times)
    model.load_state_dict(comp.model.state_dict())
    comp.model = model
    return comp


def _losses(records):
    return [r["loss"] for r in records]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_resume_is_exact(tmp_path, sig):
    ref = make_cfg(tmp_path / "full", save_interval=0)
    full = _losses(train(ref, make_components(ref)).history)
    cfg = make_cfg(tmp_path / "run", save_interval=0)
    with pytest.raises(
        PreemptedStop, match=rf"stopped on request \({signal.Signals(sig).name}\) after step 3"
    ):
        train(cfg, _signalling(cfg, at_step=3, sig=sig))
    assert saved_steps(tmp_path / "run") == [3]
    beat = json.loads((tmp_path / "run" / "heartbeat.json").read_text())
    assert beat["step"] == 3 and beat["phase"] == "save"
    assert signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL)  # handlers restored
    res = make_cfg(tmp_path / "run", resume=True, save_interval=0)
    train(res, make_components(res))
    assert _losses(read_metrics(tmp_path / "run")) == full  # steps 1..3, then 4..6 resumed: bit for bit


def test_repeated_sigterms_are_one_request(tmp_path):
    """Slurm signals every process of a step, a monitor and torchrun forward theirs: three SIGTERMs
    in a row still let the step finish and the checkpoint be written."""
    cfg = make_cfg(tmp_path / "run", save_interval=0)
    with pytest.raises(PreemptedStop, match=r"\(SIGTERM\) after step 2"):
        train(cfg, _signalling(cfg, at_step=2, times=3))
    assert saved_steps(tmp_path / "run") == [2]


def _rank_signal(rank, world, out_dir):
    cfg = make_cfg(out_dir, save_interval=0)
    try:
        train(cfg, _signalling(cfg, at_step=2, on_rank=1, world=world))
    except PreemptedStop as e:
        return str(e)
    return "not stopped"


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    msgs = run_distributed(_rank_signal, 2, str(tmp_path / "run"))
    assert "stopped on request (SIGTERM) after step 2" in msgs[1]
    assert "stopped on request (a stop request on another rank) after step 2" in msgs[0]
    assert saved_steps(tmp_path / "run") == [2]


def test_exit_after_minutes_saves_and_stops(tmp_path):
    cfg = make_cfg(tmp_path / "run", save_interval=0, exit_after_minutes=1e-6)
    with pytest.raises(PreemptedStop, match=r"--exit_after_minutes\) after step 1"):
        train(cfg, make_components(cfg))
    assert saved_steps(tmp_path / "run") == [1]


@pytest.mark.slow
def test_sigterm_to_train_my_ddp_exits_4_with_a_checkpoint_then_resumes(text_corpus, tmp_path):
    """The real script: SIGTERM once a step is done -> exit code 4, exit_code.json, a checkpoint at the
    step reached; --resume finishes the run."""
    tok, pretok = prepare_corpus(tmp_path, text_corpus, n_chars=66_000)
    run = tmp_path / "run"
    args = [
        sys.executable,
        str(REPO / "train_my_ddp.py"),
        f"--data_dir={pretok}",
        f"--tokenizer_dir={tok}",
        "--max_seq_len=64",
        "--train_batch_size=2",
        "--max_iters=400",
        "--save_interval=0",
        "--eval_interval=0",
        f"--out_dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            beat = run / "heartbeat.json"
            if beat.is_file() and json.loads(beat.read_text())["phase"] == "step":
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exit_codes.PREEMPTED, err[-2000:]
    assert json.loads((run / "exit_code.json").read_text())["code"] == exit_codes.PREEMPTED
    steps = saved_steps(run)
    assert len(steps) == 1 and 1 <= steps[0] < 400 and "continue with --resume" in err
    done = steps[0]
    r = subprocess.run([*args[:2], "--resume", f"--out_dir={run}", f"--max_iters={done + 2}"], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["step"] for x in read_metrics(run)] == list(range(1, done + 3))
