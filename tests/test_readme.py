"""The user-facing surface: the README's two quick-start commands are what CI and the demo run."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _quick_start_commands(readme: str) -> list[str]:
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    en = _quick_start_commands((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    zh = _quick_start_commands((REPO_ROOT / "README_zh.md").read_text(encoding="utf-8"))
    assert len(en) == 2, en
    assert en == zh, "the Chinese quick start must give the same two commands"
    demo, test = en
    assert "python -m z2all.demo" in demo
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    ran = [line for line in ci.splitlines() if line.startswith(test)]
    assert ran == [f"{test} || exit 1"], f"CI must run the README's test command verbatim: {test!r}"


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """The quick-start demo, fewer steps: tokenizer, pretokenize, index, torchrun pretrain + SFT, sample."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "z2all.demo", f"--out_dir={out}", "--pretrain_iters=40", "--sft_iters=20"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    pre = [json.loads(x) for x in (out / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in pre] == list(range(1, 41))
    assert pre[-1]["loss"] < pre[0]["loss"] - 1.0, "pretraining loss must fall on the demo corpus"
    sft = [json.loads(x) for x in (out / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft[-1]["step"] == 20
    assert "sft: loss" in proc.stdout
