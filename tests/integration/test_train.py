"""`kdstore train` end to end on a tiny store from the bundled teacher: learning, exact resume, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kdstore.train as train_module
from kdstore.build import DEFAULT_CORPUS, BuildConfig, build
from kdstore.cli.main import cli
from kdstore.errors import KdstoreError
from kdstore.train import (
    CHECKPOINT_NAME,
    NonFiniteLossError,
    ResumeMismatchError,
    StudentMismatchError,
    TrainConfig,
    open_data,
    resolved_config,
    train,
)


def student_config(folder: Path, vocab_size: int = 4096) -> Path:
    """A 1-layer, 32-wide Llama (~140k parameters, nearly all embedding) as a config.json."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "tie_word_embeddings": True}
    path = folder / f"student-{vocab_size}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """~100 sequences of <= 64 tokens: the first 12 kB of one corpus file through the bundled teacher, K=8."""
    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    corpus.mkdir()
    text = Path(DEFAULT_CORPUS, "stories.txt").read_text()[:12000]
    (corpus / "stories.txt").write_text(text[:text.rindex("\n\n")])
    build(BuildConfig(corpus=(str(corpus),), out=str(root / "store"), k=8, seq_len=64, progress=False, device="cpu"))
    return root / "store"


@pytest.fixture
def config(store: Path, tmp_path: Path) -> TrainConfig:
    return TrainConfig(store=str(store), student=str(student_config(tmp_path)), out=str(tmp_path / "run"), steps=8,
                       batch_size=8, lr=3e-3, warmup_steps=2, val_fraction=0.2, val_every=0, checkpoint_every=0,
                       log_every=1, device="cpu")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / CHECKPOINT_NAME, weights_only=False)["model"]


def crash_on_call(monkeypatch, number: int, nan: bool = False) -> None:
    """Make the loss raise (or return NaN) on its ``number``-th call: a crash, or a diverging batch."""
    real, calls = train_module.distillation_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            if not nan:
                raise RuntimeError("simulated crash")
            value, metrics = real(*args, **kwargs)
            return value * math.nan, metrics
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "distillation_loss", loss)


def test_loss_and_validation_loss_decrease_over_a_few_dozen_steps(config):
    result = train(replace(config, steps=30, val_every=10, log_every=5), log=lambda _: None)
    losses = [e["loss"] for e in result.history if "loss" in e]
    val = [e["val_loss"] for e in result.history if "val_loss" in e]
    assert losses[-1] < 0.8 * losses[0]
    assert len(val) == 3 and val[-1] < val[0]
    assert result.tokens_per_second > 0 and Path(config.out, "student", "tokenizer.json").is_file()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_after_a_crash_ends_with_bit_identical_weights(config, monkeypatch, grad_accum):
    batches_per_epoch = math.ceil(len(open_data(config).train_rows) / config.batch_size)
    # accum 1: the last checkpoint falls exactly at an epoch's end; accum 2: mid-epoch, the crash after a boundary
    crash_step = batches_per_epoch + 1 if grad_accum == 1 else batches_per_epoch // 2 + 2
    config = replace(config, grad_accum=grad_accum, steps=crash_step + 2, checkpoint_every=1, log_every=1, val_every=3)
    straight = train(replace(config, out=config.out + "-straight"), log=lambda _: None)
    with monkeypatch.context() as patch:
        crash_on_call(patch, (crash_step - 1) * grad_accum + 1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(config, log=lambda _: None)
    assert torch.load(Path(config.out, CHECKPOINT_NAME), weights_only=False)["step"] == crash_step - 1
    resumed = train(config, resume=True, log=lambda _: None)
    expected, got = weights(Path(config.out + "-straight")), weights(Path(config.out))
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    def losses(result):
        return [(e["step"], e.get("loss"), e.get("val_loss")) for e in result.history]

    assert losses(resumed) == losses(straight)


def test_resume_with_other_settings_is_refused_naming_them(config):
    train(replace(config, steps=2), log=lambda _: None)
    changed = replace(config, steps=2, lr=1e-2, loss=replace(config.loss, name="jsd"))
    with pytest.raises(ResumeMismatchError, match=r"loss\.name = 'forward_kl' in the checkpoint, 'jsd' now.*lr = 0\.003"):
        train(changed, resume=True, log=lambda _: None)
    with pytest.raises(KdstoreError, match="already holds a checkpoint"):
        train(replace(config, steps=2), log=lambda _: None)


def test_student_vocabulary_must_match_the_store_with_both_numbers(config, tmp_path):
    with pytest.raises(StudentMismatchError, match="vocabulary has 4096 tokens but student .* has 1000 output logits"):
        train(replace(config, student=str(student_config(tmp_path, vocab_size=1000))), log=lambda _: None)


def test_unknown_loss_lists_the_valid_ones(config):
    with pytest.raises(KdstoreError) as error:
        resolved_config({"store": config.store, "student": config.student, "loss": "kl_magic"})
    assert "kl_magic" in error.value.one_line() and "forward_kl, reverse_kl, jsd" in error.value.one_line()


def test_nan_loss_stops_naming_step_and_batch_and_keeps_the_last_good_checkpoint(config, monkeypatch):
    crash_on_call(monkeypatch, 5, nan=True)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 5 \(rank 0 epoch 0 batch 4: store rows \[.*"
                                                 r"sequence ids .*checkpoint is .*\(step 4\)"):
        train(replace(config, checkpoint_every=2), log=lambda _: None)
    saved = torch.load(Path(config.out, CHECKPOINT_NAME), weights_only=False)
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_cli_trains_from_a_toml_config_and_prints_one_line_errors(config, tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text(f'student = "{config.student}"\nsteps = 3\nwarmup_steps = 1\nval_fraction = 0.2\n'
                    'log_every = 1\n\n[loss]\nname = "jsd"\nbeta = 0.3\n')
    out = tmp_path / "cli-run"
    args = ["train", config.store, "--out", str(out), "--config", str(toml), "--batch-size", "4", "--ce-weight", "0.2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "step 3" in result.output and "done: step 3" in result.output
    saved = torch.load(out / CHECKPOINT_NAME, weights_only=False)["config"]
    assert (saved["loss.name"], saved["loss.beta"], saved["loss.ce_weight"], saved["batch_size"]) == ("jsd", 0.3, 0.2, 4)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(out / "student").config.vocab_size == 4096
    assert AutoTokenizer.from_pretrained(out / "student")("hello").input_ids[0] == 1
    bad = CliRunner().invoke(cli, [*args, "--loss", "kl_magic"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: unknown loss 'kl_magic'") and bad.output.count("\n") == 1
    assert "Example:" in CliRunner().invoke(cli, ["train", "--help"]).output


def test_two_ranks_under_torchrun_share_the_steps_and_save_both_loader_states(config, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "kdstore.cli.main", "train", config.store, "--student", config.student, "--out", str(out),
               "--steps", "3", "--batch-size", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[:6000]
    assert "2 rank(s)" in done.stdout and done.stdout.count("done: step 3") == 1  # rank 0 alone logs
    saved = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    assert saved["world_size"] == 2 and saved["step"] == 3
    assert [r["loader"] != {} for r in saved["ranks"]] == [True, True]
