"""Fixtures every test folder shares. Folder-specific fixtures live in that folder's conftest.py."""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from z2all.demo import build_demo_data
from z2all.log import PROJECT_LOGGERS

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared_data() -> tuple[Path | None, str]:
    """(the real-corpora folder or None, why it is missing): ``$Z2ALL_SHARED_DATA`` when set (an empty
    value or a path that is no folder means none: CI's first pass proves the suite needs none), else
    ``../shared/data`` beside the checkout."""
    env = os.environ.get("Z2ALL_SHARED_DATA")
    if env == "":
        return None, "Z2ALL_SHARED_DATA is empty"
    # resolved: tests hand these paths to subprocesses that may run in another folder
    path = Path(env).resolve() if env is not None else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        return None, f"{path} is not a folder"
    return path, ""


SHARED_DATA, _SHARED_DATA_MISSING = _find_shared_data()
SKIP_SHARED_REASON = f"needs the real corpora: {_SHARED_DATA_MISSING} (see the README's 'Test data' section)"


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
    """The real corpora (``SHARED_DATA``); tests that take this fixture are marked ``shared_data`` and
    skip when it is absent. Only tests about those particular files should take it: core guarantees
    run on ``text_corpus``, which the real corpora widen."""
    if SHARED_DATA is None:
        pytest.skip(SKIP_SHARED_REASON)
    return SHARED_DATA


# --------------------------------------------------------------------------------- real text corpora
@dataclass(frozen=True)
class TextCorpus:
    """One real corpus laid out as the trainer reads it. ``stdlib`` is built from the Python standard
    library (every interpreter ships it, so it is always there); ``shared`` is ``SHARED_DATA``."""

    name: str
    pretrain: Path  # JSONL, field "text"
    code: Path  # Python source: JSON array or JSONL, field "content" or "text"
    sft_messages: Path  # one message list per line, system message first
    sft_belle: Path  # the same dialogues, BelleGroup layout, no system message
    sft_instruction: Path  # their first exchange, one Alpaca-style JSON array
    dpo_pairs: Path  # DPO-En-Zh-20k layout
    n_dialogues: int  # records in each SFT file and in dpo_pairs


def shared_corpus(root: Path) -> TextCorpus:
    """The real corpora of ``root`` (see its README): Chinese prose/poetry, CPython, chatterbot dialogues."""
    return TextCorpus(
        name="shared",
        pretrain=root / "pretrain" / "zh_fortunes.jsonl",
        code=root / "pretrain" / "py_code.json",
        sft_messages=root / "sft" / "chatterbot_messages.jsonl",
        sft_belle=root / "sft" / "chatterbot_belle.jsonl",
        sft_instruction=root / "sft" / "chatterbot_instruction.json",
        dpo_pairs=root / "dpo" / "chatterbot_pairs.jsonl",
        n_dialogues=2493,  # the README's count: asserting it checks the files, not just the readers
    )


def stdlib_corpus(root: Path) -> TextCorpus:
    """The quick-start demo's data (``z2all.demo.build_demo_data``) under ``root``, plus its dialogues in
    the Belle and Alpaca layouts (converted here, as the shared corpora hold them)."""
    build_demo_data(root)
    messages = root / "sft" / "stdlib_qa.jsonl"
    with open(messages, encoding="utf-8") as f:
        dialogues = [json.loads(line) for line in f]
    exchanges = [(d[1]["content"], d[2]["content"]) for d in dialogues]  # (user, assistant)
    belle = root / "sft_belle" / "stdlib_qa_belle.jsonl"  # own folders: the sft/ folder stays one layout
    belle.parent.mkdir()
    with open(belle, "w", encoding="utf-8") as f:
        for i, (user, reply) in enumerate(exchanges):
            turns = [{"from": "human", "value": user}, {"from": "assistant", "value": reply}]
            f.write(json.dumps({"id": str(i), "conversations": turns}, ensure_ascii=False) + "\n")
    instruction = root / "sft_instruction" / "stdlib_qa_instruction.json"
    instruction.parent.mkdir()
    alpaca = [{"instruction": user, "input": "", "output": reply} for user, reply in exchanges]
    instruction.write_text(json.dumps(alpaca, ensure_ascii=False, indent=1), encoding="utf-8")
    pretrain = root / "pretrain" / "stdlib.jsonl"
    return TextCorpus(
        name="stdlib",
        pretrain=pretrain,
        code=pretrain,  # module sources, each followed by its docstrings
        sft_messages=messages,
        sft_belle=belle,
        sft_instruction=instruction,
        dpo_pairs=root / "dpo" / "stdlib_pairs.jsonl",
        n_dialogues=len(dialogues),
    )


@pytest.fixture(scope="session", params=["stdlib", pytest.param("shared", marks=pytest.mark.shared_data)])
def text_corpus(request, tmp_path_factory) -> TextCorpus:
    """Each real corpus in turn: ``stdlib`` always, ``shared`` when ``SHARED_DATA`` exists (else skipped).

    Core guarantees (N ranks equal 1 rank, resume, the real launcher, PowerSGD convergence) take this,
    so they run on a fresh clone and the shared corpora widen what they are checked on."""
    if request.param == "shared":
        return shared_corpus(request.getfixturevalue("shared_data"))
    return stdlib_corpus(tmp_path_factory.mktemp("stdlib_corpus"))


def has_cuda() -> bool:
    return torch.cuda.is_available()


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by ``-m``, which must see our marks
def pytest_collection_modifyitems(config, items):
    skip_gpu = None if has_cuda() else pytest.mark.skip(reason="needs a CUDA GPU")
    skip_shared = None if SHARED_DATA is not None else pytest.mark.skip(reason=SKIP_SHARED_REASON)
    for item in items:
        # A test that takes ``shared_data`` (itself or through a fixture) is marked, so that
        # ``-m shared_data`` selects every test that reads the real corpora.
        if "shared_data" in item.fixturenames and item.get_closest_marker("shared_data") is None:
            item.add_marker(pytest.mark.shared_data)
        if skip_shared is not None and item.get_closest_marker("shared_data") is not None:
            item.add_marker(skip_shared)
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
