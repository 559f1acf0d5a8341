"""End to end on the real pieces: tokenizer, a pretokenized real corpus, the tiny Llama, AdamW.

Every test runs on each ``text_corpus``: the standard library's text (always) and the shared Chinese
corpus with its dialogues and preference pairs (when present).

pretrain -> SFT (--init_from the pretrain run) -> DPO (--init_from the SFT run), each short, each
checked for a falling loss; DPO's first step must give ln 2 exactly (policy == reference). The SFT
run is a module fixture, so the DPO test does not depend on the SFT test having run. SFT and DPO
(with its frozen reference) on 2 ranks equal 1 rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TextCorpus
from tests.data.conftest import build_tokenizer, corpus_texts
from tests.dist_utils import run_distributed
from z2all.data.readers import iter_documents
from z2all.training import train
from z2all.training.build import build_data
from z2all.training.build import build_tokenizer as build_train_tokenizer
from z2all.training.config import TrainConfig
from z2all.training.metrics import read_metrics
from z2all.training.model_loading import find_tokenizer_dir

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


def prepare_corpus(root: Path, corpus: TextCorpus, n_chars: int = 136_000) -> tuple[Path, Path]:
    """(tokenizer dir, pretokenized + indexed folder) from the corpus's first ``n_chars`` characters:
    whole documents, the last one cut (136k characters: about 600 shared Chinese documents, or a
    dozen standard-library modules with their docstrings)."""
    from data_preprocess.build_pretrain_sample_index_map import IndexConfig, build_all
    from data_preprocess.pretok_pretrain import PretokenizeConfig, pretokenize

    tok = build_tokenizer(root / "tok", "hf_bbpe", 1000, corpus_texts(corpus))
    docs, left = [], n_chars
    for doc in iter_documents(corpus.pretrain):
        docs.append(doc[:left])
        left -= len(docs[-1])
        if not left:
            break
    corpus_dir = root / "corpus"  # a slice in a temp folder, never in the repo
    corpus_dir.mkdir()
    (corpus_dir / "docs.jsonl").write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    pretok = root / "pretok"
    pretokenize(PretokenizeConfig(data_dir=str(corpus_dir), tokenizer_dir=str(tok), save_dir=str(pretok)))
    build_all(IndexConfig(data_dir=str(pretok), max_seq_len=SEQ))
    return tok, pretok


@pytest.fixture(scope="module")
def world(text_corpus, tmp_path_factory):
    """Tokenizer + a pretokenized slice of the corpus + a short pretrain run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real")
    tok, pretok = prepare_corpus(root, text_corpus)
    cfg = common(root / "pretrain", tok, task_type="pretrain", data_dir=str(pretok), max_iters=30)
    train(cfg)
    return {"root": root, "tok": tok, "pretok": pretok, "pretrain": Path(cfg.out_dir), "corpus": text_corpus}


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


def _sft_cfg(world, out_dir: Path, **kw) -> TrainConfig:
    base = dict(
        task_type="sft",
        init_from=str(world["pretrain"]),
        data_dir=str(world["corpus"].sft_messages),
        max_iters=20,
        learning_rate=2e-3,
    )
    base.update(kw)
    return common(out_dir, "", **base)


@pytest.fixture(scope="module")
def sft_run(world):
    """A short SFT run --init_from the pretrain run: (its config, its metrics history)."""
    cfg = _sft_cfg(world, world["root"] / "sft")
    return cfg, train(cfg).history


