"""The two halves of ``benchmarks/gpu_suite.sh`` that are not shell: record one part, print the table.

    python benchmarks/gpu_summary.py record OUT NAME --what TEXT --rc RC --seconds S --budget B \
        [--smoke] -- CMD...
    python benchmarks/gpu_summary.py table OUT        # prints markdown, also writes OUT/summary.md

``record`` turns what a part left in ``OUT`` (``NAME.stdout``: the benchmark's JSON; ``NAME.xml``: a
pytest JUnit report; ``NAME.log``: its stderr) into ``OUT/NAME.json``::

    {"part", "what", "command", "rc", "status", "seconds", "budget_s", "started", "smoke", "result",
     "log_tail"}

``status`` is ``ok``, ``skipped`` (the benchmark said so, e.g. no CUDA), ``timeout`` (``timeout``'s
codes 124 and 137) or ``failed`` (any other non-zero code, or no result at all); it exits 1 unless
``ok`` or ``skipped``. ``table`` reads every part file and prints one row per part in the order they
ran (what | command | result | status), then fused kernels vs eager side by side: rows to paste into
BENCHMARKS.md, with the machine in the heading.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

TIMEOUT_CODES = (124, 137)  # timeout(1): the budget ran out; 137 = killed after --kill-after
LOG_TAIL_LINES = 15
MFU_LABELS = {"mfu_fused": "fused (auto)", "mfu_torch": "PyTorch only", "mfu_eager": "eager"}
KERNEL_LIBS = ("flash_attn", "apex", "xformers", "liger_kernel")  # the env part's libraries worth a column


def last_json_object(text: str) -> dict | None:
    """The last JSON object printed on a line of its own (benchmarks print one; indented is fine)."""
    decoder = json.JSONDecoder()
    lines = text.splitlines()
    found = None
    for i, line in enumerate(lines):
        if not line.startswith("{"):
            continue
        try:
            obj, _ = decoder.raw_decode("\n".join(lines[i:]))
        except ValueError:
            continue
        if isinstance(obj, dict):
            found = obj
    return found


def junit_counts(path: Path) -> dict:
    """``{"tests", "passed", "failed", "errors", "skipped"}`` summed over a JUnit report's suites."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = counts.pop("failures")
    passed = counts["tests"] - failed - counts["errors"] - counts["skipped"]
    return {"tests": counts["tests"], "passed": passed, "failed": failed, **counts}


def record(args: argparse.Namespace) -> int:
    out = Path(args.out)
    stdout = out / f"{args.name}.stdout"
    junit = out / f"{args.name}.xml"
    log = out / f"{args.name}.log"
    result = junit_counts(junit) if junit.is_file() else None
    if result is None and stdout.is_file():
        result = last_json_object(stdout.read_text(encoding="utf-8", errors="replace"))
    if args.rc in TIMEOUT_CODES:
        status = "timeout"
    elif args.rc != 0 or result is None:
        status = "failed"
    else:
        status = "skipped" if isinstance(result.get("skipped"), str) else "ok"  # not a test count
    tail = []
    if status != "ok" and log.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
    part = {
        "part": args.name,
        "what": args.what,
        "command": args.command,
        "rc": args.rc,
        "status": status,
        "seconds": args.seconds,
        "budget_s": args.budget,
        "started": round(time.time() - args.seconds, 1),
        "smoke": args.smoke,
        "result": result,
        "log_tail": tail,
    }
    (out / f"{args.name}.json").write_text(json.dumps(part, indent=2) + "\n", encoding="utf-8")
    return 0 if status in ("ok", "skipped") else 1


