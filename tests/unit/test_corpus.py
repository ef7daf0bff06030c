"""Corpus: every input kind reads the same documents, ids are stable, chunks overlap by one, errors are clear."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kdstore.corpus import CorpusConfig, CorpusStats, WorkUnit, iter_units, partition_of, sequence_id, tokenize_unit
from kdstore.errors import CorpusError

WORDS = "the quick brown fox jumps over lazy dog a stitch in time saves nine".split()
DOCUMENTS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time\nsaves nine",  # an inner newline: one document, not two
    "dog",
    " ".join(WORDS * 3),
    "nine nine nine time",
]


def _tokenizer(post_processor: str | None = None) -> PreTrainedTokenizerFast:
    """A real WordLevel tokenizer trained in memory: one token per word, specials <pad> <unk> <s> </s>."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    if post_processor is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=post_processor, special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer()


def _sequences(paths, tokenizer, **config_args):
    config = CorpusConfig(**{"seq_len": 6, **config_args})
    return [seq for unit in iter_units(paths, config) for seq in tokenize_unit(unit, tokenizer, config)]


def _ids(sequences) -> list[list[int]]:
    return [seq.input_ids.tolist() for seq in sequences]


def _write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def _one_line_with_hint(error: CorpusError) -> None:
    assert "\n" not in error.one_line() and error.hint


# --- every input kind reads the same documents -------------------------------------------------

def test_txt_blank_line_jsonl_parquet_and_hf_dataset_give_the_same_sequences_as_one_txt_file_per_document(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "files"
    folder.mkdir()
    for i, text in enumerate(DOCUMENTS):
        (folder / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    blocks = tmp_path / "blocks.md"
    blocks.write_text("\n\n  \n".join(DOCUMENTS) + "\n\n", encoding="utf-8")
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"n": list(range(len(DOCUMENTS))), "text": DOCUMENTS}), parquet, row_group_size=2)
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": DOCUMENTS}).save_to_disk(str(hf), max_shard_size=200)

    expected = _ids(_sequences([folder], tokenizer))
    assert len(expected) > len(DOCUMENTS)  # the long document was cut into several chunks
    assert _ids(_sequences([blocks], tokenizer, split="blank-line")) == expected
    assert _ids(_sequences([jsonl], tokenizer)) == expected
    assert _ids(_sequences([parquet], tokenizer, unit_documents=2)) == expected
    assert _ids(_sequences([hf], tokenizer)) == expected


def test_hf_dataset_inside_a_folder_is_one_source_and_its_dataset_dict_index_is_not_read(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCUMENTS[:2]})}).save_to_disk(str(tmp_path / "dd"))
    units = list(iter_units([tmp_path], CorpusConfig(seq_len=8)))
    assert [u.key for u in units] == ["dd/train#0"]
    assert units[0].documents == tuple(DOCUMENTS[:2])


def test_units_are_blocks_of_unit_documents_within_one_source_in_sorted_order_skipping_hidden_files(tmp_path):
    (tmp_path / "b").mkdir()
    _write_jsonl(tmp_path / "b" / "z.jsonl", ["one", "two", "three"])
    _write_jsonl(tmp_path / "a.jsonl", ["four", "five"])
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("secret")
    units = list(iter_units([tmp_path], CorpusConfig(seq_len=4, unit_documents=2)))
    assert [(u.key, u.source, u.block, u.documents) for u in units] == [
        ("a.jsonl#0", "a.jsonl", 0, ("four", "five")),
        ("b/z.jsonl#0", "b/z.jsonl", 0, ("one", "two")),
        ("b/z.jsonl#1", "b/z.jsonl", 1, ("three",)),
    ]


def test_file_argument_is_named_by_its_file_name_and_argument_order_does_not_matter(tmp_path):
    first, second = _write_jsonl(tmp_path / "x.jsonl", ["one"]), _write_jsonl(tmp_path / "y.jsonl", ["two"])
    forward = [u.key for u in iter_units([first, second], CorpusConfig(seq_len=4))]
    assert forward == [u.key for u in iter_units([second, first], CorpusConfig(seq_len=4))] == ["x.jsonl#0", "y.jsonl#0"]


def test_whitespace_only_documents_are_skipped_and_counted(tmp_path, tokenizer):
    (tmp_path / "blank.txt").write_text("  \n\t\n", encoding="utf-8")
    (tmp_path / "real.txt").write_text("the dog", encoding="utf-8")
    _write_jsonl(tmp_path / "docs.jsonl", ["fox", "   ", "\n", "dog"])
    pq.write_table(pa.table({"text": ["time", None, "", " "]}), tmp_path / "docs.parquet")
    stats = CorpusStats()
    config = CorpusConfig(seq_len=3)
    units = list(iter_units([tmp_path], config, stats))
    assert [d for u in units for d in u.documents] == ["fox", "dog", "time", "the dog"]
    assert (stats.num_documents, stats.num_empty_documents, stats.num_units) == (4, 6, 3)
    sequences = [s for u in units for s in tokenize_unit(u, tokenizer, config, stats)]
    assert stats.num_sequences == len(sequences) == 5  # "the dog" -> <s> the dog </s> -> two chunks of seq_len 3
    assert stats.num_tokens == sum(len(s.input_ids) for s in sequences)


