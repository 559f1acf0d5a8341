"""export_hf: the exported folder loads with transformers' Auto classes and gives the same logits;
load_model_from_dir reads run folders, single checkpoints and Hugging Face folders."""

from __future__ import annotations

import pytest
import torch

from z2all.export_hf import export_hf, main
from z2all.tokenizer import Z2allTokenizer
from z2all.training.model_loading import load_model_from_dir

transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "床前明月光，疑是地上霜。 def f(x): return x"]


def first_ids(tok: Z2allTokenizer, text: str, n: int = 24) -> list[int]:
    """The first ``n`` ids of ``text``, repeated until it has that many. Without the shared corpora the
    tiny tokenizer is trained on these very sentences, so one copy can take fewer than ``n`` ids."""
    copies = 1
    while len(ids := tok.encode(" ".join([text] * copies))) < n:
        copies += 1
    return ids[:n]


def test_load_model_from_run_dir_is_exact(tiny_run):
    model, cfg = load_model_from_dir(tiny_run.run_dir)
    assert cfg == tiny_run.model.config and not model.training
    expected = tiny_run.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    one_ckpt, _ = load_model_from_dir(tiny_run.run_dir / "step_000002")
    assert torch.equal(one_ckpt.lm_head.weight, tiny_run.model.lm_head.weight)


def test_export_loads_in_transformers_with_equal_logits(tiny_run, tmp_path):
    save_dir = main(["--out_dir", str(tiny_run.run_dir), "--save_dir", str(tmp_path / "hf")])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in save_dir.iterdir()
    }
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(save_dir, torch_dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(save_dir)
    tok = Z2allTokenizer.from_pretrained(tiny_run.tokenizer_dir)
    assert (hf_model.config.bos_token_id, hf_model.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    gen = transformers.GenerationConfig.from_pretrained(save_dir)
    assert gen.eos_token_id == [tok.eos_id, tok.im_end_id] and gen.pad_token_id == tok.pad_id
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)

    ids = torch.tensor([first_ids(tok, TEXTS[0]), first_ids(tok, TEXTS[1])])  # (2, 24)
    with torch.no_grad():
        ref = tiny_run.model(ids).logits
        got = hf_model(ids).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)

    # ... and the exported folder is itself a valid --init_from / --out_dir for z2all and sample.
    from z2all.sample import load_for_sampling

    back, back_tok = load_for_sampling(save_dir)
    assert back_tok.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=1e-6)


def test_export_bf16_and_errors(tiny_run, tmp_path):
    from safetensors.torch import load_file

    out = export_hf(tiny_run.run_dir, tmp_path / "bf16", dtype="bfloat16")
    tensors = load_file(str(out / "model.safetensors"))
    expected = tiny_run.model.state_dict()
    assert "lm_head.weight" not in tensors  # tied: transformers re-ties it from the embedding
    for k, v in tensors.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, expected[k].to(torch.bfloat16)), k
    with pytest.raises(ValueError, match="--dtype"):
        export_hf(tiny_run.run_dir, tmp_path / "x", dtype="float8")
    with pytest.raises(FileNotFoundError, match="neither a z2all run folder"):
        load_model_from_dir(tmp_path / "empty")


def test_load_model_from_dir_falls_back_and_reads_run_config(tiny_run, tmp_path, caplog):
    import json
    import shutil

    from z2all.training.checkpoint import CheckpointManager

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    newer, _ = load_model_from_dir(run)
    with torch.no_grad():
        newer.lm_head.weight.add_(1.0)  # tied: changes the embedding too
    CheckpointManager(run).save(3, newer, None, {"step": 3})
    assert torch.equal(load_model_from_dir(run)[0].lm_head.weight, newer.lm_head.weight)

    data = next((run / "step_000003" / "state").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])  # truncated newest: warning, previous checkpoint
    with caplog.at_level("WARNING", logger="z2all"):
        model, _ = load_model_from_dir(run)
    assert torch.equal(model.lm_head.weight, tiny_run.model.lm_head.weight)
    assert any("step_000003" in r.getMessage() for r in caplog.records)

    # A manifest without model_config: the run config's resolved "model" dict is used instead.
    manifest_path = run / "step_000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    cfg_dict = manifest.pop("model_config")
    manifest_path.write_text(json.dumps(manifest))
    run_cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**run_cfg, "model": cfg_dict}))
    model, cfg = load_model_from_dir(run / "step_000002")
    assert cfg == tiny_run.model.config
    assert torch.equal(model.lm_head.weight, tiny_run.model.lm_head.weight)


def test_model_loading_names_still_importable_from_checkpoint():
    """Compatibility: the names moved to z2all.training.model_loading are re-exported."""
    from z2all.training import checkpoint, model_loading

    assert checkpoint.load_model_from_dir is model_loading.load_model_from_dir
    assert checkpoint.find_tokenizer_dir is model_loading.find_tokenizer_dir
    assert checkpoint._run_model_config is model_loading._run_model_config
