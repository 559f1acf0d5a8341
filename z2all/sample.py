"""Generate text from a trained run: ``python -m z2all.sample --out_dir=DIR --prompt=... [--chat]``.

Loads the newest loadable checkpoint of a z2all run folder (or a Hugging Face Llama folder), the
tokenizer named by the run's ``config.json`` (``tokenizer_dir``), and generates with the KV cache.
Plain mode prefixes BOS and stops at EOS; ``--chat`` renders the prompt as one user turn of the
ChatML template with ``z2all.data.chat.render_chat(..., add_generation_prompt=True)`` and stops
at ``<|im_end|>``. The logic lives in importable functions; :func:`main` only parses flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from z2all.cli_args import parse_bool
from z2all.data.chat import render_chat
from z2all.log import setup_logging
from z2all.training.model_loading import load_run, run_model_tool

logger = logging.getLogger(__name__)


def load_for_sampling(out_dir: str | Path, tokenizer_dir: str | Path | None = None, device: str = "cpu"):
    """``(model, tokenizer)``: the model of ``out_dir`` in eval mode on ``device`` and its tokenizer."""
    model, _, tok = load_run(out_dir, tokenizer_dir)
    return model.to(device).eval(), tok


def prompt_ids(tok, prompt: str, chat: bool, system: str | None = None) -> tuple[list[int], int]:
    """``(ids, stop_id)``: the prompt as the model saw such text in training, and where to stop."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids, _ = render_chat(tok, messages, add_generation_prompt=True, where="--prompt")
        return ids, tok.im_end_id
    return [tok.bos_id] + tok.encode(prompt), tok.eos_id


def cut_at_stop(new_ids: Sequence[int], stop_id: int) -> list[int]:
    """The generated ids before the first ``stop_id`` (generate pads finished rows with it)."""
    new_ids = list(new_ids)
    return new_ids[: new_ids.index(stop_id)] if stop_id in new_ids else new_ids


@torch.no_grad()
def sample(
    model,
    tok,
    prompt: str,
    chat: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 1337,
    num_samples: int = 1,
    system: str | None = None,
) -> list[str]:
    """``num_samples`` completions of ``prompt`` (the completion only, special tokens removed).

    ``temperature=0`` is greedy decoding. Sampling uses its own ``torch.Generator`` seeded with
    ``seed``, so the same call gives the same text and the global RNG is left alone.
    """
    ids, stop_id = prompt_ids(tok, prompt, chat, system)
    device = next(model.parameters()).device
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = model.generate(
        x,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=stop_id,
        use_cache=True,
        generator=gen,
    )  # (num_samples, T + n)
    return [
        tok.decode(cut_at_stop(row[len(ids) :].tolist(), stop_id), skip_special_tokens=True) for row in out
    ]


def _optional_int(v: str) -> int | None:
    return None if v.lower() in ("none", "0") else int(v)


def _optional_float(v: str) -> float | None:
    return None if v.lower() == "none" else float(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m z2all.sample", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True, help="z2all run folder (newest checkpoint) or HF Llama folder")
    p.add_argument("--prompt", default="", help="prompt text; FILE:path reads it from a file")
    p.add_argument("--chat", type=parse_bool, nargs="?", const=True, default=False, help="ChatML user turn")
    p.add_argument("--system", default=None, help="system message in --chat mode")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=_optional_int, default=None, help="keep the k most likely tokens (none)")
    p.add_argument("--top_p", type=_optional_float, default=None, help="nucleus sampling mass (none)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer_dir", default=None, help="override the run's tokenizer_dir")
    return p


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    setup_logging()
    prompt = args.prompt
    if prompt.startswith("FILE:"):
        prompt = Path(prompt[len("FILE:") :]).read_text(encoding="utf-8")
    model, tok = load_for_sampling(args.out_dir, args.tokenizer_dir, args.device)
    texts = sample(
        model,
        tok,
        prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
        system=args.system,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            sys.stdout.write(f"--- sample {i} ---\n")
        sys.stdout.write(prompt + text + "\n" if not args.chat else text + "\n")
    sys.stdout.flush()
    return texts


if __name__ == "__main__":
    run_model_tool(main, "python -m z2all.sample")
