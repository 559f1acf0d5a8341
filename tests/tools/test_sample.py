"""z2all.sample: KV-cache generation from a run folder equals a no-cache greedy reference; chat
prompts use the ChatML template and stop at <|im_end|>; sampling is reproducible per seed."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from z2all.data.chat import render_chat
from z2all.sample import cut_at_stop, load_for_sampling, main, prompt_ids, sample


def greedy_reference(model, ids: list[int], n: int, stop_id: int) -> list[int]:
    """Greedy decoding by re-running the full sequence each step (no KV cache)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == stop_id:
                break
            seq.append(nxt)
    return seq[len(ids) :]


def test_greedy_plain_and_chat_match_reference(tiny_run):
    model, tok = load_for_sampling(tiny_run.run_dir)
    for chat in (False, True):
        ids, stop_id = prompt_ids(tok, "Hello world 你好", chat)
        if chat:
            assert stop_id == tok.im_end_id
            expected_ids, _ = render_chat(tok, [{"role": "user", "content": "Hello world 你好"}], True)
            assert ids == expected_ids
        else:
            assert stop_id == tok.eos_id and ids[0] == tok.bos_id
        (text,) = sample(model, tok, "Hello world 你好", chat=chat, max_new_tokens=12, temperature=0.0)
        ref = greedy_reference(model, ids, 12, stop_id)
        assert text == tok.decode(ref, skip_special_tokens=True)


def test_sampling_is_seeded_and_cli_runs(tiny_run, capsys):
    model, tok = load_for_sampling(tiny_run.run_dir)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, num_samples=2)
    a = sample(model, tok, "abc", seed=1, **kw)
    assert a == sample(model, tok, "abc", seed=1, **kw) and len(a) == 2
    assert a != sample(model, tok, "abc", seed=2, **kw)
    texts = main([f"--out_dir={tiny_run.run_dir}", "--prompt=Hi", "--chat", "--max_new_tokens=5", "--seed=3"])
    assert capsys.readouterr().out.endswith(texts[0] + "\n")


def test_cli_stdout_holds_only_the_generated_text(tiny_run):
    """``python -m z2all.sample ... > out.txt`` captures the text alone; the log lines go to stderr."""
    model, tok = load_for_sampling(tiny_run.run_dir)
    (text,) = sample(model, tok, "Hi", max_new_tokens=6, temperature=0.0)
    cmd = [sys.executable, "-m", "z2all.sample", f"--out_dir={tiny_run.run_dir}", "--prompt=Hi"]
    cmd += ["--max_new_tokens=6", "--temperature=0", "--device=cpu"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run(cmd, capture_output=True, timeout=300, env=env)  # bytes: no newline translation
    out, err = res.stdout.decode("utf-8"), res.stderr.decode("utf-8")
    assert res.returncode == 0, err
    assert out == "Hi" + text + "\n"
    assert f"loaded model from {tiny_run.run_dir / 'step_000002'}" in err


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 3, 3, 3], 3) == [5, 6]
    assert cut_at_stop([5, 6], 3) == [5, 6]
    assert cut_at_stop([3, 7], 3) == []
