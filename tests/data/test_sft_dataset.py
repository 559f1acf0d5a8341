"""SFTDataset: every accepted format, exact label masks, truncation/drop and bad-record reports,
the train/valid split and sft_collate padding."""

from __future__ import annotations

import json

import pytest
import torch

from z2all.data import sft_dataset
from z2all.data.chat import render_chat
from z2all.data.sft_dataset import SFTDataset, sft_collate, split_indices
from z2all.data.sft_records import BuildMemo

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chatml(messages) -> str:
    """The ChatML text of a dialogue, written out by hand (the reference for decoded input_ids)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def labelled_text(tok, labels) -> list[str]:
    """Decoded maximal runs of labelled positions."""
    spans, run = [], []
    for t in labels.tolist() + [-100]:
        if t != -100:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def check_item(tok, item, messages):
    """input_ids are the dialogue's ChatML; labels equal input_ids exactly on every reply + <|im_end|>."""
    input_ids, labels = item
    assert input_ids.dtype == labels.dtype == torch.long and input_ids.shape == labels.shape
    assert tok.decode(input_ids.tolist()) == chatml(messages)
    keep = labels != -100
    assert torch.equal(labels[keep], input_ids[keep])
    assert labelled_text(tok, labels) == [m["content"] + IM_END for m in messages if m["role"] == "assistant"]


# --------------------------------------------------------------------------------------- real files
@pytest.fixture(scope="module")
def real_messages(shared_data):
    with open(shared_data / "sft" / "chatterbot_messages.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_real_message_lists_every_turn_labelled(tiny_tokenizer, shared_data, real_messages):
    ds = SFTDataset(shared_data / "sft" / "chatterbot_messages.jsonl", tiny_tokenizer, max_seq_len=4096)
    assert len(ds) == len(real_messages) == 2493 and ds.n_dropped == 0
    assert ds.reports[0]["n_bad"] == 0 and ds.origins == ["tokenized"]
    multi = [i for i, m in enumerate(real_messages) if len(m) > 3]
    assert len(multi) > 50  # the file has real multi-turn dialogues
    for i in list(range(0, len(ds), 7)) + multi:
        check_item(tiny_tokenizer, ds[i], real_messages[i])


def test_real_belle_equals_message_lists_without_system(tiny_tokenizer, shared_data, real_messages):
    ds = SFTDataset(shared_data / "sft" / "chatterbot_belle.jsonl", tiny_tokenizer, max_seq_len=4096)
    assert len(ds) == 2493
    for i in range(0, len(ds), 5):
        no_system = [m for m in real_messages[i] if m["role"] != "system"]
        ids, labels = ds[i]
        ref_ids, ref_mask = render_chat(tiny_tokenizer, no_system)
        assert ids.tolist() == ref_ids
        assert labels.tolist() == [t if m else -100 for t, m in zip(ref_ids, ref_mask)]
    check_item(tiny_tokenizer, ds[0], [m for m in real_messages[0] if m["role"] != "system"])


def test_real_alpaca_instruction(tiny_tokenizer, shared_data):
    path = shared_data / "sft" / "chatterbot_instruction.json"
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    ds = SFTDataset(path, tiny_tokenizer, max_seq_len=4096, sft_type="instruction")
    assert len(ds) == len(records) == 2493
    for i in range(0, len(ds), 11):
        r = records[i]
        user = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
        check_item(
            tiny_tokenizer,
            ds[i],
            [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}],
        )


def test_folder_reads_every_source_in_name_order(tiny_tokenizer, shared_data, tmp_path, real_messages):
    ds_conv = SFTDataset(shared_data / "sft", tiny_tokenizer, max_seq_len=4096)
    # belle (2493) + messages (2493); the Alpaca file is in another format: all bad, and reported.
    assert [p.name for p in ds_conv.sources] == [
        "chatterbot_belle.jsonl",
        "chatterbot_instruction.json",
        "chatterbot_messages.jsonl",
    ]
    assert len(ds_conv) == 2 * 2493
    assert ds_conv.reports[1]["n_bad"] == 2493 and "item 0" in ds_conv.reports[1]["bad_examples"][0]
    check_item(tiny_tokenizer, ds_conv[2493], real_messages[0])


