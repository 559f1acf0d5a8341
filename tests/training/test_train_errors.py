"""What ``train_my_ddp.py`` tells a user when something is wrong: one line
``train_my_ddp.py: error: ...`` on stderr naming the file, flag, folder or rank, and the exit code of
``z2all/training/exit_codes.py`` (the same table as docs/training.md); a traceback only with
``--debug``, or for a genuine bug (exit 1).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.training.test_train_cli import SCRIPT, _env
from z2all.training import exit_codes


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("train_my_ddp.py: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_exit_code_table_in_the_docs_is_the_code():
    """docs/training.md has ONE table of exit codes, and it lists exactly the constants."""
    doc = (REPO_ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", doc, flags=re.M)
    constants = {v: k for k, v in vars(exit_codes).items() if k.isupper() and isinstance(v, int)}
    assert {int(code): name for code, name in rows} == constants
    assert len(rows) == len(constants)


def test_a_bad_bin_is_one_line_and_debug_adds_the_traceback(pretok_world, entry_point, tmp_path, capsys):
    """A truncated .bin used to end in a PretokFormatError traceback."""
    data = tmp_path / "pretok"
    shutil.copytree(pretok_world.pretok, data)
    (victim,) = data.glob("*.bin")
    victim.write_bytes(victim.read_bytes()[:-2])
    flags = pretok_world.flags(tmp_path / "run", data_dir=data, max_iters=2)
    assert entry_point.main(flags) == exit_codes.USER_ERROR
    err = capsys.readouterr().err
    assert str(victim) in _error_line(err) and "truncated" in _error_line(err)
    assert "Traceback" not in err
    assert (
        entry_point.main([*flags, "--out_dir=" + str(tmp_path / "run2"), "--debug"]) == exit_codes.USER_ERROR
    )
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and str(victim) in _error_line(err)


def test_a_corrupt_run_is_one_line(pretok_world, entry_point, tmp_path, capsys):
    out = tmp_path / "run"
    assert entry_point.main(pretok_world.flags(out, max_iters=2, save_interval=1)) == exit_codes.OK
    for ckpt in out.glob("step_*"):
        for f in ckpt.rglob("*.distcp"):
            f.write_bytes(f.read_bytes()[:10])
    capsys.readouterr()
    assert entry_point.main(["--resume", f"--out_dir={out}", "--max_iters=4"]) == exit_codes.USER_ERROR
    err = capsys.readouterr().err
    assert f"error: {out}: no loadable checkpoint" in _error_line(err) and "Traceback" not in err


def test_resume_of_a_missing_run_names_the_folder(entry_point, tmp_path, capsys):
    """It used to say '--data_dir is required'."""
    assert entry_point.main(["--resume", f"--out_dir={tmp_path / 'nope'}"]) == exit_codes.USER_ERROR
    line = _error_line(capsys.readouterr().err)
    assert line.endswith(
        f"error: --resume: there is no run in --out_dir={tmp_path / 'nope'} (no such folder)"
    )


@pytest.mark.parametrize("field, value", [("rope_theta", 500000.0), ("rms_norm_eps", 1e-6)])
def test_model_config_edited_in_place_is_refused_on_resume(
    pretok_world, entry_point, tmp_path, capsys, field, value
):
    """The --model_config file keeps its name (so the frozen-flag check passes) but now says other
    numbers; the run used to resume with them silently."""
    from z2all.model import get_preset

    spec = tmp_path / "model.json"
    d = get_preset("tiny", vocab_size=1024).to_dict()
    spec.write_text(json.dumps(d))
    out = tmp_path / "run"
    assert entry_point.main(pretok_world.flags(out, model_config=spec, max_iters=2, save_interval=2)) == 0
    spec.write_text(json.dumps({**d, field: value}))
    capsys.readouterr()
    assert entry_point.main(["--resume", f"--out_dir={out}", "--max_iters=4"]) == exit_codes.USER_ERROR
    line = _error_line(capsys.readouterr().err)
    assert f"{out / 'step_000002'}: the model config differs" in line
    assert f"{field}: checkpoint {d[field]!r}, model {value!r}" in line
    spec.write_text(json.dumps(d))  # put back: the run continues
    assert entry_point.main(["--resume", f"--out_dir={out}", "--max_iters=4"]) == exit_codes.OK


def test_errors_name_the_rank_under_several_ranks(entry_point, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert entry_point.main(["--data_dir=x", "--lerning_rate=1"]) == exit_codes.USER_ERROR
    assert (
        _error_line(capsys.readouterr().err)
        == "train_my_ddp.py: error: rank 1: unknown flag --lerning_rate (see --help)"
    )


def test_a_bug_keeps_its_traceback(entry_point, monkeypatch, tmp_path):
    """Anything that is not a user error propagates: Python prints the traceback and exits 1."""

    def broken(cfg, rt):
        raise KeyError("a bug")

    monkeypatch.setattr(entry_point, "build_trainer", broken)
    with pytest.raises(KeyError, match="a bug"):
        entry_point.main(["--data_dir=x", f"--out_dir={tmp_path}"])


@pytest.mark.slow
def test_torchrun_nonfinite_stop_on_every_rank(pretok_world, tmp_path):
    """Two real ranks stop together at the same step (none hangs in a collective), each prints its
    line naming its rank and exits 3; torchrun itself exits 1 and reports the ranks' code."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    flags = pretok_world.flags(out, max_iters=2, save_interval=2, gradient_accumulation_steps=2)
    r = subprocess.run(
        [*torchrun, *flags], capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO_ROOT
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resume = ["--resume", f"--out_dir={out}", "--max_iters=8", "--lr_decay_iters=8", "--learning_rate=1e30"]
    r = subprocess.run(
        [*torchrun, *resume], capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO_ROOT
    )
    assert r.returncode == 1, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"train_my_ddp.py: error: rank {rank}: step 4: non-finite" in r.stderr, r.stderr[-3000:]
    assert "exitcode  : 3" in r.stderr
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000002"]