def test_sft_from_pretrain_loss_falls(world, sft_run):
    cfg, history = sft_run
    # the tokenizer is the --init_from run's: recorded as a value (run_info.json), the config untouched,
    # and found again through the config's init_from by the tools
    assert cfg.tokenizer_dir == ""
    info = json.loads((Path(cfg.out_dir) / "run_info.json").read_text())
    assert info["tokenizer_dir"] == str(world["tok"])
    assert find_tokenizer_dir(cfg.out_dir) == world["tok"]
    losses = [r["loss"] for r in history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def _dpo_pairs(world, n: int = 32) -> Path:
    pairs = world["root"] / f"dpo{n}" / "pairs.jsonl"
    if not pairs.is_file():
        pairs.parent.mkdir(exist_ok=True)
        with open(world["corpus"].dpo_pairs, encoding="utf-8") as f:
            pairs.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return pairs


def _dpo_cfg(world, out_dir: Path, init: Path, **kw) -> TrainConfig:
    base = dict(
        task_type="dpo",
        init_from=str(init),
        data_dir=str(_dpo_pairs(world)),
        max_iters=16,
        dpo_beta=0.1,
        learning_rate=1e-3,
        min_lr=1e-4,
        eval_interval=0,
        valid_ratio=0,
    )
    base.update(kw)
    return common(out_dir, world["tok"], **base)


def test_dpo_first_step_is_ln2_and_learns(world, sft_run):
    # 32 real pairs, 4 passes over them: enough for the preference to be learned on a tiny model.
    cfg = _dpo_cfg(world, world["root"] / "dpo", Path(sft_run[0].out_dir))
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


def _short(world, task: str, out_dir: str, init: str) -> TrainConfig:
    """3 fp32 steps of SFT or DPO with 4 global micro-batches (so 1 and 2 ranks both divide them)."""
    kw = dict(max_iters=3, lr_decay_iters=3, warmup_iters=1, gradient_accumulation_steps=4, eval_interval=0)
    if task == "sft":
        return _sft_cfg(world, Path(out_dir), init_from=init, **kw)
    return _dpo_cfg(world, Path(out_dir), Path(init), **kw)


def _rank_short(rank, world_size, world, task, out_dir, init):
    torch.set_num_threads(1)
    hist = train(_short(world, task, out_dir, init)).history
    keys = ["loss", "grad_norm"] + (["rewards/margins", "logps/chosen"] if task == "dpo" else [])
    return {k: torch.tensor([r[k] for r in hist], dtype=torch.float64) for k in keys}


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_two_ranks_equal_one_rank_sft_dpo(world, sft_run, task, tmp_path):
    """Same global batch, same samples (the sampler deals global micro-batches to ranks): the
    all-reduced losses and grad norms of 2 ranks equal 1 rank's within fp32 reduction-order noise.
    DPO includes the frozen reference model's log-probs on each rank."""
    init = str(sft_run[0].out_dir if task == "dpo" else world["pretrain"])
    one = _rank_short(0, 1, world, task, str(tmp_path / "one"), init)
    two = run_distributed(_rank_short, 2, world, task, str(tmp_path / "two"), init)
    for r in range(2):
        for key, want in one.items():
            torch.testing.assert_close(two[r][key], want, rtol=1e-4, atol=0, msg=f"{task} rank {r} {key}")


def test_valid_samples_sets_the_exact_held_out_count(world):
    cfg = common(world["root"] / "vs", world["tok"], data_dir=str(world["pretok"]), valid_samples=7)
    tokenizer, _ = build_train_tokenizer(cfg)
    train_ds, valid_ds = build_data(cfg, tokenizer)
    by_ratio = build_data(
        common(world["root"] / "vr", world["tok"], data_dir=str(world["pretok"])), tokenizer
    )
    assert len(valid_ds) == 7
    assert len(train_ds) + 7 == len(by_ratio[0]) + len(by_ratio[1])  # same windows, other split


def test_bf16_weights_keep_the_fp32_truth_from_init_from_to_export(world, tmp_path):
    """--params_dtype=bfloat16 from an fp32 run: the main params start as the fp32 weights exactly
    (not their rounding), the checkpoint's model entry is those fp32 main params, and
    load_model_from_dir (what --init_from and z2all.sample use) and export_hf read them. A step at a
    learning rate of 1e-30 moves no fp32 value, so the checkpoint must equal the starting weights bit
    for bit."""
    from z2all.export_hf import export_hf
    from z2all.training.model_loading import load_model_from_dir

    start, _ = load_model_from_dir(world["pretrain"])
    kw = dict(task_type="pretrain", data_dir=str(world["pretok"]), params_dtype="bfloat16", dtype="bfloat16")
    kw.update(learning_rate=1e-30, min_lr=1e-30, warmup_iters=0)
    train(common(tmp_path / "bf16", world["tok"], init_from=str(world["pretrain"]), max_iters=1, **kw))
    got, _ = load_model_from_dir(tmp_path / "bf16")
    for name, w in start.state_dict().items():
        assert got.state_dict()[name].dtype == torch.float32 and torch.equal(got.state_dict()[name], w), name
    assert any(not torch.equal(w.to(torch.bfloat16).float(), w) for w in start.state_dict().values())

    hf = export_hf(tmp_path / "bf16", tmp_path / "hf", dtype="bfloat16")
    from safetensors.torch import load_file

    exported = {k: v for f in sorted(Path(hf).glob("*.safetensors")) for k, v in load_file(f).items()}
    assert all(v.dtype == torch.bfloat16 for v in exported.values())
    emb = exported["model.embed_tokens.weight"]
    assert torch.equal(emb, start.state_dict()["model.embed_tokens.weight"].to(torch.bfloat16))
