"""``z2all.cli_args.parse_bool``: the one boolean flag rule, as a function and as an argparse type."""

from __future__ import annotations

import argparse

import pytest

from z2all.cli_args import parse_bool
from z2all.sample import build_parser


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "Yes", "on", " on "])
def test_true_words(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "NO", "off"])
def test_false_words(text):
    assert parse_bool(text) is False


def test_real_bools_pass_through():
    assert parse_bool(True) is True and parse_bool(False) is False


@pytest.mark.parametrize("value", ["maybe", "", "2", "t", 1, 0, None, 1.0])
def test_anything_else_is_a_value_error_naming_the_value(value):
    with pytest.raises(ValueError, match=f"got {value!r}"):
        parse_bool(value)


def test_argparse_reports_the_message(capsys):
    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--flag", type=parse_bool)
    assert parser.parse_args(["--flag=on"]).flag is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--flag=maybe"])
    assert "prog: error: argument --flag: expected true/false (or 1/0, yes/no, on/off), got 'maybe'" in (
        capsys.readouterr().err
    )


def test_sample_chat_flag_uses_it(capsys):
    parse = build_parser().parse_args
    assert parse(["--out_dir=d", "--chat"]).chat is True  # bare flag
    assert parse(["--out_dir=d", "--chat=off"]).chat is False
    assert parse(["--out_dir=d"]).chat is False
    with pytest.raises(SystemExit):
        parse(["--out_dir=d", "--chat=maybe"])
    assert "argument --chat: expected true/false" in capsys.readouterr().err