# --- ids and partitions -------------------------------------------------------------------------

def test_sequence_ids_are_unique_stable_across_runs_and_pinned(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS * 3)
    first = _sequences([tmp_path], tokenizer, unit_documents=4)
    second = _sequences([tmp_path], tokenizer, unit_documents=4)
    assert [s.sequence_id for s in first] == [s.sequence_id for s in second]
    assert len({s.sequence_id for s in first}) == len(first)
    assert first[0].sequence_id == sequence_id("docs.jsonl#0", 0) == "196845b3c3596a3b14fe1a52"


def test_partition_and_sequence_id_do_not_depend_on_the_python_hash_seed():
    code = ("from kdstore.corpus import partition_of, sequence_id;"
            "print([partition_of(f'f.txt#{i}', 7) for i in range(50)], sequence_id('f.txt#3', 2))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1
    assert outputs.pop().strip().endswith(sequence_id("f.txt#3", 2))


def test_partition_of_splits_units_into_disjoint_sets_whose_union_is_all_units():
    keys = [f"part-{i // 10}.jsonl#{i % 10}" for i in range(400)]
    for num_partitions in (1, 2, 3, 8):
        parts = [{k for k in keys if partition_of(k, num_partitions) == p} for p in range(num_partitions)]
        assert sum(len(p) for p in parts) == len(keys) and set().union(*parts) == set(keys)
        assert all(len(p) > 400 / num_partitions / 2 for p in parts)  # sha256 spreads keys roughly evenly


def test_sequences_are_the_same_whatever_the_number_of_partitions(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS * 6)
    config = CorpusConfig(seq_len=5, unit_documents=3)
    single = {s.sequence_id: s.input_ids.tolist()
              for u in iter_units([tmp_path], config) for s in tokenize_unit(u, tokenizer, config)}
    for num_partitions in (2, 5):
        merged = {}
        for p in range(num_partitions):
            units = [u for u in iter_units([tmp_path], config) if partition_of(u.key, num_partitions) == p]
            part = {s.sequence_id: s.input_ids.tolist() for u in units for s in tokenize_unit(u, tokenizer, config)}
            assert not merged.keys() & part.keys()
            merged.update(part)
        assert merged == single


def test_partition_of_rejects_zero_partitions():
    with pytest.raises(CorpusError, match="num_partitions"):
        partition_of("a#0", 0)


# --- chunking and special tokens ----------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(doc_lengths=st.lists(st.integers(0, 40), min_size=1, max_size=5), seq_len=st.integers(2, 12), pack=st.booleans())
def test_overlap_by_one_chunking_makes_every_token_after_the_first_a_target_exactly_once(tokenizer, doc_lengths, seq_len, pack):
    documents = tuple(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(n)) for i, n in enumerate(doc_lengths))
    streams = [[tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(d.split()), tokenizer.eos_token_id] for d in documents]
    if pack:
        streams = [[t for s in streams for t in s]]
    sequences = tokenize_unit(WorkUnit("u#0", "u", 0, documents), tokenizer, CorpusConfig(seq_len=seq_len, pack=pack))
    assert all(2 <= len(s.input_ids) <= seq_len and s.input_ids.dtype == np.int32 for s in sequences)
    chunks = [s.input_ids.tolist() for s in sequences]
    for stream in streams:
        count = math.ceil((len(stream) - 1) / (seq_len - 1))
        mine, chunks = chunks[:count], chunks[count:]
        assert [t for c in mine for t in c[1:]] == stream[1:]  # targets: each token after the first, once, in order
        assert [t for c in mine for t in c[:-1]] == stream[:-1]  # inputs: the stream without its last token
        assert all(len(c) == seq_len for c in mine[:-1])  # only a stream's last chunk may be short
    assert chunks == []


def test_short_document_gives_one_unpadded_sequence(tokenizer):
    (sequence,) = tokenize_unit(WorkUnit("u#0", "u", 0, ("fox",)), tokenizer, CorpusConfig(seq_len=16))
    assert sequence.input_ids.tolist() == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("fox"), tokenizer.eos_token_id]


