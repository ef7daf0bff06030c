"""Config files and flags are held against the dataclasses' types and ranges before any model loads."""

from __future__ import annotations

import re
import typing
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import pytest
from click.testing import CliRunner
from pydantic import Field

import kdstore.build as build_module
import kdstore.train as train_module
from kdstore.build import BuildConfig
from kdstore.cli.main import cli
from kdstore.codec import SAMPLED_SCHEMES
from kdstore.config_file import check_config, expected
from kdstore.errors import BuildError, TrainError
from kdstore.teacher import DTYPES
from kdstore.train import TrainConfig


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Any attempt to load a teacher, open a store or load a student fails the test: checks come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model or store was loaded before the settings were checked")

    for module, name in ((build_module, "load_teacher"), (build_module, "iter_units"), (train_module, "open_data"),
                         (train_module, "load_student")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.delenv("KDSTORE_TRUST_REMOTE_CODE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def error_line(args: list[str]) -> str:
    """The CLI's output for ``args``: exactly one line, ``Error: ...``, exit status 1."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: ")
    return result.output


def test_wrong_types_in_build_toml_are_named_with_the_value_and_the_expected_type(tmp_path):
    toml = tmp_path / "build.toml"
    toml.write_text('k = "8"\nseq_len = "abc"\npack = 1\nsplit = "paragraph"\ncorpus = ["a", 3]\n')
    line = error_line(["build", "--config", str(toml), "--out", str(tmp_path / "s")])
    assert f"invalid build settings (from {toml} and the flags)" in line
    for clause in ('k = "8": expected an integer >= 1', 'seq_len = "abc": expected an integer >= 2',
                   "pack = 1: expected true or false", 'split = "paragraph": expected one of "file", "blank-line"',
                   'corpus = ["a", 3]: expected a list of strings'):
        assert clause in line


def test_wrong_types_in_train_toml_and_its_loss_table_are_named(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('student = "s.json"\nsteps = "10"\nlr = "1e-3"\nseed = true\n')
    line = error_line(["train", "store", "--config", str(toml)])
    for clause in ('steps = "10": expected an integer >= 1', 'lr = "1e-3": expected a number > 0',
                   "seed = true: expected an integer >= 0"):
        assert clause in line
    toml.write_text('student = "s.json"\n[loss]\nname = "jsd"\nbeta = "half"\n')
    assert 'loss.beta = "half": expected a number' in error_line(["train", "store", "--config", str(toml)])
    toml.write_text('student = "s.json"\nloss = "jsd"\n')
    assert "expected a [loss] table" in error_line(["train", "store", "--config", str(toml)])


@pytest.mark.parametrize(("flags", "clause"), [
    (["--lr", "-1"], "lr = -1.0: expected a number > 0"),
    (["--lr", "0"], "lr = 0.0: expected a number > 0"),
    (["--steps", "0"], "steps = 0: expected an integer >= 1"),
    (["--steps", "-5"], "steps = -5: expected an integer >= 1"),
    (["--batch-size", "0"], "batch_size = 0: expected an integer >= 1"),
])
def test_out_of_range_train_flags_name_the_setting_the_value_and_the_range(flags, clause):
    line = error_line(["train", "no-such-store", "--student", "s.json", *flags])
    assert clause in line and "invalid training settings" in line


@pytest.mark.parametrize(("flags", "toml", "clause"), [
    (["-k", "0"], "", "k = 0: expected an integer >= 1"),
    (["--seq-len", "1"], "", "seq_len = 1: expected an integer >= 2"),
    (["--sampled-draws", "70000"], "", "sampled_draws = 70000: expected an integer >= 0 and <= 65535"),
    ([], "shard_bytes = -1\n", "shard_bytes = -1: expected an integer >= 1"),
    ([], "batch_tokens = 0\n", "batch_tokens = 0: expected an integer >= 1"),
    ([], "num_partitions = 2\npartition = 2\n", "partition = 2: expected 0 to 1 (num_partitions = 2)"),
])
def test_out_of_range_build_settings_name_the_setting_the_value_and_the_range(tmp_path, flags, toml, clause):
    config = tmp_path / "build.toml"
    config.write_text(toml)
    assert clause in error_line(["build", "--config", str(config), "--out", str(tmp_path / "s"), *flags])


def test_non_finite_floats_are_refused_though_toml_allows_them(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('student = "s.json"\nlr = inf\nweight_decay = nan\n')
    line = error_line(["train", "store", "--config", str(toml)])
    assert "lr = inf: expected a number > 0" in line and "weight_decay = nan: expected a number >= 0" in line


def test_an_integer_is_accepted_where_a_float_is_expected_and_becomes_one():
    config = train_module.resolved_config({"store": "s", "student": "s.json", "lr": 1, "ce_weight": 0})
    assert (config.lr, type(config.lr), type(config.loss.ce_weight)) == (1.0, float, float)
    assert type(TrainConfig(store="s", student="s.json", grad_clip=2).grad_clip) is float


def test_the_python_api_is_checked_the_same_way():
    with pytest.raises(TrainError, match=r"steps = 0: expected an integer >= 1; lr = -0\.5: expected a number > 0"):
        TrainConfig(store="s", student="s.json", lr=-0.5, steps=0)
    with pytest.raises(BuildError, match='k = "8": expected an integer >= 1'):
        BuildConfig(k="8")
    assert BuildConfig(corpus=["a", "b"]).corpus == ("a", "b")  # a list, as TOML and the docstring give it


def test_unknown_keys_are_named_with_the_known_ones(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('student = "s.json"\nstepz = 3\n[loss]\nbetta = 0.3\n')
    result = CliRunner().invoke(cli, ["train", "store", "--config", str(toml)])
    assert "unknown keys: stepz (known keys: batch_size," in result.output
    toml.write_text('student = "s.json"\n[loss]\nbetta = 0.3\n')
    assert "unknown keys: loss.betta (known keys under [loss]: alpha," in error_line(["train", "store", "--config", str(toml)])


def test_trust_remote_code_in_build_toml_is_refused_pointing_at_the_flag_and_the_variable(tmp_path):
    toml = tmp_path / "build.toml"
    toml.write_text("trust_remote_code = true\n")
    line = error_line(["build", "--config", str(toml), "--out", str(tmp_path / "s")])
    assert f"{toml} sets trust_remote_code" in line
    assert "pass --trust-remote-code on the command line or set KDSTORE_TRUST_REMOTE_CODE=1" in line


def test_trust_remote_code_comes_only_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    toml = tmp_path / "build.toml"
    toml.write_text("k = 4\n")
    assert not build_module.resolved_config({"trust_remote_code": None}, str(toml)).trust_remote_code
    assert build_module.resolved_config({"trust_remote_code": True}, str(toml)).trust_remote_code
    monkeypatch.setenv("KDSTORE_TRUST_REMOTE_CODE", "1")
    assert build_module.resolved_config({"trust_remote_code": None}, str(toml)).trust_remote_code
    monkeypatch.setenv("KDSTORE_TRUST_REMOTE_CODE", "0")
    assert not build_module.resolved_config({}, None).trust_remote_code


def test_the_choices_the_types_declare_are_the_ones_the_code_accepts():
    hints = typing.get_type_hints(BuildConfig)
    assert set(typing.get_args(hints["dtype"])) == set(DTYPES)
    assert set(typing.get_args(hints["sampled_scheme"])) == set(SAMPLED_SCHEMES)
    every = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(BuildConfig)}
    assert {"lr", "steps", "k", "seq_len", "shard_bytes", "trust_remote_code"} <= every


def test_expected_says_the_type_and_the_range_in_words():
    assert expected(Annotated[float, Field(ge=0, le=1)]) == "a number >= 0 and <= 1"
    assert expected(Annotated[int, Field(gt=0)]) == "an integer > 0"
    assert expected(tuple[str, ...]) == "a list of strings"
    assert expected(typing.Literal["a", "b"]) == 'one of "a", "b"'
    assert check_config(BuildConfig, {"corpus": ["x"]}, BuildError) == {"corpus": ("x",)}


def test_the_settings_example_in_docs_train_md_passes_the_checks(tmp_path):
    page = (Path(__file__).parents[2] / "docs" / "train.md").read_text()
    toml = tmp_path / "train.toml"
    toml.write_text(re.findall(r"```toml\n(.*?)```", page, flags=re.S)[0])
    config = train_module.resolved_config({"store": "my-store"}, str(toml))
    assert (config.steps, config.grad_accum, config.loss.name, config.loss.ce_weight) == (2000, 2, "jsd", 0.1)
