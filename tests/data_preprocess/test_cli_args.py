"""z2all.cli_args: the dataclass -> ``--flag=value`` parser and ``run_cli``, shared by the data tools."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from z2all.cli_args import parse_dataclass_args, run_cli


@dataclass
class _Cfg:
    data_dir: str
    steps: int = 3
    lr: float = 0.5
    force: bool = False


def test_types_defaults_and_bools():
    assert parse_dataclass_args(_Cfg, ["--data_dir=d"]) == _Cfg("d", 3, 0.5, False)
    got = parse_dataclass_args(_Cfg, ["--data_dir=d", "--steps=7", "--lr=1e-3", "--force=yes"])
    assert got == _Cfg("d", 7, 1e-3, True)
    assert parse_dataclass_args(_Cfg, ["--data_dir=d", "--force=0"]).force is False


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "--data_dir"),  # required
        (["--data_dir=d", "--force=maybe"], "expected true/false"),
        (["--data_dir=d", "--stepz=1"], "unrecognized arguments: --stepz=1"),
        (["--data_dir=d", "--steps=1.5"], "invalid int value"),
    ],
)
def test_bad_flags_exit_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_dataclass_args(_Cfg, argv)
    assert message in capsys.readouterr().err


def test_generic_module_imports_no_other_z2all_package():
    code = "import sys, z2all.cli_args; print(sorted(m for m in sys.modules if m.startswith('z2all')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['z2all', 'z2all.cli_args', 'z2all.log']"


@dataclass
class _Checked:
    data_dir: str = ""

    def __post_init__(self):
        if not self.data_dir:
            raise ValueError("--data_dir is required")


def test_a_value_post_init_refuses_is_a_flag_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_dataclass_args(_Checked, [], prog="tool")
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith("tool: error: --data_dir is required\n")


def _work(cfg: _Checked) -> int | None:
    if cfg.data_dir == "missing":
        raise FileNotFoundError(f"--data_dir={cfg.data_dir}: no such folder")
    if cfg.data_dir == "bug":
        raise RuntimeError("a bug, not the user's fault")
    print(f"result for {cfg.data_dir}")
    return 3 if cfg.data_dir == "partial" else None


def test_run_cli_statuses_streams_and_traceback_only_with_debug(capsys):
    assert run_cli(_Checked, _work, ["--data_dir=d"], prog="tool") == 0
    assert capsys.readouterr() == ("result for d\n", "")
    assert run_cli(_Checked, _work, ["--data_dir=partial"], prog="tool") == 3  # the tool's own status
    capsys.readouterr()

    assert run_cli(_Checked, _work, ["--data_dir=missing"], prog="tool") == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "tool: error: --data_dir=missing: no such folder\n"  # one line, no traceback
    for debug in ("--debug", "--debug=true"):
        assert run_cli(_Checked, _work, ["--data_dir=missing", debug], prog="tool") == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "FileNotFoundError" in err
        assert err.endswith("tool: error: --data_dir=missing: no such folder\n")

    assert run_cli(_Checked, _work, [], prog="tool") == 2  # __post_init__ refused: a flag error
    assert "tool: error: --data_dir is required" in capsys.readouterr().err
    assert run_cli(_Checked, _work, ["--data_dir=d", "--nope=1"], prog="tool") == 2
    assert "tool: error: unrecognized arguments: --nope=1" in capsys.readouterr().err
    assert run_cli(_Checked, _work, ["--help"], prog="tool") == 0
    assert "--debug [DEBUG]" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: the traceback stays
        run_cli(_Checked, _work, ["--data_dir=bug"], prog="tool")
