"""TrainConfig: every setting of ``train_my_ddp.py`` in one typed dataclass.

Sources, later ones win: the defaults below < ``<out_dir>/config.json`` of the run being resumed
(``--resume``) < a JSON file given as the first positional argument < ``--key=value`` flags.
Saved configs are read back as JSON data, never executed. Unknown keys and bad values raise
:class:`ConfigError` naming the flag or the file before any work starts. ``--help`` is generated
from the docstring under each field (config_help.py reads this file's source with ``ast``), so the
help text and the code cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optimizer import OptimizerConfig
from z2all.atomic import atomic_write_json
from z2all.cli_args import parse_bool


class ConfigError(ValueError):
    """A bad flag, value or config file; the message names the culprit."""


# OptimizerConfig fields whose flag has another name
_OPTIMIZER_FLAGS = {"lr": "learning_rate", "eps": "adam_eps", "backend": "optimizer_backend"}


@dataclass(frozen=True)
class TrainConfig:
    """Read-only once parsed: facts derived at run time (world size, the tokenizer found through
    ``--init_from``) travel as values, never written back here (docs/architecture.md)."""

    # ---- what to train on -------------------------------------------------------------------------
    task_type: Literal["pretrain", "sft", "dpo"] = "pretrain"
    """pretrain: next-token loss on packed windows; sft: loss on assistant tokens only; dpo: sigmoid DPO."""
    data_dir: str = ""
    """pretrain: folder of pretokenized .bin + .ibin files; sft/dpo: a .jsonl/.json/.parquet file/folder."""
    tokenizer_dir: str = ""
    """Folder of the trained tokenizer (Z2allTokenizer.from_pretrained); defaults to --init_from's."""
    out_dir: str = "out"
    """Run folder: config.json, run_info.json, metrics.jsonl and checkpoints."""
    model_config: str = "tiny"
    """Preset name (z2all.model.list_presets()) or a JSON file of Z2allConfig fields."""
    init_from: str = ""
    """A z2all run dir or a Hugging Face Llama dir whose weights start the run (SFT, DPO, continued)."""
    valid_ratio: float = 0.01
    """Fraction of the data held out for evaluation."""
    valid_samples: int = 0
    """pretrain: exact number of held-out samples (windows); 0 means use valid_ratio. sft/dpo: ratio only."""

    # ---- optimisation -----------------------------------------------------------------------------
    max_iters: int = 100
    """Number of optimizer steps of the whole run (a resumed run continues up to it)."""
    learning_rate: float = 3e-4
    """Peak learning rate, reached after warmup_iters."""
    min_lr: float = 3e-5
    """Learning rate at and after lr_decay_iters (end of the cosine)."""
    warmup_iters: int = 10
    """Linear warmup steps from 0 to learning_rate."""
    lr_decay_iters: int = 0
    """Step at which the cosine reaches min_lr; 0 means max_iters."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on 2-D weights (norms and biases get none)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    optimizer_backend: Literal["auto", "apex", "fused", "foreach", "torch"] = "auto"
    """AdamW implementation (optimizer.build_adamw); auto picks the fastest available."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    max_nonfinite_steps: int = 0
    """Steps in a row whose loss or gradient norm is NaN/Inf that are skipped (not applied) before the
    run stops with exit code 3; 0: the first one stops it. float16 loss-scaler overflows do not count."""
    initial_loss_scale: float = 65536.0
    """float16 only: the dynamic loss scale's starting value (2**16)."""
    loss_scale_window: int = 1000
    """float16 only: the loss scale doubles after this many consecutive steps without an overflow."""
    hysteresis: int = 2
    """float16 only: overflowing steps skipped before the loss scale halves (Megatron's hysteresis)."""
    min_loss_scale: float = 1.0
    """float16 only: the loss scale never goes below this; an overflow that would need it stops the run."""
    max_skipped_steps: int = 100
    """float16 only: loss-scale overflows in a row (each skipped) after which the run stops with exit
    code 3, whatever the scale: gradients that overflow this long will not recover."""
    train_batch_size: int = 8
    """Micro-batch size: sequences per forward/backward on one rank."""
    gradient_accumulation_steps: int = 1
    """Global micro-batches per optimizer step, shared among ranks (must be divisible by the world size)."""
    max_seq_len: int = 256
    """Tokens per training sequence."""
    seed: int = 1337
    """Seed of model init, data order and every RNG."""

    # ---- numerics and device ----------------------------------------------------------------------
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of forward/backward. With --params_dtype=float32: torch autocast over fp32 weights;
    otherwise it must equal --params_dtype. float16 uses the dynamic loss scaler."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the weights in the DDP buffers. bfloat16/float16: the model computes in it and the
    optimizer steps fp32 main copies (optimizer.Float16OptimizerWithFloat16Params; docs/optimizer.md)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu or cuda (each rank takes cuda:LOCAL_RANK)."""
    compile: bool = False
    """torch.compile the model."""

    exit_after_minutes: float = 0.0
    """Save a checkpoint and stop cleanly (exit code 4, resume later) after this many minutes of
    training, before a fixed-length allocation ends (Megatron's exit-duration); 0: never."""
    dist_timeout: int = 900
    """Seconds a collective may wait before it fails (instead of hanging on a stuck rank), from the
    first completed step on; monitor_process.py's heartbeat catches a rank stopped outside one."""
    dist_init_timeout: int = 1800
    """Seconds for joining the process group and everything before the first step (model loading,
    torch.compile, the checkpoint load)."""

    # ---- evaluation, logging, checkpoints ---------------------------------------------------------
    eval_interval: int = 50
    """Evaluate on the held-out split every this many steps (and at the last step); 0 disables."""
    eval_iters: int = 10
    """Global micro-batches per evaluation."""
    log_interval: int = 10
    """Console line every this many steps (metrics.jsonl gets every step)."""
    save_interval: int = 100
    """Checkpoint every this many steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk (at least 2 so a crash mid-save never loses both)."""
    async_save: bool = True
    """Checkpoint asynchronously: the loop waits only for the checks and a snapshot of the state in
    host memory (one more copy of it, allocated at start-up); a background thread writes and publishes
    it (docs/checkpoint.md). False: the loop waits for the whole write."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out_dir (flags given now override the saved config)."""
    tracker: Literal["none", "tensorboard", "swanlab", "wandb"] = "none"
    """Experiment tracker rank 0 reports to, besides metrics.jsonl."""
    run_name: str = ""
    """Run name shown in trackers; defaults to the out_dir's name."""
    debug: bool = False
    """Log from every rank at DEBUG level."""

    # ---- tasks ------------------------------------------------------------------------------------
    sft_type: Literal["conversation", "instruction"] = "conversation"
    """conversation: multi-turn messages; instruction: Alpaca-style instruction/input/output records."""
    dpo_beta: float = 0.1
    """DPO temperature beta of the sigmoid loss."""

    # ---- data parallelism -------------------------------------------------------------------------
    ddp_impl: Literal["torch", "z2all"] = "z2all"
    """torch: torch.nn.parallel.DistributedDataParallel; z2all: parallel.DistributedDataParallel."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto: nccl on cuda, gloo on cpu."""
    overlap_grad_reduce: bool = True
    """z2all DDP: start each bucket's all-reduce during backward as soon as it is full."""
    bucket_size: int = 40_000_000
    """Gradient bucket size in elements (z2all DDP; torch DDP gets the same size as bucket_cap_mb)."""
    grad_reduce_in_fp32: bool = True
    """z2all DDP: keep and reduce the gradient buffer in fp32."""
    comm_hook: Literal["allreduce", "fp16", "bf16", "powersgd"] = "allreduce"
    """Gradient communication: plain all-reduce, fp16/bf16 compression or PowerSGD."""
    powersgd_rank: int = 1
    """PowerSGD matrix approximation rank."""
    powersgd_start_iter: int = 10
    """PowerSGD: plain all-reduce for this many steps before compressing (>= 2, for both --ddp_impl)."""
    check_for_nan_in_grad: bool = False
    """Stop with an error naming the parameter(s) when a gradient is NaN/Inf (z2all DDP checks each
    bucket before and after its reduction; otherwise every grad is checked after the sync)."""
    overlap_optim_step: bool = False
    """z2all DDP: run each bucket's optimizer step as soon as its gradients are reduced."""
    use_distributed_optimizer: bool = False
    """ZeRO-1 (parallel.distributed_optimizer): reduce-scatter gradients; each rank keeps fp32 main
    params and AdamW moments for its 1/W shard of every bucket and all-gathers the updated weights."""
    overlap_param_gather: bool = False
    """ZeRO-1: launch each bucket's weight all-gather after the step and wait for it just before the
    forward first uses the bucket (instead of waiting for all of them inside the step)."""
    param_gather_prefetch: int = 2
    """--overlap_param_gather: weight all-gathers kept in flight ahead of the forward (buckets)."""

    def __post_init__(self) -> None:
        if self.lr_decay_iters == 0:  # the one derived field, resolved while parsing (then frozen)
            object.__setattr__(self, "lr_decay_iters", self.max_iters)
        self._validate()

    def _validate(self) -> None:
        # NaN passes every `x < 0` test and inf every `x > 0` one: refuse both for every float flag
        # first (none has a use for them; --grad_clip=0, not inf, disables clipping).
        for name, hint in typing.get_type_hints(TrainConfig).items():
            if hint is float and not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name} must be a finite number, got {getattr(self, name)}")
        if not self.data_dir:
            raise ConfigError("--data_dir is required")
        if not self.out_dir:
            raise ConfigError("--out_dir must not be empty")
        positive = (
            "max_iters",
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_seq_len",
            "eval_iters",
            "log_interval",
            "lr_decay_iters",
            "bucket_size",
            "powersgd_rank",
            "loss_scale_window",
            "hysteresis",
            "max_skipped_steps",
            "param_gather_prefetch",
            "dist_timeout",
            "dist_init_timeout",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        nonneg = (
            "warmup_iters",
            "eval_interval",
            "save_interval",
            "weight_decay",
            "adam_eps",
            "grad_clip",
            "min_lr",
            "powersgd_start_iter",
            "valid_samples",
            "max_nonfinite_steps",
            "exit_after_minutes",
        )
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.min_lr > self.learning_rate:
            raise ConfigError(
                f"--min_lr ({self.min_lr}) must not exceed --learning_rate ({self.learning_rate})"
            )
        if self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(
                f"--warmup_iters ({self.warmup_iters}) > --lr_decay_iters ({self.lr_decay_iters})"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.valid_ratio < 1.0:
            raise ConfigError(f"--valid_ratio must be in [0, 1), got {self.valid_ratio}")
        if self.keep_checkpoints < 2:
            raise ConfigError(
                f"--keep_checkpoints must be >= 2 (newest + previous), got {self.keep_checkpoints}"
            )
        if self.dpo_beta <= 0:
            raise ConfigError(f"--dpo_beta must be > 0, got {self.dpo_beta}")
        if self.params_dtype != "float32" and self.dtype != self.params_dtype:
            raise ConfigError(
                f"--params_dtype={self.params_dtype} computes in {self.params_dtype}: --dtype={self.dtype} "
                f"must be --dtype={self.params_dtype} (16-bit weights are not autocast)"
            )
        if self.params_dtype != "float32" and self.ddp_impl == "torch":
            raise ConfigError(
                f"--params_dtype={self.params_dtype} needs --ddp_impl=z2all: its buffers hold the 16-bit "
                "weights and the fp32 gradients the optimizer reads (torch DDP keeps gradients in the "
                "weights' dtype); use --ddp_impl=z2all, or --params_dtype=float32 with --dtype for autocast"
            )
        try:
            self.optimizer_config()
        except ValueError as e:  # OptimizerConfig's own checks, in flag names
            where, _, why = str(e).partition(": ")  # "OptimizerConfig.<field>=<value>: <why>"
            field, _, value = where.removeprefix("OptimizerConfig.").partition("=")
            raise ConfigError(f"--{_OPTIMIZER_FLAGS.get(field, field)}={value} {why}") from None
        if self.tracker != "none":
            package = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab"}[self.tracker]
            if importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"--tracker={self.tracker} needs the {package!r} package: pip install {package}"
                )
        if self.comm_hook == "powersgd" and self.powersgd_start_iter < 2:
            # torch's PowerSGDState refuses < 2 with error feedback / warm start (the first steps
            # must run plain all-reduce); one rule for both implementations keeps them comparable.
            raise ConfigError(
                "--powersgd_start_iter must be >= 2 with --comm_hook=powersgd, "
                f"got {self.powersgd_start_iter}"
            )
        if self.valid_samples > 0 and self.task_type != "pretrain":
            raise ConfigError(
                f"--valid_samples is supported for --task_type=pretrain only (got {self.task_type}): "
                "use --valid_ratio"
            )
        if self.ddp_impl == "torch" and self.overlap_optim_step:
            raise ConfigError("--overlap_optim_step needs --ddp_impl=z2all")
        if self.overlap_optim_step and self.grad_clip > 0:
            # each bucket steps as soon as it is reduced, before the global gradient norm is known
            raise ConfigError("--overlap_optim_step cannot clip by the global norm: set --grad_clip=0")
        if self.use_distributed_optimizer:
            if self.ddp_impl != "z2all":
                raise ConfigError("--use_distributed_optimizer needs --ddp_impl=z2all (its buffers shard)")
            if self.comm_hook != "allreduce":
                raise ConfigError(
                    f"--use_distributed_optimizer with --comm_hook={self.comm_hook} is not supported: ZeRO-1 "
                    "reduce-scatters plain gradients (a compressed all-reduce would leave no shard to own); "
                    "use --comm_hook=allreduce"
                )
            if self.overlap_optim_step:
                raise ConfigError(
                    "--use_distributed_optimizer with --overlap_optim_step is not supported: the sharded "
                    "step runs once per step after the reduce-scatter; use one of the two"
                )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("--overlap_param_gather needs --use_distributed_optimizer")
        if self.overlap_param_gather and self.compile:
            raise ConfigError(
                "--overlap_param_gather with --compile is not supported (its forward pre-hooks wait on "
                "collectives inside the compiled region); drop one of the two"
            )
        if self.overlap_optim_step and self.dtype == "float16":
            raise ConfigError("--overlap_optim_step does not support the float16 loss scaler: use bfloat16")

    def optimizer_config(self) -> OptimizerConfig:
        """The optimizer wrapper's settings (optimizer.OptimizerConfig) from the flags."""
        return OptimizerConfig(
            lr=self.learning_rate,
            weight_decay=self.weight_decay,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.adam_eps,
            backend=self.optimizer_backend,
            grad_clip=self.grad_clip,
            initial_loss_scale=self.initial_loss_scale,
            loss_scale_window=self.loss_scale_window,
            hysteresis=self.hysteresis,
            min_loss_scale=self.min_loss_scale,
        )

    def check_world_size(self, world_size: int) -> None:
        """Global accumulation steps are dealt round-robin to ranks, so they must divide evenly."""
        if world_size < 1 or self.gradient_accumulation_steps % world_size != 0:
            raise ConfigError(
                f"--gradient_accumulation_steps={self.gradient_accumulation_steps} is not divisible by the "
                f"world size {world_size}: each optimizer step takes that many global micro-batches, "
                f"dealt round-robin to the ranks"
            )

    # ---- derived quantities -----------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        """Token positions per optimizer step over all ranks (G * B * T)."""
        return self.gradient_accumulation_steps * self.train_batch_size * self.max_seq_len

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON-able data (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the resolved config to ``<out_dir>/config.json`` atomically."""
        path = Path(out_dir) / "config.json"
        atomic_write_json(path, self.to_dict())
        return path


# ---------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------
def flag_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.init}


def _convert(name: str, raw: Any, where: str) -> Any:
    """Convert ``raw`` (a string from argv or a JSON value) to the declared type of field ``name``."""
    hint = typing.get_type_hints(TrainConfig)[name]
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise ConfigError(f"{where}: --{name}={raw!r} is not one of {'|'.join(choices)}")
        return raw
    if hint is bool:
        try:
            return parse_bool(raw)
        except ValueError:
            raise ConfigError(f"{where}: --{name}={raw!r} is not a boolean (true/false)") from None
    if hint is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: --{name}={raw!r} is not an integer")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        try:
            return int(str(raw).replace("_", ""))
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = None
            if value is not None and value.is_integer():  # accepts 1e6
                return int(value)
            raise ConfigError(f"{where}: --{name}={raw!r} is not an integer") from None
    if hint is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: --{name}={raw!r} is not a number")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: --{name}={raw!r} is not a number") from None
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: --{name}={raw!r} must be a string")
        return raw
    raise TypeError(f"unsupported field type {hint} for {name}")  # a bug in TrainConfig, not user input


def _read_json_config(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object of settings, got {type(data).__name__}")
    known = flag_fields()
    values = {}
    for key, raw in data.items():
        if key not in known:
            raise ConfigError(f"{what} {path}: unknown setting {key!r}")
        values[key] = _convert(key, raw, f"{what} {path}")
    return values


def _parse_flags(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split argv into (optional JSON config path, {field: value}) without applying anything."""
    known = flag_fields()
    config_file = None
    values: dict[str, Any] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            if i == 0 and config_file is None:
                config_file = arg
                continue
            raise ConfigError(
                f"unexpected argument {arg!r}: settings are --key=value, and only the first "
                f"argument may be a JSON config file"
            )
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known:
            raise ConfigError(f"unknown flag --{key} (see --help)")
        if not eq:
            if typing.get_type_hints(TrainConfig)[key] is not bool:
                raise ConfigError(f"flag --{key} needs a value: --{key}=VALUE")
            raw = "true"
        values[key] = _convert(key, raw, "command line")
    return config_file, values


def parse_args(argv: list[str]) -> TrainConfig:
    """Build the resolved TrainConfig from argv (see the module docstring for precedence)."""
    config_file, flags = _parse_flags(argv)
    file_values = _read_json_config(config_file, "config file") if config_file else {}
    values = {**file_values, **flags}
    if not values.get("resume"):
        return TrainConfig(**values)
    out_dir = values.get("out_dir", TrainConfig.__dataclass_fields__["out_dir"].default)
    if not Path(out_dir).is_dir():
        # before any other check: "--data_dir is required" would hide the real mistake
        raise ConfigError(f"--resume: there is no run in --out_dir={out_dir} (no such folder)")
    saved_path = Path(out_dir) / "config.json"
    if not saved_path.exists():
        # a folder without a saved config: the flags must say everything (the loop then finds no
        # checkpoint and starts from step 0, with a warning)
        try:
            return TrainConfig(**values)
        except ConfigError as e:
            raise ConfigError(f"{e} (--resume found no saved config {saved_path} to take it from)") from None
    # What may not change on resume is checked by z2all.training.resume, with the other resume rules.
    saved = _read_json_config(saved_path, "saved config")
    return TrainConfig(**{**saved, **values})
