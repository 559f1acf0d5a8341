"""TrainConfig: parsing, precedence, validation and error messages that name the culprit."""

from __future__ import annotations

import dataclasses
import json

import pytest

from z2all.training.config import ConfigError, TrainConfig, parse_args
from z2all.training.config_help import field_docs, flag_names, help_text
from z2all.training.resume import ResumeRules
from z2all.training.runtime import distributed_runtime


def test_defaults_and_derived_fields():
    cfg = parse_args(["--data_dir=d", "--max_iters=40"])
    assert cfg.data_dir == "d" and cfg.max_iters == 40
    assert cfg.lr_decay_iters == 40  # 0 means max_iters
    assert cfg.tokens_per_step == cfg.gradient_accumulation_steps * cfg.train_batch_size * cfg.max_seq_len


def test_types_are_converted():
    cfg = parse_args(
        [
            "--data_dir=d",
            "--learning_rate=1e-3",
            "--bucket_size=1e6",
            "--compile",
            "--resume=false",
            "--eval_interval=0",
            "--dtype=bfloat16",
            "--grad_reduce_in_fp32=0",
        ]
    )
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.bucket_size == 1_000_000 and isinstance(cfg.bucket_size, int)
    assert cfg.compile is True and cfg.resume is False and cfg.grad_reduce_in_fp32 is False
    assert cfg.dtype == "bfloat16" and cfg.eval_interval == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--data_dir=d", "--lerning_rate=1"], "unknown flag --lerning_rate"),
        (["--data_dir=d", "--task_type=rl"], "--task_type='rl' is not one of pretrain|sft|dpo"),
        (["--data_dir=d", "--max_iters=ten"], "--max_iters='ten' is not an integer"),
        (["--data_dir=d", "--max_iters=1.5"], "--max_iters='1.5' is not an integer"),
        (["--data_dir=d", "--learning_rate=fast"], "--learning_rate='fast' is not a number"),
        (["--data_dir=d", "--compile=maybe"], "--compile='maybe' is not a boolean"),
        (["--data_dir=d", "--max_iters"], "flag --max_iters needs a value"),
        (["--data_dir=d", "--max_iters=0"], "--max_iters must be > 0"),
        (["--data_dir=d", "--min_lr=1", "--learning_rate=0.1"], "--min_lr (1.0) must not exceed"),
        (["--data_dir=d", "--beta2=1.0"], "--beta2 must be in [0, 1)"),
        (
            ["--data_dir=d", "--warmup_iters=50", "--max_iters=10"],
            "--warmup_iters (50) > --lr_decay_iters (10)",
        ),
        (
            ["--data_dir=d", "--params_dtype=bfloat16"],
            "--params_dtype=bfloat16 computes in bfloat16: --dtype=float32 must be --dtype=bfloat16",
        ),
        (
            ["--data_dir=d", "--params_dtype=float16", "--dtype=float16", "--ddp_impl=torch"],
            "--params_dtype=float16 needs --ddp_impl=z2all",
        ),
        (["--data_dir=d", "--adam_eps=0"], "--adam_eps=0.0 must be a finite number > 0"),
        (["--data_dir=d", "--min_loss_scale=0.5"], "--min_loss_scale=0.5 must be a finite number >= 1"),
        (
            ["--data_dir=d", "--initial_loss_scale=2", "--min_loss_scale=4"],
            "--initial_loss_scale=2.0 must be finite and >= min_loss_scale (4.0)",
        ),
        (["--data_dir=d", "--hysteresis=0"], "--hysteresis must be > 0, got 0"),
        (["--data_dir=d", "--loss_scale_window=0"], "--loss_scale_window must be > 0, got 0"),
        (["--data_dir=d", "--max_skipped_steps=0"], "--max_skipped_steps must be > 0, got 0"),
        (
            ["--data_dir=d", "--use_distributed_optimizer", "--ddp_impl=torch"],
            "--use_distributed_optimizer needs --ddp_impl=z2all",
        ),
        (
            ["--data_dir=d", "--use_distributed_optimizer", "--comm_hook=powersgd"],
            "--use_distributed_optimizer with --comm_hook=powersgd is not supported",
        ),
        (
            ["--data_dir=d", "--use_distributed_optimizer", "--overlap_optim_step", "--grad_clip=0"],
            "--use_distributed_optimizer with --overlap_optim_step is not supported",
        ),
        (
            ["--data_dir=d", "--overlap_param_gather"],
            "--overlap_param_gather needs --use_distributed_optimizer",
        ),
        (
            ["--data_dir=d", "--use_distributed_optimizer", "--overlap_param_gather", "--compile"],
            "--overlap_param_gather with --compile is not supported",
        ),
        (
            ["--data_dir=d", "--overlap_optim_step", "--grad_clip=0", "--dtype=float16"],
            "--overlap_optim_step does not support the float16 loss scaler",
        ),
        (["--data_dir=d", "--keep_checkpoints=1"], "--keep_checkpoints must be >= 2"),
        (
            ["--data_dir=d", "--overlap_optim_step", "--ddp_impl=torch"],
            "--overlap_optim_step needs --ddp_impl=z2all",
        ),
        (
            ["--data_dir=d", "--overlap_optim_step", "--ddp_impl=z2all"],
            "--overlap_optim_step cannot clip by the global norm",
        ),
        (
            ["--data_dir=d", "--comm_hook=powersgd", "--powersgd_start_iter=1"],
            "--powersgd_start_iter must be >= 2 with --comm_hook=powersgd, got 1",
        ),
        (["--data_dir=d", "--valid_samples=-1"], "--valid_samples must be >= 0"),
        (
            ["--data_dir=d", "--task_type=sft", "--valid_samples=5"],
            "--valid_samples is supported for --task_type=pretrain only",
        ),
        (["--max_iters=5"], "--data_dir is required"),
        (["--data_dir=d", "stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_flags_name_the_flag(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert needle in str(e.value)


FLOAT_FLAGS = [
    "valid_ratio", "learning_rate", "min_lr", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip",
    "dpo_beta", "initial_loss_scale", "min_loss_scale", "exit_after_minutes",
]  # fmt: skip


def test_every_float_flag_is_listed():
    import typing

    hints = typing.get_type_hints(TrainConfig)
    assert sorted(n for n in flag_names() if hints[n] is float) == sorted(FLOAT_FLAGS)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "Infinity"])
