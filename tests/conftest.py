"""Fixtures every test folder shares. Folder-specific fixtures live in that folder's conftest.py."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from z2all.log import PROJECT_LOGGERS

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every test starts seeded in fp32 and leaves no default dtype, thread count, logger setup
    (entry points call ``setup_logging``, which would hide records from ``caplog``) or process group."""
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    loggers = [logging.getLogger(n) for n in PROJECT_LOGGERS]
    logger_state = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    for lg, (handlers, level, propagate) in zip(loggers, logger_state):
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def z2all_log(caplog):
    """caplog that sees the ``z2all`` logger even after an entry point's ``setup_logging`` cut propagation."""
    logger = logging.getLogger("z2all")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="z2all")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real corpora); tests that take this fixture skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see the README's 'Test data' section)")
    return SHARED_DATA


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
