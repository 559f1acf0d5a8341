"""Exports carry today's chat template, whatever the run's tokenizer folder has.

A run whose tokenizer folder was trained before the ``{% generation %}`` markers: ``export_hf`` writes
the marked template (and sp_bbpe ``add_prefix_space`` false), the folder itself is untouched, and on
the export transformers' assistant mask (what TRL's ``assistant_only_loss`` trains) equals z2all's SFT
labels, token for token, on a built-in dialogue and on the real multi-turn ones. ``export_gguf``
writes the unmarked ChatML for inference engines.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.data.test_chat import MULTI_TURN, real_dialogues
from tests.tokenizer.test_chat_template import make_old_folder
from tests.tools.conftest import build_tiny_run
from tests.tools.gguf_helpers import fields
from z2all.data.sft_dataset import SFTDataset
from z2all.export_gguf import export_gguf
from z2all.export_hf import export_hf
from z2all.labels import IGNORE_INDEX
from z2all.tokenizer import CHAT_TEMPLATE, INFERENCE_CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")

# No content holding a special token's text: transformers tokenizes the rendered string and so turns a
# literal "<|im_end|>" into the special id, where z2all keeps it plain text (tests/data/test_chat.py).
BUILT_IN = [
    MULTI_TURN,
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "assistant", "content": "I speak first.\n\n  Twice."}, {"role": "user", "content": "好"}],
]


@pytest.fixture(scope="module", params=["hf_bbpe", "sp_bbpe"])
def old_run(request, tiny_tokenizer_dir, tiny_sp_tokenizer_dir, tmp_path_factory):
    """A run trained with a tokenizer folder from before the markers."""
    tok_dir = tiny_tokenizer_dir if request.param == "hf_bbpe" else tiny_sp_tokenizer_dir
    root = tmp_path_factory.mktemp(f"old_{request.param}")
    old_tok = make_old_folder(tok_dir, root / "tokenizer")
    (root / "run").mkdir()
    return build_tiny_run(root / "run", old_tok, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def hf_export(old_run, tmp_path_factory):
    return export_hf(old_run.run_dir, tmp_path_factory.mktemp("export") / "hf")


def test_export_hf_writes_the_marked_template_and_leaves_the_run_s_folder(old_run, hf_export):
    before = {p.name: p.read_bytes() for p in old_run.tokenizer_dir.iterdir()}
    config = json.loads((hf_export / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (hf_export / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    sp = (old_run.tokenizer_dir / "tokenizer.model").is_file()
    assert config.get("add_prefix_space", "absent") == (False if sp else "absent")
    assert transformers.AutoTokenizer.from_pretrained(hf_export).chat_template == CHAT_TEMPLATE
    old_config = json.loads((old_run.tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert old_config["chat_template"] == INFERENCE_CHAT_TEMPLATE
    assert {p.name: p.read_bytes() for p in old_run.tokenizer_dir.iterdir()} == before


def test_export_gguf_writes_the_unmarked_chatml(old_run, tmp_path):
    meta = fields(export_gguf(old_run.run_dir, tmp_path / "m.gguf"))
    assert meta["tokenizer.chat_template"] == INFERENCE_CHAT_TEMPLATE


def assert_mask_equals_sft_labels(hf_export, conversations, tmp_path):
    """transformers' assistant mask on the export, as TRL turns it into labels, equals z2all's SFT labels."""
    source = tmp_path / "dialogues.jsonl"
    source.write_text(
        "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations), encoding="utf-8"
    )
    ds = SFTDataset(source, hf_export, max_seq_len=100_000, split="all")  # z2all's tokenizer of the export
    assert len(ds) == len(conversations)
    hf = transformers.AutoTokenizer.from_pretrained(hf_export)
    for i, conv in enumerate(conversations):
        ids, labels = ds[i]
        ref = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ref_ids = torch.tensor(list(ref["input_ids"]))
        mask = torch.tensor(list(ref["assistant_masks"]), dtype=torch.bool)
        assert torch.equal(ref_ids, ids), conv
        assert torch.equal(torch.where(mask, ref_ids, IGNORE_INDEX), labels), conv


def test_assistant_mask_equals_z2all_sft_labels(hf_export, tmp_path):
    assert_mask_equals_sft_labels(hf_export, BUILT_IN, tmp_path)


def test_assistant_mask_equals_z2all_sft_labels_on_real_dialogues(hf_export, tmp_path, shared_data):
    multi_turn = [c for c in real_dialogues(shared_data) if len(c) > 3]
    assert len(multi_turn) == 81
    assert_mask_equals_sft_labels(hf_export, multi_turn, tmp_path)