@pytest.mark.parametrize("name", FLOAT_FLAGS)
def test_non_finite_float_flags_are_refused(name, value):
    """``--learning_rate=inf`` used to pass ``> 0`` (and NaN passed every ``< 0`` check)."""
    with pytest.raises(ConfigError, match=rf"--{name} must be a finite number, got "):
        parse_args(["--data_dir=d", f"--{name}={value}"])


def test_non_finite_float_in_a_json_file_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"data_dir": "d", "learning_rate": Infinity}')  # Python's json reads it
    with pytest.raises(ConfigError, match="--learning_rate must be a finite number, got inf"):
        parse_args([str(path)])


def test_grad_accum_must_divide_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = parse_args(["--data_dir=d", "--gradient_accumulation_steps=6"])  # the config knows no world
    with pytest.raises(
        ConfigError, match=r"gradient_accumulation_steps=6 is not divisible by the world size 4"
    ):
        with distributed_runtime(cfg):  # refused at start-up, before joining a process group
            pass
    parse_args(["--data_dir=d", "--gradient_accumulation_steps=8"]).check_world_size(4)


def test_config_is_read_only():
    cfg = parse_args(["--data_dir=d"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tokenizer_dir = "elsewhere"


def test_json_file_then_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"data_dir": "from_file", "max_iters": 17, "learning_rate": 0.01}))
    cfg = parse_args([str(f), "--max_iters=19"])
    assert (cfg.data_dir, cfg.max_iters, cfg.learning_rate) == ("from_file", 19, 0.01)


