"""train_my_ddp.py as users run it: flag snapshot, shipped configs, errors, and the real launcher.

The integration test runs the real entry point on the tiny model and a pretokenized slice of each
real corpus (the standard library's text; the shared Chinese corpus when present): one process for
6 steps, versus torchrun with 2 ranks for steps 1..4 resumed on ONE process for steps 5..6 (a
world-size change on resume). Every step's loss must agree to 1e-4
(relative, fp32): 1 rank == 2 ranks, and resume continues the same trajectory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.training.test_loop_real import prepare_corpus
from z2all.training import train
from z2all.training.config import parse_args
from z2all.training.config_help import flag_names
from z2all.training.metrics import read_metrics

SCRIPT = str(REPO_ROOT / "train_my_ddp.py")

# Renaming or removing a flag breaks users' scripts and configs: change this list consciously.
FLAG_SNAPSHOT = [
    "adam_eps", "async_save", "backend", "beta1", "beta2", "bucket_size", "check_for_nan_in_grad",
    "comm_hook", "compile", "data_dir", "ddp_impl", "debug", "device", "dist_init_timeout", "dist_timeout",
    "dpo_beta", "dtype", "eval_interval", "eval_iters", "exit_after_minutes", "grad_clip",
    "grad_reduce_in_fp32", "gradient_accumulation_steps", "hysteresis", "init_from",
    "initial_loss_scale", "keep_checkpoints", "learning_rate", "log_interval", "loss_scale_window",
    "lr_decay_iters", "max_iters", "max_nonfinite_steps", "max_seq_len", "max_skipped_steps",
    "min_loss_scale", "min_lr", "model_config", "optimizer_backend", "out_dir", "overlap_grad_reduce",
    "overlap_optim_step", "overlap_param_gather", "param_gather_prefetch", "params_dtype",
    "powersgd_rank", "powersgd_start_iter", "resume", "run_name", "save_interval", "seed", "sft_type",
    "task_type", "tokenizer_dir", "tracker", "train_batch_size", "use_distributed_optimizer",
    "valid_ratio", "valid_samples", "warmup_iters", "weight_decay",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO_ROOT)


def test_flag_snapshot():
    assert flag_names() == FLAG_SNAPSHOT


@pytest.mark.parametrize("name", ["demo_pretrain.json", "demo_sft.json", "demo_dpo.json"])
def test_shipped_configs_load(name):
    path = REPO_ROOT / "configs" / name
    cfg = parse_args([str(path), "--data_dir=somewhere"])
    assert cfg.task_type == name.split("_")[1].split(".")[0]
    assert set(json.loads(path.read_text())) <= set(FLAG_SNAPSHOT)


def _load_entry_point():
    spec = importlib.util.spec_from_file_location("train_my_ddp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_and_errors_from_the_command_line(tmp_path, capsys):
    entry = _load_entry_point()  # the real script, called in-process (a subprocess costs a torch import)
    assert entry.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in FLAG_SNAPSHOT:
        assert f"--{name}=" in out
    assert entry.main(["--data_dir=x", "--lerning_rate=1"]) == 2
    assert "error: unknown flag --lerning_rate" in capsys.readouterr().err
    # a bad data folder or tokenizer is reported before any training starts, naming the flag
    o = f"--out_dir={tmp_path / 'o'}"
    assert entry.main([f"--data_dir={tmp_path / 'nope'}", o, f"--tokenizer_dir={tmp_path}"]) == 2
    assert "error: --data_dir=" in capsys.readouterr().err
    assert entry.main([f"--data_dir={tmp_path}", o, f"--tokenizer_dir={tmp_path}"]) == 2
    assert "error: --tokenizer_dir=" in capsys.readouterr().err
    assert entry.main([f"--data_dir={tmp_path}", o]) == 2
    assert "error: --tokenizer_dir is required" in capsys.readouterr().err


def _tiny_flags(tok, pretok) -> list[str]:
    """A short pretraining run of the tiny preset on the prepared corpus (the launcher tests' base)."""
    return [
        f"--data_dir={pretok}",
        f"--tokenizer_dir={tok}",
        "--model_config=tiny",
        "--max_seq_len=64",
        "--train_batch_size=2",
        "--gradient_accumulation_steps=2",
        "--learning_rate=3e-3",
        "--warmup_iters=1",
        "--log_interval=1",
        "--seed=5",
        "--valid_ratio=0.05",
    ]


@pytest.mark.slow
def test_torchrun_two_ranks_then_resume_on_one_equals_one_rank(text_corpus, tmp_path):
    tok, pretok = prepare_corpus(tmp_path, text_corpus, n_chars=66_000)
    flags = [
        *_tiny_flags(tok, pretok),
        "--min_lr=3e-4",
        "--lr_decay_iters=6",
        "--eval_interval=3",
        "--eval_iters=2",
    ]
    one = tmp_path / "one"
    train(
        parse_args([*flags, f"--out_dir={one}", "--max_iters=6", "--save_interval=0"])
    )  # reference, in-process

    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    r = _run([*torchrun, *flags, f"--out_dir={two}", "--max_iters=4", "--save_interval=2"])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert json.loads((two / "run_info.json").read_text())["world_size"] == 2
    console = r.stdout + r.stderr  # log lines go to stderr (z2all/log.py)
    assert console.count("step 4/4") == 1  # the console line, from rank 0 only
    r = _run([sys.executable, SCRIPT, "--resume", f"--out_dir={two}", "--max_iters=6"])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]

    ref, got = read_metrics(one), read_metrics(two)
    assert [x["step"] for x in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["tokens"] == a["tokens"]
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert got[0]["comm_bytes"] > 0 and got[-1]["comm_bytes"] == 0  # 2 ranks sync; 1 rank does not
    saved = json.loads((two / "config.json").read_text())
    assert saved["max_iters"] == 6 and saved["resume"] is True


@pytest.mark.slow
def test_torchrun_fp16_weights_skip_overflows_then_train(text_corpus, tmp_path):
    """fp16 weights on 2 gloo ranks through the real launcher: a loss scale far too large overflows,
    every rank skips those steps together and backs the scale off (--hysteresis=1: at once) until
    gradients fit, then training proceeds; the run resumes on one process in bfloat16."""
    tok, pretok = prepare_corpus(tmp_path, text_corpus, n_chars=66_000)
    flags = [
        *_tiny_flags(tok, pretok),
        "--eval_interval=0",
        "--params_dtype=float16",
        "--dtype=float16",
        f"--initial_loss_scale={2.0**24}",
        "--hysteresis=1",
    ]
    run = tmp_path / "fp16"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    r = _run([*torchrun, *flags, f"--out_dir={run}", "--max_iters=14", "--lr_decay_iters=16"])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    recs = read_metrics(run)
    skipped = [x.get("skipped", False) for x in recs]
    first = skipped.index(False)
    assert first >= 1 and not any(skipped[first:]), skipped  # overflows first, then every step applied
    scales = [x["loss_scale"] for x in recs]
    assert scales[: first + 1] == [2.0**24 / 2**i for i in range(first + 1)], scales  # halved per overflow
    assert recs[-1]["loss"] < recs[first]["loss"], [x["loss"] for x in recs]
    info = json.loads((run / "run_info.json").read_text())
    assert (info["world_size"], info["params_dtype"], info["bytes_per_param"]["main_params"]) == (
        2,
        "float16",
        4.0,
    )

    flags16 = ["--params_dtype=bfloat16", "--dtype=bfloat16", "--max_iters=16"]
    r = _run([sys.executable, SCRIPT, "--resume", f"--out_dir={run}", *flags16])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert "--params_dtype=float16 checkpoint with --params_dtype=bfloat16" in r.stderr
    recs = read_metrics(run)
    assert [x["step"] for x in recs] == list(range(1, 17)) and "loss_scale" not in recs[-1]
