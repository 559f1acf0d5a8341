"""z2all.log: log lines go to stderr, so a tool's stdout holds only its results."""

from __future__ import annotations

import logging

from z2all.log import PROJECT_LOGGERS, setup_logging


def test_setup_logging_writes_to_stderr_only(capsys):
    setup_logging(rank=0)
    for name in PROJECT_LOGGERS:
        logging.getLogger(f"{name}.child").info("hello from %s", name)
    out, err = capsys.readouterr()
    assert out == ""
    for name in PROJECT_LOGGERS:
        assert f"rank0 INFO] hello from {name}" in err


def test_other_ranks_log_only_warnings_unless_debug(capsys):
    setup_logging(rank=1)
    logging.getLogger("z2all.x").info("quiet")
    logging.getLogger("z2all.x").warning("heard")
    out, err = capsys.readouterr()
    assert out == "" and "quiet" not in err and "rank1 WARNING] heard" in err
    setup_logging(rank=1, debug=True)
    logging.getLogger("z2all.x").debug("debug line")
    assert "rank1 DEBUG] debug line" in capsys.readouterr().err
