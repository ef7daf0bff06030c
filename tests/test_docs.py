"""The docs tell the truth: the worked example in docs/format.md runs and prints what the page says."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

from kdstore.format import load_schema_file

DOCS = Path(__file__).parents[1] / "docs"


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_format_worked_example_prints_what_the_page_shows(tmp_path, monkeypatch):
    page = (DOCS / "format.md").read_text()
    code, expected = _blocks(page, "python")[0], _blocks(page, "text")[0]
    monkeypatch.chdir(tmp_path)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "docs/format.md", "exec"), {})
    assert output.getvalue() == expected


def test_format_manifest_example_has_every_required_field():
    page = (DOCS / "format.md").read_text()
    example = json.loads(_blocks(page, "json")[0].replace('"..."', "0"))
    schema = load_schema_file("manifest.schema.json")
    assert set(schema["required"]) <= set(example)
    for name in ("teacher", "tokenizer", "codec"):
        assert set(schema["properties"][name]["required"]) <= set(example[name])


def test_ci_runs_the_readme_test_command():
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[:2]
    assert "kdstore build" in commands[0]
    assert "pytest" in commands[1] and commands[1] in (root / ".ci" / "run").read_text()


def test_readme_training_snippet_runs_against_a_store(store_path, codec, monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    code = _blocks((Path(__file__).parents[1] / "README.md").read_text(), "python")[0]
    student = LlamaForCausalLM(LlamaConfig(vocab_size=codec.vocab_size, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    monkeypatch.chdir(store_path.parent)
    namespace = {"student": student, "device": torch.device("cpu")}
    exec(compile(code.replace('"store"', f'"{store_path.name}"'), "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["loss"] > 0