# ------------------------------------------------------------------------------ hand-written formats
CONVERSATION_RECORDS = [
    # bare list
    [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A."}],
    # messages key
    {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "b?"},
            {"role": "assistant", "content": "B"},
        ]
    },
    # conversations key with role/content
    {"conversations": [{"role": "user", "content": "c?"}, {"role": "assistant", "content": "C"}]},
    # ShareGPT with a top-level system and from/value
    {
        "system": "Be kind.",
        "conversations": [
            {"from": "human", "value": "d1?"},
            {"from": "gpt", "value": "D1"},
            {"from": "user", "value": "d2?"},
            {"from": "assistant", "value": "D2"},
        ],
    },
    # ShareGPT with the system as a message
    {
        "conversations": [
            {"from": "system", "value": "Sys"},
            {"from": "human", "value": "e?"},
            {"from": "gpt", "value": "E"},
        ]
    },
]
CONVERSATION_MESSAGES = [
    [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A."}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "b?"},
        {"role": "assistant", "content": "B"},
    ],
    [{"role": "user", "content": "c?"}, {"role": "assistant", "content": "C"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "d1?"},
        {"role": "assistant", "content": "D1"},
        {"role": "user", "content": "d2?"},
        {"role": "assistant", "content": "D2"},
    ],
    [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "e?"},
        {"role": "assistant", "content": "E"},
    ],
]


def test_conversation_layouts(tiny_tokenizer, tmp_path):
    ds = SFTDataset(write_jsonl(tmp_path / "c.jsonl", CONVERSATION_RECORDS), tiny_tokenizer, max_seq_len=256)
    assert len(ds) == len(CONVERSATION_MESSAGES)
    for i, messages in enumerate(CONVERSATION_MESSAGES):
        check_item(tiny_tokenizer, ds[i], messages)


def test_conversation_json_array_is_streamed(tiny_tokenizer, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([r for r in CONVERSATION_RECORDS if isinstance(r, dict)]), encoding="utf-8")
    ds = SFTDataset(path, tiny_tokenizer, max_seq_len=256)
    assert len(ds) == 4
    check_item(tiny_tokenizer, ds[2], CONVERSATION_MESSAGES[3])


def test_parquet_sharegpt(tiny_tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = CONVERSATION_RECORDS[3:]  # the ShareGPT rows
    table = pa.Table.from_pylist([{"conversations": r["conversations"]} for r in records])
    pq.write_table(table, tmp_path / "c.parquet")
    ds = SFTDataset(tmp_path / "c.parquet", tiny_tokenizer, max_seq_len=256)
    assert len(ds) == 2
    check_item(tiny_tokenizer, ds[0], CONVERSATION_MESSAGES[3][1:])  # no top-level system column here
    check_item(tiny_tokenizer, ds[1], CONVERSATION_MESSAGES[4])


def test_alpaca_with_input_and_system(tiny_tokenizer, tmp_path):
    records = [
        {"instruction": "Translate", "input": "你好", "output": "Hello"},
        {"instruction": "Say hi", "output": "hi", "system": "Be brief."},
    ]
    ds = SFTDataset(write_jsonl(tmp_path / "a.jsonl", records), tiny_tokenizer, 256, sft_type="instruction")
    check_item(
        tiny_tokenizer,
        ds[0],
        [{"role": "user", "content": "Translate\n你好"}, {"role": "assistant", "content": "Hello"}],
    )
    check_item(
        tiny_tokenizer,
        ds[1],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi"},
        ],
    )


