"""The code's schemas and manifests agree with the language-neutral spec in schemas/."""

from __future__ import annotations

import json

import pytest

from kdstore.codec import Codebook, CodecConfig
from kdstore.errors import FormatVersionError, ManifestError
from kdstore.format import (
    FORMAT_VERSION,
    SCORE_COLUMNS,
    Manifest,
    arrow_schema_to_spec,
    generations_schema,
    load_schema_file,
    logits_schema,
    safe_relative_path,
    validate_manifest,
)


def _spec_fields(name: str, code_dtype: str) -> dict[str, dict]:
    spec = load_schema_file(name)
    return {f["name"]: {**f, "type": f["type"].replace("CODE", code_dtype)} for f in spec["fields"]}


@pytest.mark.parametrize("codebook", [Codebook(), Codebook(sqrt_scale=60, log_step=0.5)])
@pytest.mark.parametrize("tail, target, draws", [(True, True, 0), (False, False, 0), (True, True, 16)])
def test_logits_schema_in_code_matches_schemas_folder(codebook, tail, target, draws):
    codec = CodecConfig(k=4, vocab_size=100, codebook=codebook, tail=tail, target=target, sampled_draws=draws)
    spec = _spec_fields("logits.arrow.json", codec.to_dict()["logprobs"]["dtype"])
    fields = arrow_schema_to_spec(logits_schema(codec, SCORE_COLUMNS))
    present = {"always": True, "codec.tail": tail, "codec.target": target, "codec.sampled": bool(draws), "optional": True}
    assert [f["name"] for f in fields] == [name for name, f in spec.items() if present[f["present"]]]
    for field in fields:
        assert (field["type"], field["nullable"]) == (spec[field["name"]]["type"], spec[field["name"]]["nullable"])


@pytest.mark.parametrize("codebook", [Codebook(), Codebook(sqrt_scale=60, log_step=0.5)])
@pytest.mark.parametrize("draws", [0, 16])
def test_generations_schema_in_code_matches_schemas_folder(codebook, draws):
    codec = CodecConfig(k=4, vocab_size=100, codebook=codebook, sampled_draws=draws)
    spec = _spec_fields("generations.arrow.json", codec.to_dict()["logprobs"]["dtype"])
    fields = arrow_schema_to_spec(generations_schema(codec))
    present = {"always": True, "codec.sampled": bool(draws)}
    assert [f["name"] for f in fields] == [name for name, f in spec.items() if present[f["present"]]]
    for field in fields:
        assert (field["type"], field["nullable"]) == (spec[field["name"]]["type"], spec[field["name"]]["nullable"])


def _manifest_json(codec: CodecConfig) -> dict:
    manifest = Manifest(table="logits", teacher={"model": "m", "revision": None, "content_sha256": None, "dtype": "float32",
                                                  "vocab_size": 100},
                        tokenizer={"name": "t", "files_sha256": None, "vocab_size": 100, "special_ids": {"eos": 2}},
                        codec=codec.to_dict(), build={"seq_len": 8}, columns=logits_schema(codec).names,
                        kdstore_version="0.1.0", created_at="2026-01-01T00:00:00Z")
    return json.loads(manifest.to_json())


def test_manifest_written_by_code_validates_against_json_schema():
    data = _manifest_json(CodecConfig(k=4, vocab_size=100, sampled_draws=8))
    validate_manifest(data)
    assert Manifest.from_json(json.dumps(data)).codec_config() == CodecConfig(k=4, vocab_size=100, sampled_draws=8)


def test_sampled_scheme_is_recorded_and_a_manifest_without_it_reads_as_iid():
    codec = CodecConfig(k=4, vocab_size=100, sampled_draws=8, sampled_scheme="systematic")
    data = _manifest_json(codec)
    validate_manifest(data)
    assert Manifest.from_json(json.dumps(data)).codec_config() == codec
    del data["codec"]["sampled"]["scheme"]  # written before the key existed
    validate_manifest(data)
    assert Manifest.from_json(json.dumps(data)).codec_config().sampled_scheme == "iid"


def test_newer_format_version_is_refused_with_upgrade_hint():
    data = _manifest_json(CodecConfig(k=4, vocab_size=100))
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(FormatVersionError, match=f"version {FORMAT_VERSION + 1}") as info:
        Manifest.from_json(json.dumps(data))
    assert "upgrade" in info.value.hint


def test_a_version_2_shard_without_row_group_checksums_is_refused_and_version_1_reads_without_them():
    data = _manifest_json(CodecConfig(k=4, vocab_size=100))
    data["shards"] = [{"path": "shards/a.parquet", "num_rows": 1, "num_tokens": 2, "num_bytes": 3, "sha256": "0" * 64}]
    with pytest.raises(ManifestError, match="footer_sha256"):
        Manifest.from_json(json.dumps(data))
    data["format_version"] = 1
    assert Manifest.from_json(json.dumps(data)).shards[0].row_group_sha256 is None


@pytest.mark.parametrize("path", ["../x.parquet", "/etc/x.parquet", "shards/../../x.parquet"])
def test_manifest_paths_outside_the_store_are_refused(path):
    data = _manifest_json(CodecConfig(k=4, vocab_size=100))
    data["shards"] = [{"path": path, "num_rows": 1, "num_tokens": 2, "num_bytes": 3, "sha256": "0" * 64}]
    with pytest.raises(ManifestError, match="outside the store|does not match"):
        Manifest.from_json(json.dumps(data))
    with pytest.raises(ManifestError):
        safe_relative_path(path)


def test_manifest_missing_a_required_field_names_it():
    data = _manifest_json(CodecConfig(k=4, vocab_size=100))
    del data["teacher"]["vocab_size"]
    with pytest.raises(ManifestError, match="teacher.*vocab_size"):
        Manifest.from_json(json.dumps(data))


def test_not_json_is_a_manifest_error():
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json("{nope")
