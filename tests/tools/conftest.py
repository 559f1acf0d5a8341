"""A tiny z2all run folder for the tool tests: trained tokenizer, real model, one checkpoint.

``tiny_run`` is built once per session: ``config.json`` (with ``tokenizer_dir``), a checkpoint of a
``z2all.model`` tiny-preset model (tied embeddings, vocab padded to 64) after two AdamW steps, and
a ``metrics.jsonl``. ``tiny_sp_run`` is the same with the sp_bbpe tokenizer, an untied LM head and
linear RoPE scaling (``build_tiny_run`` makes either). Tests must not modify them (copy them first).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.data.conftest import tiny_sp_tokenizer_dir, tiny_tokenizer_dir  # noqa: F401  (session fixtures)
from z2all.model import Z2allForCausalLM, get_preset
from z2all.tokenizer import Z2allTokenizer
from z2all.training.checkpoint import CheckpointManager
from z2all.training.state import TrainProgress, TrainState


@pytest.fixture
def caplog(caplog, monkeypatch):
    """caplog that also sees z2all's records after an entry point's setup_logging() (which turns
    propagation to the root logger off) ran earlier in the same process."""
    monkeypatch.setattr(logging.getLogger("z2all"), "propagate", True)
    return caplog


@dataclass
class TinyRun:
    run_dir: Path
    tokenizer_dir: Path
    model: Z2allForCausalLM  # the weights saved in the newest checkpoint, eval mode


def build_tiny_run(run_dir: Path, tokenizer_dir: Path, **model_overrides) -> TinyRun:
    """A run folder in ``run_dir`` (see the module docstring) of a tiny-preset model for the tokenizer
    of ``tokenizer_dir``; ``model_overrides`` replace preset fields."""
    tok = Z2allTokenizer.from_pretrained(tokenizer_dir)
    vocab = (tok.vocab_size + 63) // 64 * 64
    torch.manual_seed(0)
    model = Z2allForCausalLM(get_preset("tiny", vocab_size=vocab, **model_overrides))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, tok.vocab_size, (2, 16))
    for _ in range(2):  # move the weights away from their init so a wrong load shows
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    (run_dir / "config.json").write_text(
        json.dumps({"task_type": "pretrain", "tokenizer_dir": str(tokenizer_dir), "model_config": "tiny"})
    )
    CheckpointManager(run_dir).save(2, TrainState.of(model, opt, progress=TrainProgress(step=2, tokens=64)))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in (1, 2):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": 7.0 - step,
                        "lr": 1e-2,
                        "grad_norm": 1.5,
                        "tokens": 32 * step,
                        "tokens_per_s": 1000.0,
                    }
                )
                + "\n"
            )
    return TinyRun(run_dir, Path(tokenizer_dir), model.eval())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_tokenizer_dir) -> TinyRun:  # noqa: F811
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"), tiny_tokenizer_dir, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_sp_run(tmp_path_factory, tiny_sp_tokenizer_dir) -> TinyRun:  # noqa: F811
    return build_tiny_run(
        tmp_path_factory.mktemp("tiny_sp_run"),
        tiny_sp_tokenizer_dir,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )


def usage_error(capsys, main, argv: list[str], prog: str) -> str:
    """The usage error ``main(argv)`` exits with (status 2, like any bad flag, ``prog: error: ...``):
    its stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{prog}: error: " in err
    return err