def test_json_file_errors_name_the_file(tmp_path):
    bad_key = tmp_path / "k.json"
    bad_key.write_text(json.dumps({"data_dir": "d", "lr": 1}))
    with pytest.raises(ConfigError, match=rf"config file {bad_key}: unknown setting 'lr'"):
        parse_args([str(bad_key)])
    bad_json = tmp_path / "j.json"
    bad_json.write_text('{"data_dir": "d",\n "max_iters": }')
    with pytest.raises(ConfigError, match=rf"{bad_json}: invalid JSON at line 2"):
        parse_args([str(bad_json)])
    bad_type = tmp_path / "t.json"
    bad_type.write_text(json.dumps({"data_dir": "d", "max_iters": "many"}))
    with pytest.raises(ConfigError, match=rf"config file {bad_type}: --max_iters='many' is not an integer"):
        parse_args([str(bad_type)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args([str(tmp_path / "missing.json")])
    arr = tmp_path / "a.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        parse_args([str(arr)])


def test_resume_reads_saved_config_and_checks_frozen(tmp_path):
    saved = parse_args(
        [
            "--data_dir=d",
            f"--out_dir={tmp_path}",
            "--max_iters=10",
            "--model_config=tiny",
            "--tokenizer_dir=tok",
        ]
    )
    saved.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == saved.to_dict()
    cfg = parse_args(["--resume", f"--out_dir={tmp_path}", "--max_iters=20"])
    assert cfg.resume and cfg.max_iters == 20 and cfg.data_dir == "d" and cfg.tokenizer_dir == "tok"
    assert cfg.lr_decay_iters == 10  # the saved cosine horizon is kept unless given again
    # what may not change is one of the resume rules (z2all.training.resume), checked before building
    changed = parse_args(["--resume", f"--out_dir={tmp_path}", "--model_config=small"])
    with pytest.raises(ConfigError, match=r"--model_config='small' differs from the resumed run's 'tiny'"):
        ResumeRules(changed, 1, None, "tok").check_newest()
    ResumeRules(cfg, 1, None, "tok").check_newest()
    # a folder without a saved config: --resume starts from the given flags (the loop then finds no
    # checkpoint); a missing flag says where the saved config was looked for
    (tmp_path / "new").mkdir()
    fresh = parse_args(["--resume", f"--out_dir={tmp_path / 'new'}", "--data_dir=x"])
    assert fresh.data_dir == "x"
    with pytest.raises(ConfigError, match=r"--data_dir is required \(--resume found no saved config .*new"):
        parse_args(["--resume", f"--out_dir={tmp_path / 'new'}"])


def test_resume_without_a_run_names_the_folder(tmp_path):
    """A mistyped --out_dir with --resume used to report '--data_dir is required'."""
    with pytest.raises(
        ConfigError, match=r"--resume: there is no run in --out_dir=.*nope \(no such folder\)"
    ):
        parse_args(["--resume", f"--out_dir={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="there is no run in"):  # even when every other flag is given
        parse_args(["--resume", f"--out_dir={tmp_path / 'nope'}", "--data_dir=x"])


def test_saved_config_round_trips(tmp_path):
    cfg = parse_args(["--data_dir=d", f"--out_dir={tmp_path}", "--comm_hook=powersgd", "--powersgd_rank=4"])
    cfg.save(tmp_path)
    again = parse_args([str(tmp_path / "config.json")])
    assert again == cfg


def test_every_field_is_documented_and_in_help():
    docs = field_docs()
    text = help_text()
    for f in dataclasses.fields(TrainConfig):
        assert docs.get(f.name), f"field {f.name} has no docstring"
        if f.init:
            assert f"--{f.name}=" in text
    assert "world_size" not in flag_names()  # a fact of the run (Runtime), not a setting


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "swanlab"])
def test_tracker_package_is_checked_up_front(tracker):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(ConfigError, match=rf"--tracker={tracker} needs the '{tracker}' package"):
        parse_args(["--data_dir=d", f"--tracker={tracker}"])


def test_model_config_preset_or_json(tmp_path):
    from z2all.training.build import padded_vocab, resolve_model_config

    assert padded_vocab(1000) == 1024 and padded_vocab(1024) == 1024
    mc = resolve_model_config(parse_args(["--data_dir=d", "--model_config=tiny"]), 1000)
    assert mc.vocab_size == 1024 and mc.hidden_size == 128  # tokenizer vocab padded to a multiple of 64
    f = tmp_path / "m.json"
    f.write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 256,
            }
        )
    )
    mc = resolve_model_config(parse_args(["--data_dir=d", f"--model_config={f}"]), 300)
    assert (mc.vocab_size, mc.hidden_size, mc.num_hidden_layers) == (320, 64, 1)
    f.write_text(json.dumps({"hidden_size": 64, "hiden": 3}))
    with pytest.raises(ConfigError, match=rf"--model_config={f}: .*hiden"):
        resolve_model_config(parse_args(["--data_dir=d", f"--model_config={f}"]), 300)
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model_config(parse_args(["--data_dir=d", "--model_config=huge"]), 300)
