"""Build, then run: everything a run trains, from a TrainConfig, before the first step.

:func:`build_components` reads the tokenizer, datasets and model (fresh or ``--init_from``);
:func:`build_trainer` wraps them, in this order, and restores a checkpoint::

    model -> 16-bit --params_dtype: its fp32 MainParams, taken before the cast to 16 bits
          -> torch.compile (--compile) -> DataParallelModel (buffers, comm hook)
          -> the optimizer wrapper (optimizer/) over what the DDP exposes, with the inner optimizer
             from Components.make_optimizer and the fp16 loss scaler (none with
             --overlap_optim_step: the per-bucket optimizers inside the hook are its one home)
          -> TrainState (model = fp32 weights or main params, optimizer, progress, scaler; RNG and
             comm hook per rank)
          -> --resume: the resume rules (z2all.training.resume), then CheckpointManager.load_latest
          -> config.json (only once the load succeeded), metrics, tracker -> Trainer

Every failure names the flag or file at fault, before any training starts.

Model size: ``--model_config`` is a preset name or a JSON file of Z2allConfig fields; ``vocab_size``
defaults to the tokenizer's, padded up to a multiple of 64 (tensor-core friendly; the extra rows are
never targets). With ``--init_from`` the model and its config come from that run/HF folder and
``--model_config`` is ignored (logged).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimizer import (
    DynamicGradScaler,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MainParams,
    MixedPrecisionOptimizer,
    adamw_factory,
    weight_decay_param_groups,
)
from parallel.distributed_optimizer import DistributedOptimizer
from z2all.data.dpo_dataset import DPODataset
from z2all.data.pretrain_dataset import PretokDatasetWithIndex
from z2all.data.sft_dataset import SFTDataset
from z2all.model import Z2allConfig, Z2allForCausalLM, get_preset, list_presets
from z2all.tokenizer import Z2allTokenizer
from z2all.training.checkpoint import CheckpointManager
from z2all.training.checkpoint_format import list_checkpoints
from z2all.training.collectives import all_reduce_max
from z2all.training.config import ConfigError, TrainConfig
from z2all.training.heartbeat import Heartbeat
from z2all.training.loop import Trainer, TrainerParts
from z2all.training.metrics import MetricsWriter
from z2all.training.model_loading import find_tokenizer_dir, load_model_from_dir
from z2all.training.parallelize import DataParallelModel
from z2all.training.resume import ResumeRules, check_fresh_out_dir, run_facts
from z2all.training.rng_state import rank_seed, seed_all
from z2all.training.runtime import Runtime
from z2all.training.state import (
    LossScalerState,
    MainParamsState,
    ModelState,
    OptimizerState,
    RNGState,
    ShardedMainParamsState,
    ShardedOptimizerState,
    TrainProgress,
    TrainState,
)
from z2all.training.tasks import DPOTask, PretrainTask, SFTTask
from z2all.training.trackers import build_tracker

logger = logging.getLogger(__name__)

MakeOptimizer = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]
"""``[(name, parameter)] -> optimizer``: the whole model's, or one DDP bucket's (--overlap_optim_step)."""


@dataclass
class Components:
    """What a run trains: built by :func:`build_components` from the config, or given (tests)."""

    model: nn.Module
    """The bare model on its device (not wrapped, not compiled); what checkpoints hold."""
    make_optimizer: MakeOptimizer
    """Builds the optimizer over the parameters the data-parallel wrapper exposes."""
    task: Any
    """A task from tasks.py: ``collate(samples) -> batch``, ``micro_loss(model, batch, ref_model)``."""
    train_data: Any
    """Indexable, sized dataset of training samples."""
    val_data: Any = None
    """Held-out samples for evaluation, or None."""
    ref_model: nn.Module | None = None
    """DPO's frozen reference model."""
    model_config: Any = None
    """The Z2allConfig (for FLOPs/MFU and run_info.json), if known."""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra facts for run_info.json (tokenizer fingerprint and folder, optimizer backend...)."""


VOCAB_MULTIPLE = 64


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def build_tokenizer(cfg: TrainConfig) -> tuple[Z2allTokenizer, str]:
    """``(tokenizer, its folder)``: ``--tokenizer_dir``, else the one ``--init_from`` names (the
    folder found is returned as a value; the config stays as parsed)."""
    tok_dir = cfg.tokenizer_dir
    if not tok_dir and cfg.init_from:
        try:
            found = find_tokenizer_dir(cfg.init_from)
        except ValueError as e:
            raise ConfigError(f"--init_from={cfg.init_from}: {e}") from e
        if found is not None:
            tok_dir = str(found)
            logger.info("--tokenizer_dir not given: using %s from --init_from", found)
    if not tok_dir:
        raise ConfigError("--tokenizer_dir is required (or an --init_from run that names its tokenizer)")
    if not Path(tok_dir).is_dir():
        found = "" if cfg.tokenizer_dir else f" (named by --init_from={cfg.init_from})"
        raise ConfigError(f"--tokenizer_dir={tok_dir}{found}: no such folder")
    try:
        return Z2allTokenizer.from_pretrained(tok_dir), tok_dir
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tokenizer_dir={tok_dir}: {e}") from e


def resolve_model_config(cfg: TrainConfig, vocab_size: int):
    """Z2allConfig for a fresh model: preset or JSON file; vocab defaults to the padded tokenizer vocab."""
    spec = cfg.model_config
    if spec in list_presets():
        mc = get_preset(spec, vocab_size=padded_vocab(vocab_size))
    elif spec.endswith(".json") or Path(spec).is_file():
        path = Path(spec)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"--model_config={spec}: no such file (or a preset of {list_presets()})"
            ) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model_config={spec}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"--model_config={spec}: expected a JSON object of Z2allConfig fields")
        d.setdefault("vocab_size", padded_vocab(vocab_size))
        try:
            mc = Z2allConfig.from_dict(d, source=str(path))
        except ValueError as e:
            raise ConfigError(f"--model_config={spec}: {e}") from None
    else:
        raise ConfigError(f"--model_config={spec!r} is neither a preset {list_presets()} nor a JSON file")
    return mc


def _check_model_fits(mc, vocab_size: int, cfg: TrainConfig, where: str) -> None:
    if mc.vocab_size < vocab_size:
        raise ConfigError(f"{where}: model vocab_size {mc.vocab_size} < tokenizer vocab_size {vocab_size}")
    if cfg.max_seq_len > mc.max_position_embeddings:
        raise ConfigError(
            f"--max_seq_len={cfg.max_seq_len} exceeds {where}'s max_position_embeddings "
            f"{mc.max_position_embeddings}"
        )


def build_model(cfg: TrainConfig, vocab_size: int) -> tuple[nn.Module, Any]:
    """(model in fp32 on CPU, its Z2allConfig): fresh from the seeded RNG, or loaded from --init_from."""
    if cfg.init_from:
        if cfg.model_config != TrainConfig.model_config:
            logger.info("--init_from given: the model shape comes from %s, not --model_config", cfg.init_from)
        model, mc = load_model_from_dir(cfg.init_from)
        _check_model_fits(mc, vocab_size, cfg, f"--init_from={cfg.init_from}")
        logger.info("initialised from %s", cfg.init_from)
    else:
        mc = resolve_model_config(cfg, vocab_size)
        _check_model_fits(mc, vocab_size, cfg, f"--model_config={cfg.model_config}")
        model = Z2allForCausalLM(mc)
        if cfg.task_type != "pretrain":
            logger.warning(
                "--task_type=%s without --init_from trains a randomly initialised model", cfg.task_type
            )
    return model.float().train(), mc


def optimizer_factory(cfg: TrainConfig) -> MakeOptimizer:
    """AdamW over the given parameters, with the run's groups and hyper-parameters: for the whole
    model, or for one DDP bucket with --overlap_optim_step (the inner optimizer of the wrapper)."""
    opt_cfg = cfg.optimizer_config()
    adamw = adamw_factory(opt_cfg)

    def make(named_params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        params = [p for _, p in named_params]
        return adamw(weight_decay_param_groups(params, opt_cfg.weight_decay, opt_cfg.decay_ndim_min))

    return make


PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main_params_of(cfg: TrainConfig, model: nn.Module) -> MainParams | None:
    """With 16-bit --params_dtype: the fp32 main copies of the trainable weights, taken while they are
    still fp32 (a fresh init or an fp32 checkpoint loses nothing), then the model is cast. None in fp32."""
    if cfg.params_dtype == "float32":
        return None
    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    main = MainParams(named)
    model.to(PARAMS_DTYPES[cfg.params_dtype])
    return main


def wrap_optimizer(
    cfg: TrainConfig,
    make_optimizer: MakeOptimizer,
    named_params: list[tuple[str, nn.Parameter]],
    main: MainParams | None,
    grad_scaler: DynamicGradScaler | None,
    grad_of=None,
    grad_clip: float | None = None,
) -> MixedPrecisionOptimizer:
    """The optimizer wrapper over ``named_params`` (optimizer/): ``FP32Optimizer`` for fp32 weights,
    ``Float16OptimizerWithFloat16Params`` over ``main``'s copies for 16-bit ones; the inner optimizer
    is ``make_optimizer`` of the parameters it steps (the fp32 main copies, under the model's names)."""
    opt_cfg = cfg.optimizer_config()
    if grad_clip is not None:
        opt_cfg = dataclasses.replace(opt_cfg, grad_clip=grad_clip)
    params = [p for _, p in named_params]
    kw = dict(grad_scaler=grad_scaler, grad_of=grad_of)
    if main is None:
        return FP32Optimizer(params, opt_cfg, inner_factory=lambda _: make_optimizer(named_params), **kw)
    named_main = [(n, main.of(p)) for n, p in named_params]
    return Float16OptimizerWithFloat16Params(
        params, opt_cfg, inner_factory=lambda _: make_optimizer(named_main), main_params=main, **kw
    )


def build_data(cfg: TrainConfig, tokenizer) -> tuple[Any, Any]:
    """(train, valid) datasets of the task; the split is deterministic in (seed, valid_ratio) or, for
    pretrain with ``--valid_samples > 0``, in (seed, valid_samples). ``--data_dir`` exists (checked by
    build_trainer before the tokenizer is read)."""
    if cfg.task_type == "pretrain":

        def make(split):
            return PretokDatasetWithIndex(
                cfg.data_dir,
                cfg.max_seq_len,
                tokenizer,
                split=split,
                valid_ratio=cfg.valid_ratio,
                valid_samples=cfg.valid_samples if cfg.valid_samples > 0 else None,
                seed=cfg.seed,
            )
    elif cfg.task_type == "sft":

        def make(split):
            return SFTDataset(
                cfg.data_dir,
                tokenizer,
                cfg.max_seq_len,
                cfg.sft_type,
                split=split,
                valid_ratio=cfg.valid_ratio,
                seed=cfg.seed,
            )
    else:

        def make(split):
            return DPODataset(
                cfg.data_dir,
                tokenizer,
                cfg.max_seq_len,
                split=split,
                valid_ratio=cfg.valid_ratio,
                seed=cfg.seed,
            )

    try:
        train = make("train")
        valid = make("valid") if cfg.valid_ratio > 0 or cfg.valid_samples > 0 else None
    except ValueError as e:  # the datasets' own checks: no usable samples, split too small...
        raise ConfigError(f"--data_dir={cfg.data_dir}: {e}") from e
    if valid is not None and len(valid) == 0:
        valid = None
    if len(train) < cfg.train_batch_size:
        raise ConfigError(
            f"--data_dir={cfg.data_dir}: {len(train)} training samples cannot fill one micro-batch of "
            f"--train_batch_size={cfg.train_batch_size}"
        )
    logger.info(
        "data: %d train / %d valid samples from %s", len(train), len(valid) if valid else 0, cfg.data_dir
    )
    return train, valid


def build_task(cfg: TrainConfig, tokenizer):
    if cfg.task_type == "pretrain":
        return PretrainTask()
    if cfg.task_type == "sft":
        return SFTTask(tokenizer.pad_id)
    return DPOTask(tokenizer.pad_id, cfg.dpo_beta)


def build_components(
    cfg: TrainConfig, device: torch.device, tokenizer: Z2allTokenizer, tok_dir: str
) -> Components:
    """Datasets, model and task; the caller has seeded every RNG identically on all ranks."""
    train, valid = build_data(cfg, tokenizer)
    model, mc = build_model(cfg, tokenizer.vocab_size)
    if cfg.task_type == "pretrain":  # an id past the embedding would crash torch.embedding mid-run
        try:
            train.check_token_ids(mc.vocab_size)
        except ValueError as e:
            raise ConfigError(f"--data_dir={cfg.data_dir}: {e}") from e
    ref_model = None
    if cfg.task_type == "dpo":
        # The frozen reference is the starting policy; DPO's implicit reward is measured against it.
        ref_model = copy.deepcopy(model).to(device).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    info = {"tokenizer_fingerprint": tokenizer.fingerprint(), "tokenizer_dir": tok_dir}
    return Components(
        model=model.to(device),
        make_optimizer=optimizer_factory(cfg),
        task=build_task(cfg, tokenizer),
        train_data=train,
        val_data=valid,
        ref_model=ref_model,
        model_config=mc,
        info=info,
    )


def build_trainer(cfg: TrainConfig, rt: Runtime, components: Components | None = None) -> Trainer:
    """Everything the loop runs, in the order of the module docstring; all ranks call (collective)."""
    check_fresh_out_dir(cfg)
    saved = list_checkpoints(cfg.out_dir) if cfg.resume else []
    # before anything slow (data, model, compile, the load): a watchdog grants this phase its grace
    Heartbeat(cfg.out_dir, enabled=rt.rank == 0).beat(saved[0][0] if saved else 0, "startup")
    tokenizer, tok_dir = None, cfg.tokenizer_dir
    if components is None:
        if not Path(cfg.data_dir).exists():  # before the tokenizer: the likelier typo is reported
            raise ConfigError(f"--data_dir={cfg.data_dir}: no such file or folder")
        tokenizer, tok_dir = build_tokenizer(cfg)
    fingerprint = tokenizer.fingerprint() if tokenizer is not None else None
    if components is not None:
        fingerprint = components.info.get("tokenizer_fingerprint")
    rules = ResumeRules(cfg, rt.world, fingerprint, tok_dir)
    if cfg.resume:
        rules.check_newest()  # before anything is built: a refused resume costs nothing
    # The same seed on every rank while building: identical initial weights before any broadcast.
    seed_all(cfg.seed)
    if components is None:
        components = build_components(cfg, rt.device, tokenizer, tok_dir)
    comp = components
    # From here on each rank has its own streams (dropout differs across ranks, as in torch DDP).
    seed_all(rank_seed(cfg.seed, rt.rank))

    main = main_params_of(cfg, comp.model)  # 16-bit weights: fp32 main copies first, then the cast
    if main is not None and comp.ref_model is not None:
        comp.ref_model.to(PARAMS_DTYPES[cfg.params_dtype])  # DPO's reference computes like the policy
    run_model = torch.compile(comp.model) if cfg.compile else comp.model
    make_bucket_optimizer = None
    if cfg.overlap_optim_step:
        # fp32: the plain inner optimizer per bucket; bf16: a wrapper per bucket over the shared main
        # copies (no clipping, no scaler: both are refused with the overlapped step)
        def make_bucket_optimizer(named_params):
            if main is None:
                return comp.make_optimizer(named_params)
            # dp.grad_of: None for a parameter no rank used (its unused list is final when the DDP
            # steps a bucket holding one, after the sync), so it is not stepped, as in fp32
            return wrap_optimizer(
                cfg,
                comp.make_optimizer,
                named_params,
                main,
                None,
                grad_of=lambda p: dp.grad_of(p),
                grad_clip=0.0,
            )

    dp = DataParallelModel(run_model, cfg, rt.device, make_bucket_optimizer=make_bucket_optimizer)
    # fp16 (autocast or weights) needs loss scaling to keep small gradients representable; bf16 has
    # fp32's exponent range. One scaler, owned by the optimizer wrapper.
    scaler = None
    if cfg.dtype == "float16":
        scaler = DynamicGradScaler.from_config(cfg.optimizer_config(), rt.device)
    optimizer = None
    # The checkpoint's model entry is the truth: the fp32 main copies for 16-bit weights (named like
    # the weights, so any --params_dtype loads it), the weights themselves in fp32.
    model_state = ModelState(comp.model) if main is None else MainParamsState(comp.model, main)
    if cfg.use_distributed_optimizer:
        # ZeRO-1: fp32 main shards cut from the fp32 originals, AdamW over the shards from the flags
        # (Components.make_optimizer builds whole-parameter optimizers: not used here)
        optimizer = DistributedOptimizer(
            dp.wrapped,
            cfg.optimizer_config(),
            grad_scaler=scaler,
            main_params=main,
            overlap_param_gather=cfg.overlap_param_gather,
            prefetch_depth=cfg.param_gather_prefetch,
        )
        if main is not None:
            model_state = ShardedMainParamsState(comp.model, optimizer)
        main = None  # the shards now hold the fp32 truth: the full copy goes
        optim_state = ShardedOptimizerState(comp.model, optimizer)
    elif not dp.steps_optimizer:
        named = dp.named_trainable_parameters()
        optimizer = wrap_optimizer(cfg, comp.make_optimizer, named, main, scaler, grad_of=dp.grad_of)
        optim_state = OptimizerState(comp.model if main is None else main.module, optimizer.optimizer)
    progress = TrainProgress()
    shared: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        shared["optim"] = optim_state
    shared.update(progress=progress, scaler=LossScalerState(scaler))
    state = TrainState(shared, per_rank={"rng": RNGState(), "comm": dp})

    checkpoints = CheckpointManager(
        cfg.out_dir, keep=cfg.keep_checkpoints, seed=cfg.seed, timeout_s=cfg.dist_timeout
    )
    if cfg.resume:
        if checkpoints.load_latest(state, check=rules) is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", cfg.out_dir)
        else:
            logger.info("resumed from step %d (%d tokens) in %s", progress.step, progress.tokens, cfg.out_dir)
    dp.start_at(progress.step)
    metrics, tracker, failure = None, None, None
    if rt.rank == 0:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            Heartbeat(cfg.out_dir, enabled=True).beat(progress.step, "startup")  # now out_dir exists
            cfg.save(cfg.out_dir)  # only now: a refused or failed resume leaves the run's config as it was
            metrics = MetricsWriter(cfg.out_dir)
            metrics.truncate_after(progress.step)
            run_name = cfg.run_name or os.path.basename(cfg.out_dir.rstrip("/"))
            tracker = build_tracker(cfg.tracker, cfg.out_dir, run_name, cfg.to_dict())
        except Exception as e:  # noqa: BLE001 - agreed on below, then re-raised
            failure = e
    if all_reduce_max(int(failure is not None)):  # no rank goes on to step 1 while rank 0 has failed
        if failure is not None:
            raise failure
        raise RuntimeError(f"rank {rt.rank}: rank 0 could not set up {cfg.out_dir} (see its error)")
    info = dict(comp.info)
    if optimizer is not None:
        inner = optimizer.optimizer
        info.setdefault("optimizer_backend", getattr(inner, "z2all_backend", type(inner).__name__))
    parts = TrainerParts(
        cfg=cfg,
        rt=rt,
        model=comp.model,
        run_model=run_model,
        dp=dp,
        optimizer=optimizer,
        main_params=main,
        task=comp.task,
        train_data=comp.train_data,
        val_data=comp.val_data,
        ref_model=comp.ref_model,
        progress=progress,
        state=state,
        checkpoints=checkpoints,
        run_facts=run_facts(cfg, rt.world, fingerprint),
        metrics=metrics,
        tracker=tracker,
        model_config=comp.model_config,
        info=info,
    )
    return Trainer(parts)
