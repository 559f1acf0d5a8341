"""Fixtures of the training tests that run the real entry point on the real tiny model."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, stdlib_corpus
from tests.training.test_loop_real import prepare_corpus


@dataclass(frozen=True)
class PretokWorld:
    tok: Path
    """A trained tokenizer (vocab 1000)."""
    pretok: Path
    """A pretokenized, indexed slice of the standard library's text (max_seq_len 64)."""

    def flags(self, out_dir: Path, **kw) -> list[str]:
        """Flags of a short pretraining run on the tiny model, CPU, fp32; ``kw`` overrides/extends."""
        base = dict(
            data_dir=self.pretok,
            tokenizer_dir=self.tok,
            out_dir=out_dir,
            model_config="tiny",
            max_seq_len=64,
            train_batch_size=2,
            warmup_iters=0,
            eval_interval=0,
            log_interval=1,
            valid_ratio=0,
            seed=5,
        )
        base.update(kw)
        return [f"--{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def pretok_world(tmp_path_factory) -> PretokWorld:
    root = tmp_path_factory.mktemp("pretok_world")
    tok, pretok = prepare_corpus(root, stdlib_corpus(root / "corpus_src"), n_chars=30_000)
    return PretokWorld(tok, pretok)


@pytest.fixture
def entry_point():
    """``train_my_ddp.py`` loaded as a module: ``main(argv)`` runs it in-process (a subprocess would
    cost a torch import per call)."""
    spec = importlib.util.spec_from_file_location("train_my_ddp", REPO_ROOT / "train_my_ddp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
