"""Prompt files: read prompts (and reference answers) and turn them into the teacher's input tokens.

    prompts = read_prompts("problems.jsonl", PromptFields(prompt="question", answer="answer"))
    ids = prompt_token_ids(prompts[0], tokenizer, chat_template=False, system=None)

A prompt file is JSONL (one object per line), Parquet, or a folder written by HF ``datasets``'
``save_to_disk`` (read as Arrow IPC streams, without importing ``datasets``). Each record has a prompt field:
a string, or a ``messages`` list of ``{"role", "content"}`` dicts (multi-turn chat); optionally a reference
answer and an id. Records are kept in file order.

A prompt's id is the id field when the file has one, else the first 16 hex digits of the sha256 of the
prompt as stored (the text, or the messages as JSON): stable whatever order or partitioning, so a rerun or
another partition count assigns every prompt the same id. Two records with the same prompt and no id are
told apart by ``~2``, ``~3``, ... in file order.

Tokens: with ``chat_template`` the tokenizer's own template renders the messages (a string prompt becomes
one user turn, ``system`` a system turn before it) with the generation prompt added; without it the text is
tokenized as is (a messages list then needs the template) and ``system`` is prepended as a line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.errors import PromptError

PROMPT_ID_HEX = 16


@dataclass(frozen=True)
class PromptFields:
    """Field names in the prompt file."""

    prompt: str = "prompt"  # a string, or a list of {"role", "content"} messages
    answer: str | None = "answer"  # the reference answer; optional in every record
    id: str | None = "id"  # used when present, else a content hash


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str | None  # the prompt string, or None for a messages list
    messages: tuple[dict[str, str], ...] | None
    reference_answer: str | None

    @property
    def stored(self) -> str:
        """The prompt as the store keeps it: its text, or its messages as JSON."""
        return self.text if self.text is not None else json.dumps(list(self.messages or ()), ensure_ascii=False)


def read_prompts(path: str | Path, fields: PromptFields = PromptFields()) -> list[Prompt]:
    """Every prompt of the file at ``path``, in file order; PromptError naming the record for a bad one."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise PromptError(f"prompt file {path} holds no prompts", hint="give a file with at least one record")
    prompts, seen = [], {}
    for number, record in enumerate(records, start=1):
        prompt = _prompt(record, fields, f"{path} record {number}")
        count = seen[prompt.prompt_id] = seen.get(prompt.prompt_id, 0) + 1
        if count > 1:
            if fields.id is not None and record.get(fields.id) is not None:
                raise PromptError(f"{path} record {number}: id {prompt.prompt_id!r} is used twice",
                                  hint="give every prompt its own id")
            prompt = Prompt(f"{prompt.prompt_id}~{count}", prompt.text, prompt.messages, prompt.reference_answer)
        prompts.append(prompt)
    return prompts


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        if not ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
            raise PromptError(f"prompt folder {path} is not a saved HF dataset (no state.json / dataset_info.json)",
                              hint="pass a .jsonl or .parquet file, or a folder written by Dataset.save_to_disk")
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [path / entry["filename"] for entry in state.get("_data_files", [])] or sorted(path.glob("*.arrow"))
        records: list[dict[str, Any]] = []
        for file in files:
            with pa.memory_map(str(file)) as source:
                records += pa.ipc.open_stream(source).read_all().to_pylist()
        return records
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist", hint="check the path")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise PromptError(f"prompt file {path} is not readable Parquet: {exc}") from None
    if suffix in (".jsonl", ".json"):
        return _jsonl_records(path)
    raise PromptError(f"prompt file {path} has an unsupported extension {suffix or '(none)'!r}",
                      hint="prompts come from .jsonl, .parquet or a saved HF dataset folder")


def _jsonl_records(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path} line {number} is not JSON: {exc.msg}", hint="one JSON object per line") from None
        if not isinstance(record, dict):
            raise PromptError(f"{path} line {number} is not a JSON object", hint="one JSON object per line")
        records.append(record)
    return records


def _prompt(record: dict[str, Any], fields: PromptFields, where: str) -> Prompt:
    if fields.prompt not in record:
        raise PromptError(f"{where} has no {fields.prompt!r} field (it has: {', '.join(map(str, record)) or 'none'})",
                          hint="name the prompt field with --prompt-field")
    value = record[fields.prompt]
    text, messages = None, None
    if isinstance(value, str) and value.strip():
        text = value
    elif isinstance(value, list) and value and all(_is_message(m) for m in value):
        messages = tuple({"role": m["role"], "content": m["content"]} for m in value)
    else:
        raise PromptError(f"{where}: {fields.prompt!r} is {_describe(value)}; expected a non-empty string or a list "
                          'of {"role": ..., "content": ...} messages', hint="fix the record or pick another --prompt-field")
    answer = record.get(fields.answer) if fields.answer else None
    reference = None if answer is None else str(answer)
    given_id = record.get(fields.id) if fields.id else None
    stored = text if text is not None else json.dumps(list(messages or ()), ensure_ascii=False)
    prompt_id = str(given_id) if given_id is not None else \
        hashlib.sha256(stored.encode("utf-8")).hexdigest()[:PROMPT_ID_HEX]
    if not prompt_id or "/" in prompt_id:
        raise PromptError(f"{where}: id {prompt_id!r} is empty or holds '/'", hint="ids may not be empty or hold '/'")
    return Prompt(prompt_id, text, messages, reference)


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("role"), str) and isinstance(item.get("content"), str)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string"
    if isinstance(value, list):
        return "an empty list" if not value else "a list that is not of role/content messages"
    return f"a {type(value).__name__}" if value is not None else "null"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_chat_template(tokenizer: Any, source: str) -> None:
    """PromptError when ``--chat-template`` is asked of a tokenizer that has none."""
    if not has_chat_template(tokenizer):
        raise PromptError(f"--chat-template: the tokenizer of {source} has no chat template",
                          hint="drop --chat-template to tokenize the prompt text as is, or use a chat model's tokenizer")


def prompt_token_ids(prompt: Prompt, tokenizer: Any, chat_template: bool, system: str | None) -> list[int]:
    """The teacher's input tokens for ``prompt`` (module docstring)."""
    if chat_template:
        messages = list(prompt.messages) if prompt.messages is not None else [{"role": "user", "content": prompt.text}]
        if system is not None and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": system}, *messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    if prompt.messages is not None:
        raise PromptError(f"prompt {prompt.prompt_id} is a messages list; it needs --chat-template",
                          hint="pass --chat-template (the tokenizer must have one), or give prompts as text")
    text = prompt.text if system is None else f"{system}\n{prompt.text}"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return [int(i) for i in ids]
