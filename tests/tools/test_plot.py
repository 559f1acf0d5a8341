"""z2all.plot: PNG from one or more runs' metrics.jsonl; clear errors for missing or bad metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from z2all.plot import plot_runs, read_metrics, series

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, n: int, val_every: int = 3, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, n + 1):
        rec = {
            "step": step,
            "loss": 5.0 / step,
            "lr": 1e-3 * step / n,
            "grad_norm": 1.0,
            "tokens_per_s": 900.0,
        }
        if step % val_every == 0:
            rec["val_loss"] = 5.5 / step
        lines.append(json.dumps(rec))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)


def test_two_runs_to_png(tmp_path):
    write_metrics(tmp_path / "a", 10)
    write_metrics(tmp_path / "b", 6, tail='{"step": 7, "lo')  # writer killed mid-line: skipped
    out = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert series(read_metrics(tmp_path / "a"), "val_loss")[0] == [3, 6, 9]


def test_cli_default_output(tmp_path):
    write_metrics(tmp_path / "run", 4)
    subprocess.run([sys.executable, "-m", "z2all.plot", str(tmp_path / "run")], check=True, timeout=120)
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    bad = subprocess.run(
        [sys.executable, "-m", "z2all.plot", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("python -m z2all.plot: error: ")
    assert "nothing/metrics.jsonl" in bad.stderr and "Traceback" not in bad.stderr


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_runs([tmp_path / "nothing"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics records"):
        read_metrics(empty)
    write_metrics(tmp_path / "ok", 3)
    with pytest.raises(ValueError, match="none of the metrics"):
        plot_runs([tmp_path / "ok"], metrics=("mfu",))
