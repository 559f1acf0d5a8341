"""Build what a run trains from a TrainConfig: tokenizer, model (fresh or ``--init_from``), optimizer,
datasets and the task. Every failure names the flag or file at fault, before any training starts.

Model size: ``--model_config`` is a preset name or a JSON file of Z2allConfig fields; ``vocab_size``
defaults to the tokenizer's, padded up to a multiple of 64 (tensor-core friendly; the extra rows are
never targets). With ``--init_from`` the model and its config come from that run/HF folder and
``--model_config`` is ignored (logged).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from z2all.training.config import ConfigError, TrainConfig
from z2all.training.loop import Components
from z2all.training.tasks import DPOTask, PretrainTask, SFTTask

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def build_tokenizer(cfg: TrainConfig):
    """The run's tokenizer; ``--tokenizer_dir`` defaults to ``--init_from``'s (written back into cfg)."""
    from z2all.tokenizer import Z2allTokenizer

    if not cfg.tokenizer_dir and cfg.init_from:
        from z2all.training.model_loading import find_tokenizer_dir

        found = find_tokenizer_dir(cfg.init_from)
        if found is not None:
            cfg.tokenizer_dir = str(found)
            log.info("--tokenizer_dir not given: using %s from --init_from", found)
    if not cfg.tokenizer_dir:
        raise ConfigError("--tokenizer_dir is required (or an --init_from run that names its tokenizer)")
    if not Path(cfg.tokenizer_dir).is_dir():
        raise ConfigError(f"--tokenizer_dir={cfg.tokenizer_dir}: no such folder")
    try:
        return Z2allTokenizer.from_pretrained(cfg.tokenizer_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tokenizer_dir={cfg.tokenizer_dir}: {e}") from e


def resolve_model_config(cfg: TrainConfig, vocab_size: int):
    """Z2allConfig for a fresh model: preset or JSON file; vocab defaults to the padded tokenizer vocab."""
    from z2all.model import Z2allConfig, get_preset, list_presets

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
    from z2all.model import Z2allForCausalLM

    if cfg.init_from:
        from z2all.training.model_loading import load_model_from_dir

        if cfg.model_config != TrainConfig.model_config:
            log.info("--init_from given: the model shape comes from %s, not --model_config", cfg.init_from)
        model, mc = load_model_from_dir(cfg.init_from)
        _check_model_fits(mc, vocab_size, cfg, f"--init_from={cfg.init_from}")
        log.info("initialised from %s", cfg.init_from)
    else:
        mc = resolve_model_config(cfg, vocab_size)
        _check_model_fits(mc, vocab_size, cfg, f"--model_config={cfg.model_config}")
        model = Z2allForCausalLM(mc)
        if cfg.task_type != "pretrain":
            log.warning(
                "--task_type=%s without --init_from trains a randomly initialised model", cfg.task_type
            )
    return model.float().train(), mc


def param_groups_of(params, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (Linear and Embedding weights); norms and biases (ndim < 2) get none."""
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    return param_groups_of(list(model.parameters()), weight_decay)


def _adamw(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    from optimizer import build_adamw

    return build_adamw(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        backend=cfg.optimizer_backend,
    )


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    return _adamw(cfg, param_groups(model, cfg.weight_decay))


def bucket_optimizer_factory(cfg: TrainConfig):
    """--overlap_optim_step: the optimizer of one DDP bucket, with the same groups and hyper-parameters."""

    def make(named_params):
        return _adamw(cfg, param_groups_of([p for _, p in named_params], cfg.weight_decay))

    return make


def build_data(cfg: TrainConfig, tokenizer) -> tuple[Any, Any]:
    """(train, valid) datasets of the task; the split is deterministic in (seed, valid_ratio) or, for
    pretrain with ``--valid_samples > 0``, in (seed, valid_samples)."""
    if not Path(cfg.data_dir).exists():
        raise ConfigError(f"--data_dir={cfg.data_dir}: no such file or folder")
    if cfg.task_type == "pretrain":
        from z2all.data.pretrain_dataset import PretokDatasetWithIndex

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
        from z2all.data.sft_dataset import SFTDataset

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
        from z2all.data.dpo_dataset import DPODataset

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
    log.info(
        "data: %d train / %d valid samples from %s", len(train), len(valid) if valid else 0, cfg.data_dir
    )
    return train, valid


def build_task(cfg: TrainConfig, tokenizer):
    if cfg.task_type == "pretrain":
        return PretrainTask()
    if cfg.task_type == "sft":
        return SFTTask(tokenizer.pad_id)
    return DPOTask(tokenizer.pad_id, cfg.dpo_beta)


def _check_resume_tokenizer(cfg: TrainConfig, fingerprint: str) -> None:
    info_path = Path(cfg.out_dir) / "run_info.json"
    if not (cfg.resume and info_path.is_file()):
        return
    saved = json.loads(info_path.read_text(encoding="utf-8")).get("tokenizer_fingerprint")
    if saved and saved != fingerprint:
        raise ConfigError(
            f"--resume: tokenizer {cfg.tokenizer_dir} (fingerprint {fingerprint[:12]}) is not the one the "
            f"run in {cfg.out_dir} was trained with ({saved[:12]}, {info_path})"
        )


def build_components(cfg: TrainConfig, device: torch.device) -> Components:
    """Everything the loop needs; the caller has seeded every RNG identically on all ranks."""
    if not Path(cfg.data_dir).exists():
        raise ConfigError(f"--data_dir={cfg.data_dir}: no such file or folder")
    tok = build_tokenizer(cfg)
    fingerprint = tok.fingerprint()
    _check_resume_tokenizer(cfg, fingerprint)
    train, valid = build_data(cfg, tok)
    model, mc = build_model(cfg, tok.vocab_size)
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
    model = model.to(device)
    opt = build_optimizer(cfg, model)
    info = {
        "tokenizer_fingerprint": fingerprint,
        "tokenizer_dir": cfg.tokenizer_dir,
        "optimizer_backend": getattr(opt, "z2all_backend", type(opt).__name__),
    }
    return Components(
        model=model,
        optimizer=opt,
        task=build_task(cfg, tok),
        train_data=train,
        val_data=valid,
        ref_model=ref_model,
        model_config=mc,
        info=info,
        make_bucket_optimizer=bucket_optimizer_factory(cfg) if cfg.overlap_optim_step else None,
    )
