"""kdstore.vocab and `kdstore check`: every kind of tokenizer pair is classified exactly, and only a student whose
ids mean the store's tokens and whose logits reach them all is accepted (by the report, the CLI and the datasets).

Tokenizers are word-level (`tokenizers` WordLevel): <pad> <s> </s> <unk> at ids 0-3, then w0, w1, ... at 4, 5, ...
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_manifest, synthetic_rows
from kdstore.cli.main import cli
from kdstore.codec import CodecConfig
from kdstore.errors import TokenizerError, TokenizerMismatchError, VerifyError
from kdstore.format import logits_schema, rows_to_table
from kdstore.loader import StreamingDataset, check_tokenizer
from kdstore.shuffle import PlanConfig
from kdstore.store import open_store
from kdstore.vocab import (
    IDENTICAL,
    MISMATCHED,
    PREFIX,
    SPECIAL_TOKENS_DIFFER,
    SUPERSET,
    IdMismatch,
    SpecialDifference,
    compare_vocab,
)
from kdstore.writer import ShardWriter

SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
NUM_IDS = 300  # the store's tokenizer: ids 0..299


def words(num_ids: int = NUM_IDS) -> dict[str, int]:
    return {**SPECIALS, **{f"w{i}": i + 4 for i in range(num_ids - 4)}}


def tokenizer(vocab: dict[str, int], split: str = "Whitespace", **special: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = getattr(pre_tokenizers, split)()
    roles = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", **special}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in roles.items() if v is not None})


def saved(tok, folder: Path, config_vocab_size: int | None = None) -> Path:
    """The tokenizer saved in ``folder``; with ``config_vocab_size`` a model folder: a config.json beside it."""
    tok.save_pretrained(folder)
    if config_vocab_size is not None:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": config_vocab_size}))
    return folder


def store_with(folder: Path, tok, teacher_vocab_size: int = NUM_IDS) -> Path:
    """A store made with tokenizer ``tok`` (shipped in STORE/tokenizer/, recorded in the manifest before writing:
    the shard footers carry the manifest identity) by a teacher with ``teacher_vocab_size`` logits."""
    from kdstore.build import tokenizer_info

    files = saved(tok, folder.parent / f"{folder.name}-tokenizer")
    codec = CodecConfig(k=4, vocab_size=teacher_vocab_size)
    manifest = make_manifest(codec)
    manifest.tokenizer = {**manifest.tokenizer, **tokenizer_info(tok, files), "name": "teacher-tok"}
    schema = logits_schema(codec)
    with ShardWriter(folder, manifest, schema, tokenizer_dir=files) as writer:
        writer.write(rows_to_table(schema, synthetic_rows(codec, 2, 5)))
    return folder


@pytest.fixture
def store(tmp_path) -> Path:
    return store_with(tmp_path / "store", tokenizer(words()))


def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["check", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


# -- identical -----------------------------------------------------------------------
def test_a_copy_of_the_stores_tokenizer_folder_is_identical_by_its_files(store, tmp_path):
    student = Path(shutil.copytree(store / "tokenizer", tmp_path / "student"))
    report = compare_vocab(store, student)
    assert (report.kind, report.same_files, report.compatible, report.problem) == (IDENTICAL, True, True, None)
    assert report.store_num_ids == report.student_num_ids == report.student_logit_size == NUM_IDS
    assert report.cautions == () and report.num_mismatched == 0


def test_other_files_with_the_same_vocabulary_and_special_tokens_are_identical(store, tmp_path):
    student = saved(tokenizer(words(), split="WhitespaceSplit"), tmp_path / "student")  # another pre-tokenizer
    report = compare_vocab(store, student)
    assert (report.kind, report.same_files, report.compatible) == (IDENTICAL, False, True)
    assert "the files differ" in "\n".join(report.lines())


def test_a_tokenizer_object_is_compared_like_a_folder(store):
    report = compare_vocab(store, tokenizer(words()))
    assert (report.kind, report.compatible, report.student_logit_size) == (IDENTICAL, True, NUM_IDS)


# -- same vocabulary, other special tokens ---------------------------------------------------
def test_the_same_map_with_another_eos_is_compatible_and_names_the_eos(store, tmp_path):
    report = compare_vocab(store, saved(tokenizer(words(), eos_token="<unk>"), tmp_path / "student"))
    assert (report.kind, report.compatible) == (SPECIAL_TOKENS_DIFFER, True)
    assert SpecialDifference("eos", 2, 3) in report.special_differences
    assert report.special_differences == (SpecialDifference("eos", 2, 3),)  # not '</s>' and '<unk>' changing flags
    assert "eos: store 2, student 3" in report.cautions[0]


def test_a_student_without_a_pad_token_names_the_role(store, tmp_path):
    report = compare_vocab(store, saved(tokenizer(words(), pad_token=None), tmp_path / "student"))
    assert (report.kind, report.num_mismatched, report.compatible) == (SPECIAL_TOKENS_DIFFER, 0, True)
    assert report.special_differences == (SpecialDifference("pad", 0, None),)
    assert "pad: store 0, student none" in report.cautions[0]


def test_a_word_made_special_or_added_in_the_student_only_is_named_with_its_id(store, tmp_path):
    student = tokenizer(words())
    student.add_special_tokens({"additional_special_tokens": ["w1"]})  # id 5
    student.add_tokens(["w0"])  # id 4: matched before the word-level model, not special
    report = compare_vocab(store, saved(student, tmp_path / "student"))
    assert report.kind == SPECIAL_TOKENS_DIFFER and report.compatible
    assert report.special_differences == (SpecialDifference("added 'w0'", None, 4), SpecialDifference("added 'w1'", None, 5),
                                          SpecialDifference("special 'w1'", None, 5))


# -- prefix and padded superset -----------------------------------------------------
def test_a_padded_superset_with_extra_tokens_above_and_padded_logits_is_compatible(store, tmp_path):
    extra = {**words(), "<think>": NUM_IDS, "</think>": NUM_IDS + 1}
    student = saved(tokenizer(extra), tmp_path / "student", config_vocab_size=384)  # rows padded past len(tokenizer)
    report = compare_vocab(store, student)
    assert (report.kind, report.compatible, report.num_student_only) == (SUPERSET, True, 2)
    assert (report.student_logit_size, report.student_logit_source) == (384, "config.json vocab_size")


def test_the_qwen_case_one_tokenizer_and_padded_logits_of_two_sizes_is_compatible_with_a_caution(tmp_path):
    # Qwen2.5: 151,665 tokenizer ids; a 7B teacher has 152,064 logits, a 0.5B student 151,936 (here 300 / 384 / 320)
    store = store_with(tmp_path / "store", tokenizer(words()), teacher_vocab_size=384)
    report = compare_vocab(store, saved(tokenizer(words()), tmp_path / "student", config_vocab_size=320))
    assert (report.kind, report.compatible, report.teacher_vocab_size, report.student_logit_size) == (IDENTICAL, True,
                                                                                                     384, 320)
    assert len(report.cautions) == 1 and "320..383" in report.cautions[0]


def test_a_model_whose_logits_stop_below_the_stores_ids_is_refused_with_the_uncovered_count(store, tmp_path):
    report = compare_vocab(store, saved(tokenizer(words()), tmp_path / "student", config_vocab_size=296))
    assert not report.compatible and report.kind == IDENTICAL
    assert report.problem == ("identical: the student's 296 logits (config.json vocab_size) do not reach the store's ids "
                              "296..299: 4 store ids uncovered")


def test_a_prefix_is_compatible_only_when_the_students_logits_reach_every_store_id(store, tmp_path):
    student = saved(tokenizer(words(250)), tmp_path / "student")  # no config.json: 250 logits assumed
    report = compare_vocab(store, student)
    assert (report.kind, report.num_store_only, report.compatible) == (PREFIX, 50, False)
    assert "50 store ids uncovered" in report.problem
    report = compare_vocab(store, student, student_vocab_size=320)
    assert (report.kind, report.compatible, report.student_logit_source) == (PREFIX, True, "student_vocab_size")


# -- mismatched ids -------------------------------------------------------------------------
def test_a_student_that_differs_by_exactly_one_id_is_refused_naming_that_token(store, tmp_path):
    vocab = words()
    vocab["w7"] = NUM_IDS  # w7 moved from id 11 to the end; nothing else changes
    report = compare_vocab(store, saved(tokenizer(vocab), tmp_path / "student", config_vocab_size=NUM_IDS + 1))
    assert (report.kind, report.compatible, report.num_mismatched) == (MISMATCHED, False, 1)
    assert report.mismatched == (IdMismatch("w7", 11, NUM_IDS, None),)
    assert report.problem == ("mismatched ids: 1 store token has another id, or none, in the student's vocabulary "
                              "(e.g. 'w7': store id 11, student id 300)")


def test_a_token_renamed_under_the_same_id_is_a_mismatch_showing_what_the_student_has_there(store, tmp_path):
    vocab = {("w7x" if token == "w7" else token): i for token, i in words().items()}
    report = compare_vocab(store, saved(tokenizer(vocab), tmp_path / "student"))
    assert report.mismatched == (IdMismatch("w7", 11, None, "w7x"),) and report.num_mismatched == 1
    assert "(its id 11 is 'w7x')" in report.problem


def test_a_shifted_vocabulary_counts_every_token_and_shows_a_few(store, tmp_path):
    shifted = {token: (i + 1 if i >= 4 else i) for token, i in words().items()}  # one id inserted after the specials
    report = compare_vocab(store, saved(tokenizer(shifted), tmp_path / "student"))
    assert (report.kind, report.num_mismatched, len(report.mismatched)) == (MISMATCHED, NUM_IDS - 4, 5)
    assert report.mismatched[0] == IdMismatch("w0", 4, 5, None)
    assert "  ... and 291 more" in report.lines()


def test_a_student_lacking_store_tokens_while_holding_others_is_mismatched(store, tmp_path):
    vocab = {**words(250), "other": 400}  # ids 250..299 unused by the student, 400 unknown to the store
    report = compare_vocab(store, saved(tokenizer(vocab), tmp_path / "student", config_vocab_size=512))
    assert (report.kind, report.compatible, report.num_mismatched, report.num_student_only) == (MISMATCHED, False, 50, 1)
    assert report.problem.startswith("mismatched vocabularies: 50 store tokens are missing from the student's")


# -- bad input ------------------------------------------------------------------------------
def test_a_student_path_that_does_not_exist_is_refused_without_a_download(store):
    with pytest.raises(TokenizerError, match="Qwen/Qwen2.5-0.5B does not exist.*never downloads"):
        compare_vocab(store, "Qwen/Qwen2.5-0.5B")


def test_a_model_folder_without_tokenizer_files_is_refused(store, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": NUM_IDS}))
    with pytest.raises(TokenizerError, match="model holds no tokenizer files"):
        compare_vocab(store, model)


def test_a_store_without_a_tokenizer_folder_says_so_and_how_to_fix_it(tmp_path, codec):
    from conftest import write_store

    store = write_store(tmp_path / "bare", codec)
    with pytest.raises(TokenizerError, match="has no tokenizer/ folder") as caught:
        compare_vocab(store, tokenizer(words()))
    assert "kdstore build" in caught.value.hint


def test_a_store_tokenizer_edited_after_the_build_is_refused(store):
    (store / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(VerifyError, match="do not match the manifest"):
        compare_vocab(store, tokenizer(words()))


def test_a_remote_stores_tokenizer_is_read_through_the_store_and_compared_alike(store, tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in (p for p in store.rglob("*") if p.is_file()):
        memory.pipe_file(f"/remote-{tmp_path.name}/{path.relative_to(store).as_posix()}", path.read_bytes())
    student = saved(tokenizer({**words(), "extra": NUM_IDS}), tmp_path / "student")
    remote = compare_vocab(open_store(f"memory://remote-{tmp_path.name}"), student)
    local = compare_vocab(store, student)
    assert (remote.kind, remote.compatible) == (local.kind, local.compatible) == (SUPERSET, True)


# -- the datasets' student_tokenizer= -------------------------------------------------------
def test_the_datasets_refuse_a_one_id_mismatch_and_warn_with_allow_mismatch(store, tmp_path):
    vocab = words()
    vocab["w7"] = NUM_IDS
    student = saved(tokenizer(vocab), tmp_path / "student")
    with pytest.raises(TokenizerMismatchError, match=r"tokenizer 'teacher-tok'.*student tokenizer .*student.*'w7'"):
        StreamingDataset(store, PlanConfig(batch_size=1), student_tokenizer=student)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_tokenizer(open_store(store), student, allow_mismatch=True)
    assert any("allow_tokenizer_mismatch=True" in str(w.message) and "'w7'" in str(w.message) for w in caught)


def test_the_datasets_accept_a_superset_and_warn_about_other_special_tokens(store, tmp_path):
    StreamingDataset(store, PlanConfig(batch_size=1), student_tokenizer=tokenizer({**words(), "extra": NUM_IDS}))
    with pytest.warns(UserWarning, match="eos: store 2, student 3"):
        check_tokenizer(open_store(store), tokenizer(words(), eos_token="<unk>"))


# -- the command ----------------------------------------------------------------------------
def test_check_prints_the_report_and_exits_0_for_a_compatible_student(store, tmp_path):
    code, output = run(store, "--student", saved(tokenizer(words()), tmp_path / "student", config_vocab_size=320))
    assert code == 0, output
    assert "vocabulary         identical" in output and output.rstrip().endswith("compatible for distillation: yes")


def test_check_ends_with_one_error_line_naming_the_mismatch_and_its_count(store, tmp_path):
    vocab = words()
    vocab["w7"] = NUM_IDS
    code, output = run(store, "--student", saved(tokenizer(vocab), tmp_path / "student"))
    lines = output.strip().splitlines()
    assert code == 1 and [line for line in lines if line.startswith("Error:")] == [lines[-1]], output
    assert lines[-1].startswith("Error: mismatched ids: 1 store token") and "'w7'" in lines[-1]
    assert "  'w7': store id 11, student id 300" in lines


def test_check_json_is_the_report_and_keeps_the_exit_status(store, tmp_path):
    student = saved(tokenizer(words(250)), tmp_path / "student")
    code, output = run(store, "--student", student, "--json", "--student-vocab-size", "300")
    assert code == 0, output
    data = json.loads(output)
    assert (data["kind"], data["compatible"], data["num_store_only"], data["student_logit_size"]) == (PREFIX, True, 50, 300)
    code, output = run(store, "--student", student, "--json")
    assert code == 1 and json.loads(output[:output.rindex("}") + 1])["compatible"] is False
