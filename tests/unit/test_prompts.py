"""Prompt files: formats, fields, stable ids, messages and the chat template."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import save_tiny_teacher
from kdstore.errors import PromptError
from kdstore.prompts import PromptFields, check_chat_template, prompt_token_ids, read_prompts

RECORDS = [{"question": "w1 w2", "solution": 3, "key": "a"}, {"question": "w4 w5 w6", "key": "b"}]


def test_jsonl_parquet_and_a_saved_dataset_give_the_same_prompts(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "p.parquet")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    fields = PromptFields(prompt="question", answer="solution", id="key")
    read = [read_prompts(tmp_path / name, fields) for name in ("p.jsonl", "p.parquet", "saved")]
    assert read[0] == read[1] == read[2]
    assert [(p.prompt_id, p.text, p.reference_answer) for p in read[0]] == [("a", "w1 w2", "3"), ("b", "w4 w5 w6", None)]


def test_ids_are_content_hashes_without_an_id_field_and_duplicates_are_numbered(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": t}) for t in ("w1", "w2", "w1")) + "\n")
    first, second, third = read_prompts(path)
    assert first.prompt_id != second.prompt_id and third.prompt_id == f"{first.prompt_id}~2"
    path.write_text("\n".join(json.dumps({"prompt": t}) for t in ("w2", "w1")) + "\n")
    assert [p.prompt_id for p in read_prompts(path)] == [second.prompt_id, first.prompt_id]  # order does not matter


@pytest.mark.parametrize("line, message", [
    ({"text": "w1"}, "no 'prompt' field"),
    ({"prompt": ""}, "an empty string"),
    ({"prompt": 5}, "a int"),
    ({"prompt": [{"role": "user"}]}, "not of role/content messages"),
    ({"prompt": "w1", "id": "a/b"}, "holds '/'"),
])
def test_a_bad_record_is_named(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "w0"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(PromptError, match="record 2") as caught:
        read_prompts(path)
    assert message in str(caught.value)


def test_an_id_used_twice_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "w1", "id": 1}) + "\n" + json.dumps({"prompt": "w2", "id": 1}) + "\n")
    with pytest.raises(PromptError, match="id '1' is used twice"):
        read_prompts(path)


def test_text_tokens_system_line_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_teacher(tmp_path / "t"))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "w1 w2"}) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "w3"}]}) + "\n")
    text, chat = read_prompts(path)
    assert prompt_token_ids(text, tokenizer, False, None) == tokenizer("w1 w2")["input_ids"]
    assert prompt_token_ids(text, tokenizer, False, "w9") == tokenizer("w9\nw1 w2")["input_ids"]
    with pytest.raises(PromptError, match="needs --chat-template"):
        prompt_token_ids(chat, tokenizer, False, None)
    with pytest.raises(PromptError, match="has no chat template"):
        check_chat_template(tokenizer, "t")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    assert prompt_token_ids(chat, tokenizer, True, "w8") == tokenizer("system w8 user w3 ", add_special_tokens=False)["input_ids"]
    assert prompt_token_ids(text, tokenizer, True, None) == tokenizer("user w1 w2 ", add_special_tokens=False)["input_ids"]
