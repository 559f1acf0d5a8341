"""An exported GGUF file in llama.cpp itself, through llama-cpp-python: it loads, tokenizes like
z2all, computes z2all's logits and greedy continuation, and knows the end-of-turn token.

Skipped where ``llama_cpp`` is not importable (it is no dependency of z2all: ``pip install
llama-cpp-python`` compiles llama.cpp). Tolerance: logits 2e-3 for float32 weights over 64 positions
(llama.cpp's own float32 kernels and rotary tables; measured ~1e-3 here).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from tests.tools.test_export_gguf_vocab import TEXTS, real_texts
from z2all.export_gguf import export_gguf
from z2all.tokenizer import INFERENCE_CHAT_TEMPLATE, Z2allTokenizer

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module", params=["hf_bbpe", "sp_bbpe"])
def loaded(request, tiny_run, tiny_sp_run, tmp_path_factory):
    run = tiny_run if request.param == "hf_bbpe" else tiny_sp_run
    path = export_gguf(run.run_dir, tmp_path_factory.mktemp("llama_cpp") / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    yield llm, run, Z2allTokenizer.from_pretrained(run.tokenizer_dir)
    llm.close()


def _detokenize(llm, ids: list[int]) -> bytes:
    """llama.cpp's text of ``ids``, token by token (``Llama.detokenize`` cuts pieces over 32 bytes)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(1024)
    out = b""
    for i in ids:
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, False)
        assert 0 <= n <= len(buf)
        out += buf.raw[:n]
    return out


def _same_ids(llm, tok, texts):
    plain = [t for t in texts if "\u2581" not in t]  # z2all's sp_bbpe keeps a literal "▁" as bytes
    for text in plain:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text), text[:80]
        assert _detokenize(llm, tok.encode(text)) == text.encode("utf-8"), text[:80]


def test_llama_cpp_tokenizes_like_z2all(loaded):
    llm, _, tok = loaded
    _same_ids(llm, tok, TEXTS)


def test_llama_cpp_tokenizes_like_z2all_on_real_text(loaded, shared_data):
    llm, _, tok = loaded
    _same_ids(llm, tok, real_texts(shared_data))


def test_llama_cpp_logits_and_greedy_output_match(loaded):
    llm, run, tok = loaded
    ids = (tok.encode("The quick brown fox jumps over the lazy dog. 床前明月光，疑是地上霜。") * 8)[:64]
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ref = run.model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3)

    cur = ids[:16]
    for _ in range(12):
        with torch.no_grad():
            cur.append(int(run.model(torch.tensor([cur])).logits[0, -1].argmax()))
    greedy = []
    for t in llm.generate(ids[:16], top_k=1, temp=0.0, reset=True):
        greedy.append(t)
        if len(greedy) == 12:
            break
    assert greedy == cur[16:]


def test_llama_cpp_reads_the_chat_settings(loaded):
    llm, _, tok = loaded
    assert llm.metadata["tokenizer.chat_template"] == INFERENCE_CHAT_TEMPLATE
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_eot(vocab) == tok.im_end_id
    assert llama_cpp.llama_vocab_is_eog(vocab, tok.im_end_id) and llama_cpp.llama_vocab_is_eog(
        vocab, tok.eos_id
    )
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)
