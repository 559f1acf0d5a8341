"""export_gguf: the GGUF file read back holds every weight in llama.cpp's layout, complete metadata, and
computes z2all's logits; where it may write; its errors. The tokenizer part: test_export_gguf_vocab.py.

Independent references (``tests/tools/gguf_helpers.py``): llama.cpp's pairwise rotary and a forward
pass written from the file alone; gguf's own tensor-name map. Tolerances: attention scores 1e-5
(float64 against z2all's float32 rotary tables, scores of order 1), logits 1e-4 (float32 model),
tensors exact.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.tools.conftest import usage_error
from tests.tools.gguf_helpers import fields, gguf_forward, rope_pairs, tensors
from z2all.export_gguf import build_parser, export_gguf, gguf_chat_template, main
from z2all.model import get_preset
from z2all.model.gguf_layout import GGUF_ARCH, check_gguf_compatible, gguf_name, rotary_to_interleaved
from z2all.model.kernels.rotary import eager_rotary
from z2all.model.rope import RotaryTables
from z2all.tokenizer import CHAT_TEMPLATE, INFERENCE_CHAT_TEMPLATE, Z2allTokenizer

gguf = pytest.importorskip("gguf")

PROG_ERROR = "python -m z2all.export_gguf: error: "
GGML_TYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module", params=["hf_bbpe", "sp_bbpe"])
def run(request, tiny_run, tiny_sp_run):
    """tiny_run (hf_bbpe, tied, plain RoPE) or tiny_sp_run (sp_bbpe, untied, linear RoPE x2)."""
    return tiny_run if request.param == "hf_bbpe" else tiny_sp_run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """dtype -> the GGUF file of ``run`` exported in that dtype."""
    out = tmp_path_factory.mktemp("gguf")
    return {d: export_gguf(run.run_dir, out / f"model-{d}.gguf", dtype=d) for d in GGML_TYPE}


def interleaved_to_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse row order, written out separately: row ``2i + c`` of each head back to ``c*D/2 + i``."""
    rows, cols = weight.shape
    d = rows // n_heads
    out = torch.empty_like(weight)
    for h in range(n_heads):
        for i in range(d // 2):
            for c in (0, 1):
                out[h * d + c * d // 2 + i] = weight[h * d + 2 * i + c]
    return out


# --- the layout -------------------------------------------------------------------------------------
def test_the_rotary_permutation_turns_rotate_half_into_llama_cpp_pairs():
    """q.k scores with llama.cpp's pairwise rotary on the permuted weights equal z2all's rotate_half
    rotary on the originals (GQA: 4 query heads, 2 kv heads); unpermuted weights do not."""
    cfg = get_preset("tiny")
    n_head, n_kv, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    gen = torch.Generator().manual_seed(0)
    wq = torch.randn(n_head * d, h, generator=gen) * 0.02
    wk = torch.randn(n_kv * d, h, generator=gen) * 0.02
    x = torch.randn(32, h, generator=gen, dtype=torch.float64)
    pos = torch.arange(32)
    assert torch.equal(interleaved_to_rotary(rotary_to_interleaved(wq, n_head), n_head), wq)
    assert torch.equal(interleaved_to_rotary(rotary_to_interleaved(wk, n_kv), n_kv), wk)

    # z2all: (1, H, T, D) through its own tables and kernel
    cos, sin = RotaryTables(cfg)(pos[None])
    q = (x @ wq.double().T).view(32, n_head, d).transpose(0, 1)[None]
    k = (x @ wk.double().T).view(32, n_kv, d).transpose(0, 1)[None]
    q, k = eager_rotary(q, k, cos, sin)
    ours = torch.einsum("hqd,hkd->hqk", q[0], k[0].repeat_interleave(n_head // n_kv, dim=0))

    def llama_cpp_scores(wq_, wk_):
        q_ = rope_pairs((x @ wq_.double().T).view(32, n_head, d), pos, cfg.rope_theta)
        k_ = rope_pairs((x @ wk_.double().T).view(32, n_kv, d), pos, cfg.rope_theta)
        return torch.einsum("qhd,khd->hqk", q_, k_.repeat_interleave(n_head // n_kv, dim=1))

    theirs = llama_cpp_scores(rotary_to_interleaved(wq, n_head), rotary_to_interleaved(wk, n_kv))
    assert ours.abs().max() > 0.1  # scores of order 1: the tolerance below means something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert not torch.allclose(llama_cpp_scores(wq, wk), ours, rtol=0, atol=1e-2)


def test_gguf_names_agree_with_gguf_s_own_tensor_map(tiny_sp_run):
    cfg = tiny_sp_run.model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name in tiny_sp_run.model.state_dict():
        assert gguf_name(name) == name_map.get_name(name, try_suffixes=(".weight",)), name
    assert GGUF_ARCH == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")


@pytest.mark.parametrize("dtype", list(GGML_TYPE))
def test_every_tensor_equals_the_model_weight_after_the_layout_change(run, exported, dtype):
    cfg = run.model.config
    got = tensors(exported[dtype])
    expected = {}
    for name, w in run.model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd
        if name.endswith("q_proj.weight"):
            w = rotary_to_interleaved(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = rotary_to_interleaved(w, cfg.num_key_value_heads)
        expected[gguf_name(name)] = w.to(torch.float32 if w.dim() == 1 else TORCH_DTYPE[dtype])
    assert set(got) == set(expected)
    assert ("output.weight" in got) == (not cfg.tie_word_embeddings)
    for name, w in expected.items():
        ggml_type, ne, value = got[name]
        assert ggml_type == ("F32" if w.dim() == 1 else GGML_TYPE[dtype]), name
        assert ne == list(reversed(w.shape)), name  # innermost first: {n_embd, n_out}
        assert value.dtype == w.dtype and torch.equal(value, w), name


def test_metadata_is_complete_and_right(run, exported):
    cfg = run.model.config
    tok = Z2allTokenizer.from_pretrained(run.tokenizer_dir)
    meta = fields(exported["bfloat16"])
    sp = tok.tokenizer_type == "sp_bbpe"
    expected = {
        "general.architecture": "llama",
        "general.name": run.run_dir.name,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_BF16),
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.rope.dimension_count": cfg.head_dim,
        "llama.rope.freq_base": cfg.rope_theta,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(cfg.rms_norm_eps, rel=1e-6),  # float32
        "llama.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "llama" if sp else "gpt2",
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.unknown_token_id": tok.unk_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.eot_token_id": tok.im_end_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": INFERENCE_CHAT_TEMPLATE,
    }
    if sp:  # tiny_sp_run: linear RoPE scaling, sentencepiece settings
        expected["llama.rope.scaling.type"] = "linear"
        expected["llama.rope.scaling.factor"] = cfg.rope_scaling["factor"]
        expected["tokenizer.ggml.add_space_prefix"] = False
    else:
        expected["tokenizer.ggml.pre"] = "gpt-2"
    arrays = {"tokens", "token_type"} | ({"scores"} if sp else {"merges"})
    reader_fields = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    assert set(meta) == set(expected) | {f"tokenizer.ggml.{a}" for a in arrays} | reader_fields
    for key, value in expected.items():
        assert meta[key] == value, key
    for a in ("tokens", "token_type") + (("scores",) if sp else ()):
        assert len(meta[f"tokenizer.ggml.{a}"]) == cfg.vocab_size, a  # one per embedding row
    assert meta["GGUF.tensor_count"] == len(tensors(exported["bfloat16"]))


def test_a_forward_pass_from_the_file_alone_gives_z2all_s_logits(run, exported):
    """The whole file, read as llama.cpp reads it (names, shapes, pairwise rotary, linear scaling from
    the metadata, GQA, eps, tied or untied head), computes the logits of the model it came from."""
    tok = Z2allTokenizer.from_pretrained(run.tokenizer_dir)
    ids = tok.encode(
        "床前明月光，疑是地上霜。 The quick brown fox jumps over the lazy dog. def f(x): return x"
    )
    ids = (ids * 8)[:40]
    with torch.no_grad():
        ref = run.model(torch.tensor([ids])).logits[0].double()
    got = gguf_forward(exported["float32"], ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_chat_template_for_inference_engines():
    assert gguf_chat_template(CHAT_TEMPLATE) == INFERENCE_CHAT_TEMPLATE
    assert gguf_chat_template(INFERENCE_CHAT_TEMPLATE) == INFERENCE_CHAT_TEMPLATE  # a folder from before
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert gguf_chat_template(custom) == custom


def test_dynamic_rope_scaling_is_refused():
    check_gguf_compatible(get_preset("tiny", rope_scaling={"rope_type": "linear", "factor": 4.0}))
    with pytest.raises(ValueError, match="no dynamic-NTK RoPE"):
        check_gguf_compatible(get_preset("tiny", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))


# --- where it may write, errors ---------------------------------------------------------------------
def refused(capsys, argv: list[str]) -> str:
    return usage_error(capsys, main, argv, "python -m z2all.export_gguf")


def test_save_path_rules(tiny_run, tmp_path, capsys):
    run = ["--out_dir", str(tiny_run.run_dir)]
    target = tmp_path / "model.gguf"
    main([*run, "--save_path", str(target)])
    first = target.read_bytes()
    assert first[:4] == b"GGUF"
    err = refused(capsys, [*run, "--save_path", str(target)])
    assert f"--save_path={target} exists: pass --overwrite" in err
    main([*run, "--save_path", str(target), "--overwrite", "--dtype", "float16"])
    assert target.read_bytes() != first
    assert fields(target)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)

    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    err = refused(capsys, [*run, "--save_path", str(notes), "--overwrite"])
    assert f"--save_path={notes} exists and is not a GGUF file" in err
    assert notes.read_text() == "keep me"
    err = refused(capsys, [*run, "--save_path", str(tmp_path)])
    assert f"--save_path={tmp_path} is a folder" in err
    ckpt = tiny_run.run_dir / "step_000002"
    err = refused(capsys, [*run, "--save_path", str(ckpt / "model.gguf")])
    assert f"{ckpt} is a checkpoint folder" in err
    assert not (ckpt / "model.gguf").exists()
    err = refused(capsys, [*run, "--save_path", str(tmp_path / "x.gguf"), "--dtype", "float8"])
    assert "invalid choice: 'float8'" in err
    with pytest.raises(ValueError, match="--dtype must be one of"):
        export_gguf(tiny_run.run_dir, tmp_path / "x.gguf", dtype="int4")
    # A symlinked --save_path: the file it names gets the export, the link stays a link.
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    main([*run, "--save_path", str(link), "--overwrite"])
    assert link.is_symlink() and fields(target)["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "model.gguf", "notes.txt"]


def test_a_failed_export_leaves_no_file_and_keeps_the_previous_one(tiny_run, tmp_path, monkeypatch):
    target = export_gguf(tiny_run.run_dir, tmp_path / "model.gguf")
    before = target.read_bytes()

    def crash(self):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_run.run_dir, tmp_path / "new.gguf")
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_run.run_dir, target, dtype="bfloat16", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temp file either
    assert target.read_bytes() == before


def test_without_the_gguf_package_it_says_how_to_install_it(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    err = refused(capsys, ["--out_dir", str(tiny_run.run_dir), "--save_path", str(tmp_path / "m.gguf")])
    assert "install with pip install z2all[gguf]" in err
    assert not (tmp_path / "m.gguf").exists()


def test_command_line_errors_without_traceback_and_with_debug(tiny_run, tmp_path):
    empty = tmp_path / "empty_run"  # a run with its config (and tokenizer) but no checkpoint yet
    empty.mkdir()
    (empty / "config.json").write_bytes((tiny_run.run_dir / "config.json").read_bytes())
    cmd = [
        sys.executable,
        "-m",
        "z2all.export_gguf",
        f"--out_dir={empty}",
        f"--save_path={tmp_path / 'm.gguf'}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"{PROG_ERROR}{empty}: neither a z2all run folder" in res.stderr
    res = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" in res.stderr and "FileNotFoundError" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run"]


def test_the_flags_are_the_documented_ones():
    """A renamed flag breaks docs/export.md and users' scripts: change this list consciously."""
    flags = sorted(a.option_strings[0] for a in build_parser()._actions if a.option_strings)
    expected = ["--debug", "--dtype", "--out_dir", "--overwrite", "--save_path", "--tokenizer_dir", "-h"]
    assert flags == expected
