"""z2all.cli_args: the generic dataclass -> ``--flag=value`` parser shared by every command-line face."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from z2all.cli_args import parse_dataclass_args


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
    assert out.strip() == "['z2all', 'z2all.cli_args']"
