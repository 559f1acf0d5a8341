"""The quick-start demo: the whole path on built-in data, on a CPU, in a few minutes.

``python -m z2all.demo [--out_dir=demo_out] [--nproc=2]`` does what a user does by hand:

1. builds a small corpus from text that ships with Python (the standard library's docstrings and
   source), plus a small SFT set of "what does X do?" dialogues answered by those docstrings (and
   preference pairs made from them, for ``configs/demo_dpo.json``);
2. trains a byte-level BPE tokenizer;
3. pretokenizes the corpus into ``.bin`` files and builds the ``.ibin`` sample index;
4. pretrains the ``tiny`` model on ``--nproc`` CPU processes (gloo) through ``torchrun``;
5. fine-tunes it on the dialogues (SFT);
6. prints the loss curve's ends and a sample from the chat model.

Every step is the real command-line tool, run as a subprocess with an argument list; nothing here
is special to the demo except the data it makes.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from z2all.atomic import atomic_open
from z2all.log import setup_logging

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def _stdlib_files(limit_bytes: int) -> list[Path]:
    """Pure-Python stdlib modules in a fixed order, up to ``limit_bytes`` of source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        size = path.stat().st_size
        if total + size > limit_bytes:
            continue
        files.append(path)
        total += size
    return files


def _docstrings(path: Path) -> list[tuple[str, str]]:
    """(qualified name, docstring) of a module and its public top-level functions and classes.

    Parsed with ``ast``: nothing from the standard library is imported or executed.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        out.append((path.stem, module_doc))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                out.append((f"{path.stem}.{node.name}", doc))
    return out


def stdlib_corpus(limit_bytes: int = 3_000_000) -> tuple[list[str], list[list[dict]]]:
    """(pretraining documents, SFT dialogues) from the standard library, in a fixed order.

    Documents: each module's source, then its docstrings. Dialogues: "What does `name` do?" answered by
    the first paragraph of that docstring (10 to 400 characters), after a system message.
    Tests build their built-in corpus with this too, so it stays importable and free of side effects.
    """
    documents, dialogues = [], []
    for path in _stdlib_files(limit_bytes):
        documents.append(path.read_text(encoding="utf-8", errors="replace"))
        for name, doc in _docstrings(path):
            documents.append(doc)
            answer = doc.strip().split("\n\n")[0].strip()
            if 10 <= len(answer) <= 400:
                dialogues.append(
                    [
                        {"role": "system", "content": "You are a helpful Python assistant."},
                        {"role": "user", "content": f"What does `{name}` do?"},
                        {"role": "assistant", "content": answer},
                    ]
                )
    return documents, dialogues


def preference_pairs(dialogues: list[list[dict]]) -> list[dict]:
    """DPO pairs in the DPO-En-Zh-20k layout: each dialogue's own answer is chosen; the answer of the
    dialogue half the list away (another name's docstring: real text, wrong for this question) is rejected."""
    n = len(dialogues)
    pairs = []
    for i, (system, user, assistant) in enumerate(dialogues):
        pairs.append(
            {
                "system": system["content"],
                "history": [],
                "question": user["content"],
                "response_chosen": assistant["content"],
                "response_rejected": dialogues[(i + n // 2) % n][2]["content"],
            }
        )
    return pairs


def build_demo_data(data_dir: Path, limit_bytes: int = 3_000_000) -> dict:
    """Write ``pretrain/stdlib.jsonl`` (docs + source), ``sft/stdlib_qa.jsonl`` (message lists) and
    ``dpo/stdlib_pairs.jsonl`` (preference pairs, for ``configs/demo_dpo.json``) under ``data_dir``."""
    documents, dialogues = stdlib_corpus(limit_bytes)
    pairs = preference_pairs(dialogues)
    files = {
        "pretrain/stdlib.jsonl": [{"text": d} for d in documents],
        "sft/stdlib_qa.jsonl": dialogues,
        "dpo/stdlib_pairs.jsonl": pairs,
    }
    for name, records in files.items():
        with atomic_open(data_dir / name, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"pretrain_docs": len(documents), "sft_dialogues": len(dialogues), "dpo_pairs": len(pairs)}


def _run(cmd: list[str]) -> None:
    logger.info("$ %s", " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    logger.info("  done in %.1fs", time.time() - t0)


def _loss_ends(run_dir: Path) -> tuple[float, float, int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows[0]["loss"], rows[-1]["loss"], rows[-1]["step"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", default="demo_out", help="where data, tokenizer and runs go")
    ap.add_argument("--nproc", type=int, default=2, help="CPU processes for pretraining (torchrun, gloo)")
    ap.add_argument("--pretrain_iters", type=int, default=300)
    ap.add_argument("--sft_iters", type=int, default=150)
    args = ap.parse_args(argv)
    setup_logging()

    train_script = REPO_ROOT / "train_my_ddp.py"
    if not train_script.is_file():
        raise SystemExit(f"{train_script} not found: run the demo from a source checkout (pip install -e .)")
    out = Path(args.out_dir).resolve()
    data, tok, runs = out / "data", out / "tokenizer", out / "runs"
    py = sys.executable

    logger.info("[1/6] building the demo corpus from the Python standard library into %s", data)
    logger.info("  %s", build_demo_data(data))
    logger.info("[2/6] training a byte-level BPE tokenizer")
    _run(
        [
            py,
            "-m",
            "z2all.tokenizer.train_tokenizer",
            f"--data_dir={data / 'pretrain'}",
            f"--save_dir={tok}",
            "--vocab_size=4096",
            "--tokenizer_type=hf_bbpe",
        ]
    )
    logger.info("[3/6] pretokenizing and building the sample index")
    _run(
        [
            py,
            "-m",
            "data_preprocess.pretokenize_pretrain_data",
            f"--data_dir={data / 'pretrain'}",
            f"--tokenizer_dir={tok}",
            f"--save_dir={out / 'pretok'}",
            "--num_workers=2",
        ]
    )
    _run(
        [
            py,
            "-m",
            "data_preprocess.build_pretrain_sample_index_map",
            f"--data_dir={out / 'pretok'}",
            "--max_seq_len=256",
        ]
    )

    def train(config: str, *flags: str) -> None:
        _run(
            [
                py,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                str(train_script),
                str(REPO_ROOT / "configs" / config),
                f"--tokenizer_dir={tok}",
                *flags,
            ]
        )

    logger.info("[4/6] pretraining the tiny model on %d CPU processes", args.nproc)
    train(
        "demo_pretrain.json",
        f"--data_dir={out / 'pretok'}",
        f"--out_dir={runs / 'pretrain'}",
        f"--max_iters={args.pretrain_iters}",
    )
    logger.info("[5/6] supervised fine-tuning on the docstring dialogues")
    train(
        "demo_sft.json",
        f"--data_dir={data / 'sft'}",
        f"--init_from={runs / 'pretrain'}",
        f"--out_dir={runs / 'sft'}",
        f"--max_iters={args.sft_iters}",
    )
    logger.info("[6/6] sampling from the chat model")
    _run(
        [
            py,
            "-m",
            "z2all.sample",
            f"--out_dir={runs / 'sft'}",
            "--chat",
            "--prompt=What does `json.dumps` do?",
            "--max_new_tokens=60",
            "--temperature=0",
        ]
    )
    # The demo's results go to stdout (after the sample the chat step printed there); logs to stderr.
    for name in ("pretrain", "sft"):
        first, last, steps = _loss_ends(runs / name)
        print(f"{name}: loss {first:.3f} at step 1 -> {last:.3f} at step {steps}", flush=True)


if __name__ == "__main__":
    main()
