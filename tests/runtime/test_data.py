"""Reading, tokenizing and batching a job's data; every malformed input is a sentence naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cetd.errors import JobError
from cetd.runtime.data import (
    ByteTokenizer,
    PretrainedTokenizer,
    TokenizedDataset,
    load_dataset,
    make_batches,
    read_pairs,
    step_batches,
    tokenize_texts,
)
from cetd.runtime.models.loading import load_model


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.timeout(10)
def test_byte_tokenizer_round_trips_text() -> None:
    text = "Grüße, 世界! tab\there"
    for vocab in (256, 259, 30522):
        tokenizer = ByteTokenizer(vocab)
        ids = tokenizer.encode(text)
        assert max(ids) < vocab
        assert len(ids) == len(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert ByteTokenizer(256).encode("A") == [65]
    assert ByteTokenizer(300).encode("A") == [68]
    opt = ByteTokenizer(272, pad_token_id=1)
    assert (opt.pad_token_id, opt.cls_token_id, opt.sep_token_id) == (1, 0, 2)
    with pytest.raises(JobError, match="at least 256"):
        ByteTokenizer(100)


@pytest.mark.timeout(10)
def test_byte_tokenizer_pairs_truncate_longest_first() -> None:
    tokenizer = ByteTokenizer(300)
    encoded = tokenizer.encode_pair("abcdefgh", "xy", 9)
    # [CLS] a b c d [SEP] x y [SEP]: the longer text lost its tail.
    assert encoded.input_ids == [1, *tokenizer.encode("abcd"), 2, *tokenizer.encode("xy"), 2]
    assert encoded.token_type_ids == [0] * 6 + [1] * 3
    padded = tokenizer.encode_pair("a", "b", 8)
    assert padded.attention_mask == [1] * 5 + [0] * 3
    assert padded.input_ids[5:] == [0, 0, 0]


@pytest.mark.timeout(10)
def test_causal_lm_dataset_masks_padding_in_labels(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chats.jsonl", [{"text": "hello"}, {"text": "a much longer line of text"}, {"text": "x"}]
    )
    data = load_dataset(path, task="causal_lm", tokenizer=ByteTokenizer(256), seq_len=8, max_seq_len=64)
    assert len(data) == 2  # "x" has no next token to predict
    ids, mask, labels = data.tensors["input_ids"], data.tensors["attention_mask"], data.tensors["labels"]
    assert ids.shape == (2, 8)
    assert mask[0].tolist() == [1] * 5 + [0] * 3
    assert labels[0].tolist() == [*b"hello", -100, -100, -100]
    assert labels[1].tolist() == list(b"a much l")


@pytest.mark.timeout(10)
def test_pairs_from_jsonl_and_glue_tsv(tmp_path: Path) -> None:
    jsonl = write_jsonl(
        tmp_path / "qnli.jsonl",
        [
            {"question": "Who?", "sentence": "Me.", "label": "entailment"},
            {"sentence1": "Why?", "sentence2": "No.", "label": 1},
        ],
    )
    assert read_pairs(jsonl) == [("Who?", "Me.", 0), ("Why?", "No.", 1)]
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("index\tquestion\tsentence\tlabel\n0\tWho?\tMe.\tnot_entailment\n1\tWhy?\tNo.\tentailment\n")
    assert read_pairs(tsv) == [("Who?", "Me.", 1), ("Why?", "No.", 0)]
    data = load_dataset(tsv, task="sequence_classification", tokenizer=ByteTokenizer(300), seq_len=16, max_seq_len=64)
    assert data.tensors["labels"].tolist() == [1, 0]
    assert data.tensors["token_type_ids"][0].tolist()[:8] == [0, 0, 0, 0, 0, 0, 1, 1]


@pytest.mark.timeout(30)
def test_pretrained_tokenizer_pairs_have_token_types() -> None:
    _, tokenizer, _ = load_model("minilm", seed=0)
    encoded = PretrainedTokenizer(tokenizer).encode_pair("what is it?", "it is a test.", 16)
    assert len(encoded.input_ids) == 16
    assert encoded.input_ids[0] == tokenizer.cls_token_id
    assert 1 in encoded.token_type_ids
    assert encoded.attention_mask[-1] == 0


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("content", "task", "message"),
    [
        (None, "causal_lm", "no data file"),
        ('{"text": "ok"}\n{"text": broken\n', "causal_lm", "line 2: not valid JSON"),
        ('{"text": "ok"}\n\n[1, 2]\n', "causal_lm", "line 3: expected a JSON object"),
        ('{"body": "ok"}\n', "causal_lm", 'line 1: expected a string field "text"'),
        ("\n\n", "causal_lm", "holds no examples"),
        ('{"question": "q", "sentence": "s", "label": "maybe"}\n', "sequence_classification", "line 1: label 'maybe'"),
        ('{"question": "q", "label": 0}\n', "sequence_classification", "line 1: expected a string field 'sentence'"),
    ],
)
def test_data_errors_name_the_problem(tmp_path: Path, content: str | None, task: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(JobError, match=message):
        load_dataset(path, task=task, tokenizer=ByteTokenizer(300), seq_len=8, max_seq_len=64)


@pytest.mark.timeout(10)
def test_tsv_errors_and_sequence_limits(tmp_path: Path) -> None:
    tsv = tmp_path / "test.tsv"
    tsv.write_text("index\tquestion\tsentence\n0\ta\tb\n")
    with pytest.raises(JobError, match="header lacks label"):
        read_pairs(tsv)
    tsv.write_text("index\tquestion\tsentence\tlabel\n0\ta\tb\n")
    with pytest.raises(JobError, match="line 2: 3 fields"):
        read_pairs(tsv)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    with pytest.raises(JobError, match="exceeds the model's maximum of 64"):
        load_dataset(path, task="causal_lm", tokenizer=ByteTokenizer(256), seq_len=65, max_seq_len=64)


def numbered_dataset(count: int, seq_len: int = 4) -> TokenizedDataset:
    texts = [chr(ord("A") + i % 26) * seq_len for i in range(count)]
    data = tokenize_texts(texts, ByteTokenizer(256), seq_len)
    data.tensors["example"] = torch.arange(count)
    return data


@pytest.mark.timeout(10)
def test_batches_are_seeded_split_and_cover_each_epoch() -> None:
    data = numbered_dataset(10)
    steps = list(make_batches(data, global_batch=4, micro_batches=2, seed=3, steps=5))
    again = list(make_batches(data, global_batch=4, micro_batches=2, seed=3, steps=5))
    other = list(make_batches(data, global_batch=4, micro_batches=2, seed=4, steps=5))
    order = [int(i) for step in steps for mb in step for i in mb["example"]]
    assert order == [int(i) for step in again for mb in step for i in mb["example"]]
    assert order != [int(i) for step in other for mb in step for i in mb["example"]]
    assert sorted(order[:10]) == list(range(10))
    assert sorted(order[10:20]) == list(range(10))
    assert all(len(step) == 2 and step[0]["input_ids"].shape == (2, 4) for step in steps)
    # Resuming at step 3 draws what an uninterrupted run draws.
    resumed = next(make_batches(data, global_batch=4, micro_batches=2, seed=3, steps=5, start_step=3))
    assert all(torch.equal(a["example"], b["example"]) for a, b in zip(resumed, steps[3], strict=True))
    with pytest.raises(JobError, match="cannot be split into 3"):
        step_batches(data, 0, global_batch=4, micro_batches=3, seed=0)