# --------------------------------------------------------------------------- bad records, truncation
def test_bad_records_are_skipped_and_reported_with_line_numbers(tiny_tokenizer, tmp_path, z2all_log):
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    lines = [
        json.dumps(good),  # line 1
        "{not json",  # line 2
        json.dumps([{"role": "wizard", "content": "x"}]),  # line 3
        json.dumps([{"role": "user", "content": 7}]),  # line 4
        "",  # line 5: blank, ignored
        json.dumps({"conversations": [{"from": "bot", "value": "x"}]}),  # line 6
        json.dumps(42),  # line 7
        json.dumps({"text": "pretraining record"}),  # line 8
        json.dumps(good),  # line 9
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = SFTDataset(path, tiny_tokenizer, max_seq_len=64)
    assert len(ds) == 2
    report = ds.reports[0]
    assert report["n_records"] == 8 and report["n_bad"] == 6 and report["n_samples"] == 2
    joined = "\n".join(report["bad_examples"])
    for line in (2, 3, 4, 6, 7):
        assert f"bad.jsonl:line {line}" in joined
    assert (
        "unknown role 'wizard'" in joined
        and "content of type int" in joined
        and "unknown 'from' 'bot'" in joined
    )
    assert "bad.jsonl:line 3" in z2all_log.text and "6 bad records" in z2all_log.text


def test_utf8_bom_and_bad_bytes(tiny_tokenizer, tmp_path):
    good = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "答"}]).encode()
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + good + b"\n" + b'[{"role": "user", "content": "\xff"}]\n' + good + b"\n"
    )
    ds = SFTDataset(path, tiny_tokenizer, max_seq_len=64)
    assert len(ds) == 2 and ds.reports[0]["n_bad"] == 1
    assert ds.reports[0]["bad_examples"][0].startswith(f"{path}:line 2: invalid_utf8")


def test_bad_alpaca_items_are_reported_with_item_index(tiny_tokenizer, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(
        json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "i"}, {"output": 3}]), "utf-8"
    )
    ds = SFTDataset(path, tiny_tokenizer, max_seq_len=64, sft_type="instruction")
    assert len(ds) == 1 and ds.reports[0]["n_bad"] == 2
    assert [e.split(": ")[0] for e in ds.reports[0]["bad_examples"]] == [f"{path}:item 1", f"{path}:item 2"]


def test_truncation_keeps_trainable_tokens_or_drops_and_reports(tiny_tokenizer, tmp_path, z2all_log):
    tok = tiny_tokenizer
    long_user = "word " * 80
    records = [
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello " * 30},
        ],  # cut inside the reply
        [
            {"role": "user", "content": long_user},
            {"role": "assistant", "content": "late"},
        ],  # reply past L: drop
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "only a question"},
        ],  # nothing to learn
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],  # fits
    ]
    L = 24
    ds = SFTDataset(write_jsonl(tmp_path / "t.jsonl", records), tok, max_seq_len=L)
    report = ds.reports[0]
    assert len(ds) == 2 and ds.n_dropped == 2 and report["n_truncated"] == 1
    assert report["dropped"] == {"replies_past_max_seq_len": 1, "no_assistant": 1}
    assert report["dropped_examples"] == [
        f"{tmp_path}/t.jsonl:line 2: replies_past_max_seq_len",
        f"{tmp_path}/t.jsonl:line 3: no_assistant",
    ]
    assert "dropped 2" in z2all_log.text
    full_ids, full_mask = render_chat(tok, records[0])
    ids, labels = ds[0]
    assert len(ids) == L and ids.tolist() == full_ids[:L]
    assert (labels != -100).tolist() == full_mask[:L] and any(full_mask[:L])
    for i in range(len(ds)):
        assert (ds[i][1] != -100).any() and len(ds[i][0]) <= L
    check_item(tok, ds[1], records[3])


def test_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="sft_type"):
        SFTDataset(tmp_path, tiny_tokenizer, 64, sft_type="chat")
    with pytest.raises(FileNotFoundError, match="no .jsonl"):
        SFTDataset(tmp_path, tiny_tokenizer, 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SFTDataset(tmp_path / "missing.jsonl", tiny_tokenizer, 64)
    (tmp_path / "notes.txt").write_text("plain text", encoding="utf-8")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported SFT/DPO file type '\.txt'"):
        SFTDataset(tmp_path / "notes.txt", tiny_tokenizer, 64)
    path = write_jsonl(tmp_path / "q.jsonl", [[{"role": "user", "content": "no answer"}]])
    with pytest.raises(ValueError, match="no usable SFT samples"):
        SFTDataset(path, tiny_tokenizer, 64)


# ------------------------------------------------------------------------------------ split, collate
def test_split_is_deterministic_disjoint_and_complete(tiny_tokenizer, tmp_path):
    records = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(40)
    ]
    path = write_jsonl(tmp_path / "s.jsonl", records)
    kw = dict(valid_ratio=0.25, seed=3)
    train = SFTDataset(path, tiny_tokenizer, 64, split="train", **kw)
    valid = SFTDataset(path, tiny_tokenizer, 64, split="valid", **kw)
    assert len(train) == 30 and len(valid) == 10
    assert set(train.indices.tolist()).isdisjoint(valid.indices.tolist())
    assert sorted(train.indices.tolist() + valid.indices.tolist()) == list(range(40))
    again = SFTDataset(path, tiny_tokenizer, 64, split="valid", **kw)
    assert valid.indices.tolist() == again.indices.tolist()
    assert torch.equal(valid[0][0], again[0][0])
    other_seed = split_indices(40, "valid", 0.25, seed=4)
    assert other_seed.tolist() != valid.indices.tolist()
    assert len(split_indices(40, "train", 0.0, 0)) == 40 and len(split_indices(3, "valid", 0.01, 0)) == 1
    with pytest.raises(ValueError, match="valid_ratio"):
        split_indices(10, "train", 1.0, 0)
    with pytest.raises(ValueError, match="split"):
        split_indices(10, "validation", 0.1, 0)