@pytest.mark.parametrize("post_processor", [None, "<s> $A", "$A </s>", "<s> $A </s>"])
def test_bos_and_eos_are_added_exactly_once_whether_or_not_the_tokenizer_adds_them(post_processor):
    tokenizer = _tokenizer(post_processor)
    units = [WorkUnit("u#0", "u", 0, ("the fox", "in time saves nine"))]
    (first, second) = tokenize_unit(units[0], tokenizer, CorpusConfig(seq_len=64))
    for sequence, words in ((first, "the fox"), (second, "in time saves nine")):
        assert sequence.input_ids.tolist() == [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(words.split()),
                                               tokenizer.eos_token_id]


# --- errors -------------------------------------------------------------------------------------

def test_non_utf8_bytes_raise_corpus_error_naming_the_file_and_byte_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the quick fox\nab\xffcd\n")
    with pytest.raises(CorpusError, match=r"bad\.txt is not valid UTF-8 at byte offset 16") as caught:
        list(iter_units([bad], CorpusConfig(seq_len=4)))
    _one_line_with_hint(caught.value)
    assert "errors='replace'" in caught.value.hint


def test_non_utf8_bytes_in_jsonl_raise_corpus_error_with_the_offset(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl is not valid UTF-8 at byte offset 25"):
        list(iter_units([bad], CorpusConfig(seq_len=4)))


def test_errors_replace_reads_bad_bytes_as_the_replacement_character(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ab\xffcd")
    (unit,) = iter_units([bad], CorpusConfig(seq_len=4, errors="replace"))
    assert unit.documents == ("ab\ufffdcd",)


@pytest.mark.parametrize("line, message", [
    ("not json", r"line 2 is not valid JSON"),
    ('{"body": "no text field"}', r"line 2 has no field 'text'"),
    ('["a list"]', r"line 2 has no field 'text'"),
    ('{"text": 7}', r"line 2: field 'text' is int"),
])
def test_bad_jsonl_line_raises_corpus_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"docs\.jsonl {message}") as caught:
        list(iter_units([path], CorpusConfig(seq_len=4)))
    _one_line_with_hint(caught.value)


@pytest.mark.parametrize("table, message", [
    ({"body": ["x"]}, r"no column 'text' \(columns: body\)"),
    ({"text": [1, 2]}, r"column 'text' has type int64, not string"),
])
def test_parquet_without_a_string_text_column_raises_corpus_error(tmp_path, table, message):
    pq.write_table(pa.table(table), tmp_path / "d.parquet")
    with pytest.raises(CorpusError, match=message):
        list(iter_units([tmp_path], CorpusConfig(seq_len=4)))


def test_a_leading_utf8_bom_is_not_part_of_the_text_and_offsets_still_count_it(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfthe fox")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "dog"}\n')
    assert [u.documents for u in iter_units([tmp_path], CorpusConfig(seq_len=4))] == [("the fox",), ("dog",)]
    (tmp_path / "c.txt").write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(CorpusError, match=r"c\.txt is not valid UTF-8 at byte offset 5"):
        list(iter_units([tmp_path], CorpusConfig(seq_len=4)))


def test_unknown_extension_raises_corpus_error_listing_supported_ones_before_reading_anything(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", ["fine"])
    (tmp_path / "b.csv").write_text("text\nhello\n")
    with pytest.raises(CorpusError, match=r"b\.csv has an unsupported extension '\.csv'") as caught:
        next(iter_units([tmp_path], CorpusConfig(seq_len=4)))
    assert all(ext in caught.value.hint for ext in (".txt", ".md", ".jsonl", ".json", ".parquet", "HF"))


def test_missing_path_raises_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist") as caught:
        list(iter_units([tmp_path / "nope"], CorpusConfig(seq_len=4)))
    _one_line_with_hint(caught.value)


@pytest.mark.parametrize("content", [None, "   \n\n  "])
def test_corpus_without_documents_raises_corpus_error(tmp_path, content):
    if content is not None:
        (tmp_path / "blank.txt").write_text(content)
    with pytest.raises(CorpusError, match=r"corpus .* has no documents") as caught:
        list(iter_units([tmp_path], CorpusConfig(seq_len=4)))
    _one_line_with_hint(caught.value)


def test_two_inputs_with_the_same_source_name_are_rejected(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        _write_jsonl(tmp_path / folder / "d.jsonl", ["fine"])
    with pytest.raises(CorpusError, match="share the source name 'd.jsonl'"):
        list(iter_units([tmp_path / "x" / "d.jsonl", tmp_path / "y" / "d.jsonl"], CorpusConfig(seq_len=4)))


@pytest.mark.parametrize("args, message", [
    ({"seq_len": 1}, "seq_len must be >= 2"),
    ({"seq_len": 4, "split": "paragraph"}, "split must be"),
    ({"seq_len": 4, "errors": "ignore"}, "errors must be"),
    ({"seq_len": 4, "unit_documents": 0}, "unit_documents must be >= 1"),
])
def test_config_rejects_bad_values_eagerly(args, message):
    with pytest.raises(CorpusError, match=message):
        CorpusConfig(**args)
