"""End to end on the real pieces: tokenizer, pretokenized shared corpus, the tiny Llama, AdamW.

pretrain -> SFT (--init_from the pretrain run) -> DPO (--init_from the SFT run), each short, each
checked for a falling loss; DPO's first step must give ln 2 exactly (policy == reference).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.data.conftest import build_tokenizer
from z2all.training.config import TrainConfig
from z2all.training.loop import train
from z2all.training.metrics import read_metrics

SEQ = 64


def common(out_dir: Path, tok_dir: Path, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out_dir),
        tokenizer_dir=str(tok_dir),
        model_config="tiny",
        max_seq_len=SEQ,
        train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        min_lr=3e-4,
        warmup_iters=2,
        eval_interval=10,
        eval_iters=2,
        log_interval=10,
        save_interval=0,
        seed=3,
        valid_ratio=0.05,
        weight_decay=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def prepare_corpus(root: Path, shared_data: Path, n_docs: int = 600) -> tuple[Path, Path]:
    """(tokenizer dir, pretokenized + indexed folder) from the first ``n_docs`` shared Chinese docs."""
    from data_preprocess.build_pretrain_sample_index_map import IndexConfig, build_all
    from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize

    tok = build_tokenizer(root / "tok", "hf_bbpe", 1000)
    corpus = root / "corpus"
    corpus.mkdir()
    with open(shared_data / "pretrain" / "zh_fortunes.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n_docs)]  # a slice in a temp folder, never in the repo
    (corpus / "zh.jsonl").write_text("".join(lines), encoding="utf-8")
    pretok = root / "pretok"
    pretokenize(PretokenizeConfig(data_dir=str(corpus), tokenizer_dir=str(tok), save_dir=str(pretok)))
    build_all(IndexConfig(data_dir=str(pretok), max_seq_len=SEQ))
    return tok, pretok


@pytest.fixture(scope="module")
def world(shared_data, tmp_path_factory):
    """Tokenizer + a pretokenized slice of the shared Chinese corpus + a short pretrain run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real")
    tok, pretok = prepare_corpus(root, shared_data)
    cfg = common(root / "pretrain", tok, task_type="pretrain", data_dir=str(pretok), max_iters=30)
    train(cfg)
    return {"root": root, "tok": tok, "pretok": pretok, "pretrain": Path(cfg.out_dir), "shared": shared_data}


def test_pretrain_loss_falls(world):
    recs = read_metrics(world["pretrain"])
    assert [r["step"] for r in recs] == list(range(1, 31))
    # random init starts near ln(vocab); 30 steps must get well below it
    assert recs[0]["loss"] > 0.9 * math.log(1000)
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    info = json.loads((world["pretrain"] / "run_info.json").read_text())
    assert info["num_params"] > 100_000
    assert info["tokenizer_fingerprint"] and info["model_config"]["vocab_size"] == 1024  # 1000 padded to 64


def test_sft_from_pretrain_loss_falls(world):
    cfg = common(
        world["root"] / "sft",
        "",
        task_type="sft",
        init_from=str(world["pretrain"]),
        data_dir=str(world["shared"] / "sft" / "chatterbot_messages.jsonl"),
        max_iters=20,
        learning_rate=2e-3,
    )
    res = train(cfg)
    assert cfg.tokenizer_dir == str(world["tok"])  # taken from the --init_from run's config.json
    losses = [r["loss"] for r in res.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    world["sft"] = Path(cfg.out_dir)


def test_dpo_first_step_is_ln2_and_learns(world):
    # 32 real pairs, 4 passes over them: enough for the preference to be learned on a tiny model.
    pairs = world["root"] / "dpo32" / "pairs.jsonl"
    pairs.parent.mkdir(exist_ok=True)
    with open(world["shared"] / "dpo" / "chatterbot_pairs.jsonl", encoding="utf-8") as f:
        pairs.write_text("".join(next(f) for _ in range(32)), encoding="utf-8")
    init = world.get("sft", world["pretrain"])
    cfg = common(
        world["root"] / "dpo",
        world["tok"],
        task_type="dpo",
        init_from=str(init),
        data_dir=str(pairs),
        max_iters=16,
        dpo_beta=0.1,
        learning_rate=1e-3,
        min_lr=1e-4,
        eval_interval=0,
        valid_ratio=0,
    )
    recs = train(cfg).history
    # step 1: policy == reference, every implicit reward is 0, loss = -log sigmoid(0) = ln 2
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert recs[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert recs[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert key in recs[-1]
    assert recs[0]["logps/chosen"] < 0 and recs[0]["logps/rejected"] < 0
    late = recs[-8:]
    assert sum(r["loss"] for r in late) / 8 < math.log(2) - 0.1
    assert sum(r["rewards/accuracies"] for r in late) / 8 > 0.6
    assert sum(r["rewards/margins"] for r in late) / 8 > 0
