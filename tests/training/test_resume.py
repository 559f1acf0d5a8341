"""The resume rules (z2all.training.resume) on their own: what a resumed run may not change.

The loop-level tests (test_loop.py, test_loop_real.py, test_train_cli.py) show that the trainer calls
them before building and on the checkpoint it loads; these pin each rule's decision and message."""

from __future__ import annotations

import json

import pytest

from tests.training.test_loop import make_cfg
from z2all.training.config import ConfigError
from z2all.training.resume import ResumeRules, check_fresh_out_dir, run_facts


def _saved_run(out, config: dict, info: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    if info is not None:
        (out / "run_info.json").write_text(json.dumps(info))


def test_frozen_settings_are_refused_naming_the_flag_and_file(tmp_path):
    _saved_run(tmp_path, {"task_type": "pretrain", "model_config": "tiny", "tokenizer_dir": "tok"})
    cfg = make_cfg(tmp_path, resume=True, task_type="sft", model_config="tiny", tokenizer_dir="tok")
    with pytest.raises(
        ConfigError, match=r"--task_type='sft' differs from the resumed run's 'pretrain' \(.*config.json\)"
    ):
        ResumeRules(cfg, 1, None, "tok").check_settings()
    same = make_cfg(tmp_path, resume=True, task_type="pretrain", model_config="tiny", tokenizer_dir="tok")
    ResumeRules(same, 1, None, "tok").check_settings()


def test_a_tokenizer_found_through_init_from_is_compared_as_the_folder_used(tmp_path):
    """The run took its tokenizer from --init_from (config.json keeps tokenizer_dir=""; run_info.json
    records the folder used): naming that folder on resume is no change, another folder is."""
    tok, other = tmp_path / "tok", tmp_path / "other"
    tok.mkdir(), other.mkdir()
    out = tmp_path / "run"
    _saved_run(out, {"tokenizer_dir": "", "task_type": "pretrain"}, {"tokenizer_dir": str(tok)})
    explicit = make_cfg(out, resume=True, tokenizer_dir=str(tok))
    ResumeRules(explicit, 1, None, str(tok)).check_settings()
    derived_again = make_cfg(out, resume=True)  # found through --init_from again
    ResumeRules(derived_again, 1, None, str(tok)).check_settings()
    moved = make_cfg(out, resume=True, tokenizer_dir=str(other))
    with pytest.raises(ConfigError, match=r"--tokenizer_dir=.*other' differs from the resumed run's .*tok'"):
        ResumeRules(moved, 1, None, str(other)).check_settings()


def test_tokenizer_fingerprint_from_run_info_and_from_the_manifest(tmp_path):
    _saved_run(tmp_path, {}, {"tokenizer_fingerprint": "a" * 64})
    cfg = make_cfg(tmp_path, resume=True)
    with pytest.raises(
        ConfigError, match=r"tokenizer .*fingerprint bbbbbbbbbbbb\) is not the one .*aaaaaaaaaaaa"
    ):
        ResumeRules(cfg, 1, "b" * 64, "tok").check_settings()
    rules = ResumeRules(cfg, 1, "a" * 64, "tok")
    rules.check_settings()
    rules(tmp_path / "step_000002", run_facts(cfg, 1, "a" * 64))
    with pytest.raises(ConfigError, match=r"step_000002\)$"):
        rules(tmp_path / "step_000002", run_facts(cfg, 1, "c" * 64))


def test_run_facts_round_trip_through_the_rules(tmp_path):
    """What a checkpoint records is accepted by the same run, on any world size without overlap."""
    cfg = make_cfg(tmp_path)
    for saved_world in (1, 2, 4):
        for world in (1, 2, 4):
            ResumeRules(cfg, world, "f", "")(tmp_path, run_facts(cfg, saved_world, "f"))
    overlap = make_cfg(tmp_path, overlap_optim_step=True, grad_clip=0.0)
    assert run_facts(overlap, 1, None)["overlap_optim_step"] is False  # no buckets on one process
    ResumeRules(overlap, 2, None, "")(tmp_path, run_facts(overlap, 2, None))
    with pytest.raises(ConfigError, match="overlap_optim_step=True on world size 2, this run has"):
        ResumeRules(overlap, 4, None, "")(tmp_path, run_facts(overlap, 2, None))


def test_a_fresh_run_refuses_a_folder_holding_a_run(tmp_path):
    check_fresh_out_dir(make_cfg(tmp_path / "new"))  # no folder yet
    (tmp_path / "used").mkdir()
    check_fresh_out_dir(make_cfg(tmp_path / "used"))  # an empty folder is fine
    (tmp_path / "used" / "step_000001").mkdir()
    with pytest.raises(ConfigError, match="already holds a run"):
        check_fresh_out_dir(make_cfg(tmp_path / "used"))
    check_fresh_out_dir(make_cfg(tmp_path / "used", resume=True))


def test_a_damaged_newest_checkpoint_is_left_to_the_loader(tmp_path):
    """The early check reads the newest checkpoint's facts; when that checkpoint is torn (here a v1
    rank file cut short) it defers to the loader, which falls back to an older one and says why."""
    import shutil
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "v1_checkpoint" / "run"
    shutil.copytree(fixture, tmp_path / "run")
    rank_file = tmp_path / "run" / "step_000002" / "rank_00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:100])
    ResumeRules(make_cfg(tmp_path / "run", resume=True), 1, None, "").check_newest()