def test_train_and_valid_tokenize_once_per_process(tiny_tokenizer, tmp_path, monkeypatch):
    calls = []
    real = sft_dataset.build_shard
    monkeypatch.setattr(sft_dataset, "build_shard", lambda *a: calls.append(a[0]) or real(*a))
    records = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(10)
    ]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    train = SFTDataset(path, tiny_tokenizer, 64, split="train", valid_ratio=0.2)
    valid = SFTDataset(path, tiny_tokenizer, 64, split="valid", valid_ratio=0.2)
    assert calls == [path] and len(train) + len(valid) == 10
    SFTDataset(path, tiny_tokenizer, 32)  # another max_seq_len: another key
    with open(path, "a", encoding="utf-8") as f:  # the source changes: stale
        f.write(json.dumps(records[0]) + "\n")
    assert len(SFTDataset(path, tiny_tokenizer, 64)) == 11
    assert calls == [path] * 3


def test_build_memo_evicts_least_recently_used_by_bytes():
    memo = BuildMemo(max_bytes=100)
    memo.put(("a",), "A", 40)
    memo.put(("b",), "B", 40)
    assert memo.get(("a",)) == "A"  # a is now the most recent
    memo.put(("c",), "C", 40)  # 120 > 100: evict b, the least recent
    assert memo.get(("b",)) is None and memo.get(("a",)) == "A" and memo.get(("c",)) == "C"
    memo.put(("huge",), "H", 101)  # larger than the budget: never held
    assert memo.get(("huge",)) is None and memo.get(("c",)) == "C"


def test_sft_collate_right_pads():
    a = (torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7]))
    b = (torch.tensor([8]), torch.tensor([8]))
    input_ids, labels, mask = sft_collate([a, b], pad_id=3)
    assert input_ids.tolist() == [[5, 6, 7], [8, 3, 3]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert input_ids.dtype == labels.dtype == mask.dtype == torch.long
    input_ids, labels, mask = sft_collate([a, b], pad_id=3, pad_to_multiple_of=4)
    assert input_ids.shape == labels.shape == mask.shape == (2, 4)
    assert input_ids[0, 3] == 3 and labels[0, 3] == -100 and mask[0, 3] == 0
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        sft_collate([(torch.tensor([1, 2]), torch.tensor([1]))], pad_id=0)


def test_io_error_mid_jsonl_names_the_file_and_line(tmp_path, monkeypatch):
    """SFT .jsonl has its own line reader (a line may be a bare message list); an OSError while reading
    is a DataFileError naming the file and the line, as in the shared reader."""
    import io

    from z2all.data import sft_records
    from z2all.data.readers import DataFileError, ReadStats

    class _FailingFile(io.BytesIO):
        def __next__(self):
            if self.tell() > 0:
                raise OSError(5, "Input/output error")
            return super().__next__()

    monkeypatch.setattr(sft_records, "open", lambda path, mode: _FailingFile(b"[]\n[]\n"), raising=False)
    with pytest.raises(DataFileError, match=r"chat.jsonl: read failed after line 1: \[Errno 5\]"):
        list(sft_records.iter_json_records(tmp_path / "chat.jsonl", ReadStats()))
