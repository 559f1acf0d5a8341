"""export_hf: the exported folder loads with transformers' Auto classes and gives the same logits;
load_model_from_dir reads run folders, single checkpoints and Hugging Face folders."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from tests.tools.conftest import usage_error
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


def test_load_model_from_dir_falls_back_and_needs_the_manifest_config(tiny_run, tmp_path, caplog):
    import json
    import shutil

    from z2all.training.checkpoint import CheckpointManager
    from z2all.training.state import TrainProgress, TrainState

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    newer, _ = load_model_from_dir(run)
    with torch.no_grad():
        newer.lm_head.weight.add_(1.0)  # tied: changes the embedding too
    CheckpointManager(run).save(3, TrainState.of(newer, progress=TrainProgress(step=3)))  # no optimizer
    assert torch.equal(load_model_from_dir(run)[0].lm_head.weight, newer.lm_head.weight)

    data = next((run / "step_000003" / "state").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])  # truncated newest: warning, previous checkpoint
    with caplog.at_level("WARNING", logger="z2all"):
        model, _ = load_model_from_dir(run)
    assert torch.equal(model.lm_head.weight, tiny_run.model.lm_head.weight)
    assert any("step_000003" in r.getMessage() for r in caplog.records)

    # A manifest without model_config is no z2all model checkpoint: refused, even when the run's
    # config.json holds a resolved "model" dict (the manifest is the one record of the saved model).
    manifest_path = run / "step_000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    cfg_dict = manifest.pop("model_config")
    manifest_path.write_text(json.dumps(manifest))
    run_cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**run_cfg, "model": cfg_dict}))
    with pytest.raises(FileNotFoundError, match=r"step_000002: no model_config in manifest\.json"):
        load_model_from_dir(run / "step_000002")


# --- where an export may go -------------------------------------------------------------------------
PROG_ERROR = "python -m z2all.export_hf: error: "


def refused(capsys, argv: list[str]) -> str:
    return usage_error(capsys, main, argv, "python -m z2all.export_hf")


def test_export_into_its_own_run_folder_is_refused_from_the_command_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cmd = [sys.executable, "-m", "z2all.export_hf", f"--out_dir={run}", f"--save_dir={run}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert f"{PROG_ERROR}--save_dir={run}: {run} is a z2all run folder (it holds " in res.stderr
    # --overwrite never makes a run folder a valid target.
    refused(capsys, ["--out_dir", str(run), "--save_dir", str(run), "--overwrite"])
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # config.json untouched: --resume still works


@pytest.mark.parametrize(
    "marker", ["metrics.jsonl", "run_info.json", "step_000007/", "config.json", "manifest.json"]
)
@pytest.mark.parametrize("below", ["", "exports/hf"])
def test_a_target_in_or_below_any_run_folder_is_refused(tiny_run, tmp_path, capsys, marker, below):
    other_run = tmp_path / "other_run"  # a fresh run holds only config.json; a checkpoint, manifest.json
    if marker.endswith("/"):
        (other_run / marker).mkdir(parents=True)
    else:
        other_run.mkdir()
        text = '{"task_type": "sft"}' if marker == "config.json" else "{}"
        (other_run / marker).write_text(text)
    target = other_run / below if below else other_run
    err = refused(capsys, ["--out_dir", str(tiny_run.run_dir), "--save_dir", str(target)])
    assert f"{other_run} is a z2all run folder (it holds {marker}" in err
    assert sorted(p.name for p in other_run.iterdir()) == [marker.rstrip("/")]


def test_non_empty_target_needs_overwrite_and_overwrite_replaces_only_an_export(tiny_run, tmp_path, capsys):
    run = ["--out_dir", str(tiny_run.run_dir)]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    err = refused(capsys, [*run, "--save_dir", str(notes)])
    assert f"--save_dir={notes} is not empty" in err and "--overwrite" in err
    err = refused(capsys, [*run, "--save_dir", str(notes), "--overwrite"])
    assert f"--save_dir={notes} is not empty and is not a Hugging Face model folder" in err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = refused(capsys, [*run, "--save_dir", str(a_file)])
    assert f"--save_dir={a_file} exists and is not a folder" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    hf = main([*run, "--save_dir", str(empty)])  # an empty folder needs no --overwrite
    assert (hf / "model.safetensors").is_file()
    (hf / "stale.bin").write_bytes(b"from an older export")
    assert f"--save_dir={hf} is not empty" in refused(capsys, [*run, "--save_dir", str(hf)])
    main([*run, "--save_dir", str(hf), "--overwrite", "--dtype", "bfloat16"])
    assert "stale.bin" not in {p.name for p in hf.iterdir()}  # replaced whole, not merged
    assert '"dtype": "bfloat16"' in (hf / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "notes"]  # no temp folders left

    # An export re-read as --out_dir may not replace itself or a folder above it.
    for target in (hf, tmp_path):
        err = refused(capsys, ["--out_dir", str(hf), "--save_dir", str(target), "--overwrite"])
        assert f"--save_dir={target} holds the --out_dir={hf} being exported" in err
    # A symlinked --save_dir: the folder it names gets the export, the link stays a link.
    link = tmp_path / "link"
    link.symlink_to(empty, target_is_directory=True)
    main([*run, "--save_dir", str(link), "--overwrite"])
    assert link.is_symlink() and (empty / "model.safetensors").is_file()


def test_a_failed_export_leaves_no_complete_looking_folder(tiny_run, tmp_path, monkeypatch):
    """The export is built in a hidden temp folder beside the target and renamed onto it at the end, so
    a crash (here: while copying the tokenizer, after the weights and config.json were written) leaves
    no target, or the previous export untouched."""
    import z2all.export_hf as export_module

    def crash(*args, **kwargs):
        raise OSError("disk full")

    previous = export_hf(tiny_run.run_dir, tmp_path / "previous")
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    monkeypatch.setattr(export_module, "copy_tokenizer_files", crash)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tiny_run.run_dir, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]  # nothing else, hidden or not
    with pytest.raises(OSError, match="disk full"):
        export_hf(tiny_run.run_dir, previous, dtype="bfloat16", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]  # nothing else, hidden or not
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
