"""The shipped chat template: ``{% generation %}`` around assistant replies, the same text as before.

CHAT_TEMPLATE (marked) renders exactly what INFERENCE_CHAT_TEMPLATE (the unmarked ChatML every folder
trained before carries) renders, on a built-in multi-turn dialogue always and on every real dialogue
when the shared corpora exist; new folders ship the marked one (and sp_bbpe ``add_prefix_space``
false), folders trained before keep theirs, and ``upgrade_config_files`` brings a copy up to date.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.data.test_chat import MULTI_TURN
from z2all.tokenizer import CHAT_TEMPLATE, INFERENCE_CHAT_TEMPLATE, Z2allTokenizer, upgrade_config_files

transformers = pytest.importorskip("transformers")

EDGE_CASES = [
    MULTI_TURN,
    MULTI_TURN[:2],  # ends on a user turn
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],  # empty contents
    [{"role": "assistant", "content": "first {{ not jinja }} <|im_end|>"}],  # text that looks like markup
]


@pytest.fixture(scope="module", params=["hf_bbpe", "sp_bbpe"])
def tok_dir(request, tiny_tokenizer_dir, tiny_sp_tokenizer_dir):
    return tiny_tokenizer_dir if request.param == "hf_bbpe" else tiny_sp_tokenizer_dir


@pytest.fixture(scope="module")
def hf_tok(tiny_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def make_old_folder(tok_dir, dest):
    """A copy of ``tok_dir`` as z2all wrote it before the markers: unmarked template, no add_prefix_space."""
    shutil.copytree(tok_dir, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = INFERENCE_CHAT_TEMPLATE
    config.pop("add_prefix_space", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (dest / "chat_template.jinja").write_text(INFERENCE_CHAT_TEMPLATE, encoding="utf-8")
    return dest


def assert_same_text(hf_tok, conversations):
    for conv in conversations:
        for gen in (False, True):
            new = hf_tok.apply_chat_template(
                conv, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gen
            )
            old = hf_tok.apply_chat_template(
                conv, chat_template=INFERENCE_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gen
            )
            assert new == old, conv


def test_marked_template_renders_the_same_text(hf_tok):
    assert_same_text(hf_tok, EDGE_CASES)
    text = hf_tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MULTI_TURN)


def test_marked_template_renders_the_same_text_on_every_real_dialogue(hf_tok, shared_data):
    with open(shared_data / "sft" / "chatterbot_messages.jsonl", encoding="utf-8") as f:
        conversations = [json.loads(line) for line in f]
    assert len(conversations) == 2493
    assert_same_text(hf_tok, conversations)


def test_new_folders_ship_the_marked_template(tok_dir):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (tok_dir / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    assert Z2allTokenizer.from_pretrained(tok_dir).chat_template == CHAT_TEMPLATE
    sp = Z2allTokenizer.from_pretrained(tok_dir).tokenizer_type == "sp_bbpe"
    # sentencepiece trained without the dummy prefix: said where llama.cpp's converter reads it.
    assert config.get("add_prefix_space", "absent") == (False if sp else "absent")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ids = hf.apply_chat_template(
        MULTI_TURN, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert 1 in ids["assistant_masks"]  # what TRL's assistant_only_loss checks


def test_folders_trained_before_keep_their_template(tok_dir, tmp_path):
    old = make_old_folder(tok_dir, tmp_path / "old")
    assert Z2allTokenizer.from_pretrained(old).chat_template == INFERENCE_CHAT_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(old)
    assert hf.chat_template == INFERENCE_CHAT_TEMPLATE
    # No markers, an all-zero assistant mask: what TRL's assistant_only_loss refuses.
    ids = hf.apply_chat_template(
        MULTI_TURN, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert 1 not in ids["assistant_masks"]


def test_upgrade_config_files(tok_dir, tmp_path):
    old = make_old_folder(tok_dir, tmp_path / "old")
    sp = Z2allTokenizer.from_pretrained(old).tokenizer_type == "sp_bbpe"
    assert upgrade_config_files(old) == ["tokenizer_config.json", "chat_template.jinja"]
    assert (old / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    upgraded = json.loads((old / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert upgraded == json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert ("add_prefix_space" in upgraded) == sp
    assert upgrade_config_files(old) == []  # already today's

    custom = make_old_folder(tok_dir, tmp_path / "custom")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = json.loads((custom / "tokenizer_config.json").read_text(encoding="utf-8"))
    (custom / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (custom / "chat_template.jinja").write_text(template)
    upgrade_config_files(custom)
    assert json.loads((custom / "tokenizer_config.json").read_text())["chat_template"] == template
    assert (custom / "chat_template.jinja").read_text() == template

    foreign = make_old_folder(tok_dir, tmp_path / "foreign")
    (foreign / "z2all_tokenizer.json").unlink()
    assert upgrade_config_files(foreign) == []