# ------------------------------------------------------------------------------------------ table
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _result_text(part: dict) -> str:
    """One line saying what the part measured (or why it has no result)."""
    r = part["result"] or {}
    if part["status"] in ("failed", "timeout"):
        why = next((line.strip() for line in reversed(part["log_tail"]) if line.strip()), "")
        head = "timed out" if part["status"] == "timeout" else f"exit {part['rc']}"
        return f"{head} after {part['seconds']} s" + (f": {why[:120]}" if why else "")
    if "tests" in r:
        return f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if r.get("bench") == "mfu":
        mfu = f"MFU **{100 * r['mfu']:.1f} %**" if r.get("mfu") is not None else "MFU n/a (no peak FLOP/s)"
        mem = f", peak {r['max_memory_gib']} GiB" if r.get("max_memory_gib") is not None else ""
        return f"{mfu}, {r['tokens_per_s']:,.0f} tokens/s, {r['step_s']} s/step{mem} ({r['device']})"
    if r.get("benchmark") == "ddp_step":
        ms = r["median_step_ms"]
        ratio = r["ratio_vs_torch_ddp"]
        return (
            f"z2all DDP {ms['ours_overlap=True']} ms ({ratio['ours_overlap=True']}x torch DDP's "
            f"{ms['torch_ddp']} ms), no overlap {ratio['ours_overlap=False']}x; {r['backend']}, "
            f"{r['world_size']} rank, {r['params']:,} params"
        )
    if r.get("benchmark") == "ddp_train_loop_step":
        ms = r["median_step_ms"]
        return (
            f"train step z2all {ms['z2all']} ms vs torch DDP {ms['torch']} ms: "
            f"**{r['ratio_z2all_vs_torch']}x**; {r['backend']}, {r['world_size']} rank, {r['model']}"
        )
    if "kernel_backends" in r:  # python -m z2all.env --json
        libs = ", ".join(f"{k} {v or '-'}" for k, v in r["libraries"].items() if k in KERNEL_LIBS)
        return f"torch {r['torch']}, CUDA {r['cuda']}, NCCL {r['nccl']}; {libs}"
    return json.dumps(r)[:200]


def _heading(parts: list[dict], out: Path) -> list[str]:
    env = next((p["result"] for p in parts if p["part"] == "env" and p["result"]), None) or {}
    devices = ", ".join(env.get("devices", [])) or "unknown device"
    when = time.strftime("%Y-%m-%d", time.localtime(min(p["started"] for p in parts)))
    lines = [f"### GPU suite, {when}: {devices}", ""]
    if env:
        versions = f"torch {env.get('torch')}, CUDA {env.get('cuda')}, NCCL {env.get('nccl')}"
        lines += [f"{versions}; results in `{out}`", ""]
    if any(p["smoke"] for p in parts):
        lines += ["**Smoke run (CPU, tiny sizes): it checks the suite itself; no figure for BENCHMARKS.md.**"]
        lines += [""]
    return lines


def _kernel_table(parts: list[dict]) -> list[str]:
    """Fused vs PyTorch-only vs eager kernels of the same MFU step, when at least two of them ran."""
    runs = {p["part"]: p["result"] for p in parts if p["part"] in MFU_LABELS and p["status"] == "ok"}
    if len(runs) < 2:
        return []
    base = runs.get("mfu_eager")
    lines = [
        "",
        "| kernels | backends | tokens/s | speed vs eager | peak memory GiB | memory vs eager |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        backends = ", ".join(f"{op}={b}" for op, b in r["kernels"].items())
        speed = mem_ratio = "—"
        if base:
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
            if r.get("max_memory_gib") and base.get("max_memory_gib"):
                mem_ratio = f"{r['max_memory_gib'] / base['max_memory_gib']:.2f}x"
        mem = r.get("max_memory_gib") if r.get("max_memory_gib") is not None else "—"
        lines.append(
            f"| {MFU_LABELS[name]} | {backends} | {r['tokens_per_s']:,.0f} | {speed} | {mem} | {mem_ratio} |"
        )
    return lines


def table(args: argparse.Namespace) -> int:
    out = Path(args.out)
    parts = []
    for path in out.glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "part" in data:
            parts.append(data)
    if not parts:
        print(f"gpu_summary.py: error: no part results (*.json) in {out}", file=sys.stderr)
        return 2
    parts.sort(key=lambda p: p["started"])
    lines = _heading(parts, out)
    lines += ["| what | command | result | status |", "| --- | --- | --- | --- |"]
    for p in parts:
        command = shlex.join(p["command"]).replace(str(out), "$OUT")
        status = f"{p['status']}, {p['seconds']} s of {p['budget_s']}"
        lines.append(f"| {_cell(p['what'])} | `{_cell(command)}` | {_cell(_result_text(p))} | {status} |")
    lines += _kernel_table(parts)
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("record", help="write OUT/NAME.json for one finished part")
    r.add_argument("out")
    r.add_argument("name")
    r.add_argument("--what", required=True, help="what the part measures, for the table")
    r.add_argument("--rc", type=int, required=True, help="the part's exit code")
    r.add_argument("--seconds", type=int, required=True, help="how long it ran")
    r.add_argument("--budget", type=int, required=True, help="its timeout in seconds")
    r.add_argument("--smoke", action="store_true", help="a smoke run (CPU, tiny sizes)")
    t = sub.add_parser("table", help="print the markdown table of every part in OUT")
    t.add_argument("out")
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.command = argv[split + 1 :]
    return record(args) if args.action == "record" else table(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
