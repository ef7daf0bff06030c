"""`kdstore train` end to end on a tiny store from the bundled teacher: learning, exact resume, bad input."""

from __future__ import annotations

import json
import math
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import kdstore.train as train_module
from conftest import write_store
from kdstore.build import DEFAULT_CORPUS, DEFAULT_TEACHER, BuildConfig, build
from kdstore.checkpoint import read_checkpoint
from kdstore.cli.main import cli
from kdstore.codec import CodecConfig
from kdstore.errors import (
    KdstoreError,
    NonFiniteLossError,
    ResumeMismatchError,
    StudentMismatchError,
    TokenizerMismatchError,
)
from kdstore.student import check_student_source
from kdstore.train import TrainConfig, open_data, resolved_config, train


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
    return read_checkpoint(run)["model"]


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
    assert read_checkpoint(Path(config.out))["step"] == crash_step - 1
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


def test_a_student_with_padded_logits_trains_on_the_store(config, tmp_path):
    """More logits than the store's vocabulary (the 151,936 vs 152,064 case): the loss normalises over them."""
    result = train(replace(config, student=str(student_config(tmp_path, vocab_size=4096 + 128)), steps=2),
                   log=lambda _: None)
    assert result.step == 2 and math.isfinite(result.history[-1]["loss"])


def test_a_student_folder_whose_tokenizer_moves_one_id_is_refused_with_the_report(config, store, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "student"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.student)).save_pretrained(folder)
    for path in (store / "tokenizer").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    (a, ia), (b, ib) = sorted(vocab.items(), key=lambda item: item[1])[100:102]
    vocab[a], vocab[b] = ib, ia  # two tokens swap their ids
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(TokenizerMismatchError, match="mismatched ids: 2 store tokens"):
        train(replace(config, student=str(folder), steps=1), log=lambda _: None)


def test_unknown_loss_lists_the_valid_ones(config):
    with pytest.raises(KdstoreError) as error:
        resolved_config({"store": config.store, "student": config.student, "loss": "kl_magic"})
    assert "kl_magic" in error.value.one_line() and "forward_kl, reverse_kl, jsd" in error.value.one_line()


def test_nan_loss_stops_naming_step_and_batch_and_keeps_the_last_good_checkpoint(config, monkeypatch):
    crash_on_call(monkeypatch, 5, nan=True)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 5 \(rank 0 epoch 0 batch 4: store rows \[.*"
                                                 r"sequence ids .*checkpoint is .*\(step 4\)"):
        train(replace(config, checkpoint_every=2), log=lambda _: None)
    saved = read_checkpoint(Path(config.out))
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
    saved = read_checkpoint(out)["config"]
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
    saved = read_checkpoint(out)
    assert saved["world_size"] == 2 and saved["step"] == 3
    assert [r["loader"] != {} for r in saved["ranks"]] == [True, True]


# -- checkpoints hold no pickle, and a crafted one is refused in one line ----
class PlantsAMarker:
    """Unpickling this creates ``marker``: what a malicious checkpoint.pt could do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def resume_line(config: TrainConfig) -> str:
    """`kdstore train --resume` on ``config``'s run (its settings as train.toml): one `Error:` line, exit status 1."""
    toml = Path(config.out).with_name("resume.toml")
    settings = {k: v for k, v in asdict(config).items() if k not in ("store", "loss")}
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()) + "[loss]\n"
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in asdict(config.loss).items()))
    result = CliRunner().invoke(cli, ["train", config.store, "--config", str(toml), "--resume"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    return result.output


@pytest.mark.parametrize("where", ["checkpoint.pt", "checkpoint/state.json", "checkpoint/tensors.safetensors"])
def test_resume_never_unpickles_a_planted_checkpoint(config, tmp_path, where):
    marker = tmp_path / "marker"
    payload = pickle.dumps({"model": PlantsAMarker(marker)})
    pickle.loads(payload)  # the payload works: loading it the old way would have run it
    assert marker.exists()
    marker.unlink()
    planted = Path(config.out, where)
    planted.parent.mkdir(parents=True)
    planted.write_bytes(payload)
    if where.startswith("checkpoint/"):
        other = {"state.json": "tensors.safetensors", "tensors.safetensors": "state.json"}[planted.name]
        (planted.parent / other).write_bytes(payload)
    line = resume_line(config)
    assert not marker.exists()
    if where == "checkpoint.pt":
        assert "checkpoint.pt is an old, unsafe checkpoint format (a pickle" in line
    else:
        assert "is not a checkpoint kdstore can read" in line


def tamper(run: Path, state: dict | None = None, tensors: dict | None = None) -> None:
    """Rewrite RUN/checkpoint/: ``state`` keys replace state.json's, ``tensors`` entries the safetensors file's."""
    folder = run / "checkpoint"
    if state:
        saved = json.loads((folder / "state.json").read_text())
        saved.update(state)
        (folder / "state.json").write_text(json.dumps(saved))
    if tensors:
        save_file({**load_file(folder / "tensors.safetensors"), **tensors}, folder / "tensors.safetensors")


@pytest.mark.parametrize(("state", "tensors", "message"), [
    ({"step": "2"}, None, 'step = "2": expected an integer >= 0'),
    ({"world_size": 1.5}, None, "world_size = 1.5: expected an integer >= 1"),
    ({"format": "torch.save"}, None, "is not a kdstore-checkpoint/1 checkpoint (format 'torch.save')"),
    ({"history": {"__tensor__": "nowhere"}}, None, "names a tensor 'nowhere' that tensors.safetensors does not hold"),
    ({"taid": None, "model": {"__items__": "x"}}, None, "malformed __items__"),
    (None, {"model/lm_head.weight": torch.zeros(7, 32)}, "model/lm_head.weight: float32 [7, 32] in the checkpoint, "
                                                         "float32 [4096, 32] now"),
    (None, {"model/lm_head.weight": torch.zeros(4096, 32, dtype=torch.int64)}, "model/lm_head.weight: int64"),
    (None, {"ranks/0/rng/torch": torch.zeros(5056)}, "rng/torch: float32 [5056] in the checkpoint, uint8 [5056] now"),
])
def test_resume_refuses_a_crafted_checkpoint_with_wrong_types_in_one_line(config, state, tensors, message):
    train(replace(config, steps=2), log=lambda _: None)
    tamper(Path(config.out), state, tensors)
    assert message in resume_line(replace(config, steps=2))


def test_resume_refuses_crafted_loader_and_optimizer_states_naming_where(config):
    train(replace(config, steps=2), log=lambda _: None)
    run = Path(config.out)
    saved = json.loads((run / "checkpoint" / "state.json").read_text())
    saved["ranks"][0]["loader"]["_index_sampler_state"]["batches_yielded"] = "2"
    (run / "checkpoint" / "state.json").write_text(json.dumps(saved))
    assert ("loader/_index_sampler_state/batches_yielded: str '2' in the checkpoint, int now"
            in resume_line(replace(config, steps=2)))
    train(replace(config, steps=2, out=config.out + "-2"), log=lambda _: None)
    tamper(Path(config.out + "-2"), tensors={"optimizer/state/0/exp_avg": torch.zeros(3)})
    line = resume_line(replace(config, steps=2, out=config.out + "-2"))
    assert "optimizer/state/0/exp_avg: float32 [3] in the checkpoint" in line


def test_a_checkpoint_is_json_and_safetensors_and_survives_a_crash_between_its_renames(config, monkeypatch):
    config = replace(config, steps=4, checkpoint_every=1)
    with monkeypatch.context() as patch:
        crash_on_call(patch, 3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(config, log=lambda _: None)
    run = Path(config.out)
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["state.json", "tensors.safetensors"]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["format"] == "kdstore-checkpoint/1"
    assert not list(run.glob("checkpoint.*"))  # neither a temporary folder nor the previous checkpoint is left
    (run / "checkpoint").rename(run / "checkpoint.previous")  # a crash after the first of the two renames
    assert read_checkpoint(run)["step"] == 2
    resumed = train(config, resume=True, log=lambda _: None)
    assert resumed.step == 4 and read_checkpoint(run)["step"] == 4 and not (run / "checkpoint.previous").exists()


def test_the_json_encoding_keeps_tuples_int_keys_and_tensors():
    from kdstore.checkpoint import _from_json, _to_json

    value = {"state": {0: {"step": torch.tensor(3.0)}}, "betas": (0.9, 0.95), "__tensor__": 1, "none": None}
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(_to_json(value, "", tensors)))
    decoded = _from_json(encoded, tensors)
    assert decoded["betas"] == (0.9, 0.95) and list(decoded["state"]) == [0] and decoded["__tensor__"] == 1
    assert torch.equal(decoded["state"][0]["step"], torch.tensor(3.0)) and decoded["none"] is None


def test_resume_on_another_number_of_ranks_names_world_size_with_both_values(config):
    train(replace(config, steps=2), log=lambda _: None)
    with pytest.raises(ResumeMismatchError, match=r"world_size = 1 in the checkpoint, 2 now"):
        train_module.resume_run(replace(config, steps=2), 2, 0, None)  # refused before anything is restored


# -- a student path that is not there fails at once --------------------------
@pytest.mark.parametrize("source", ["nosuch.json", "./nosuch", "../no/such", "/no/such/student", "~/no-such-kdstore",
                                    "a/b/c", "no such"])
def test_a_missing_local_student_fails_at_once_without_the_hub_or_the_store(config, monkeypatch, source):
    def never(*args, **kwargs):
        raise AssertionError("went to the store or the hub")

    monkeypatch.setattr(train_module, "open_data", never)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", never)
    result = CliRunner().invoke(cli, ["train", config.store, "--student", source, "--out", config.out])
    assert result.exit_code == 1 and result.output == (
        f"Error: student {source} does not exist (pass a transformers config.json, a model folder, a hub id like org/name, "
        "or preset:quarter)\n")


def test_a_string_that_can_be_a_hub_id_is_left_to_the_hub():
    check_student_source("some-org/some-student")  # no error: the hub decides
    check_student_source("gpt2")


# -- training feedback: metrics.jsonl, the progress bar, TensorBoard, the validation count --------
def test_metrics_jsonl_holds_every_logged_step_and_a_resumed_run_continues_it_without_repeating(config, monkeypatch):
    from kdstore.progress import read_metrics

    config = replace(config, steps=8, checkpoint_every=3, log_every=1, val_every=4)
    straight = read_metrics(train(replace(config, out=config.out + "-straight"), log=lambda _: None).out)
    with monkeypatch.context() as patch:
        crash_on_call(patch, 6)  # steps 1-5 logged, the checkpoint at step 3: steps 4 and 5 are computed again
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(config, log=lambda _: None)
    assert [row["step"] for row in read_metrics(config.out)] == [1, 2, 3, 4, 5]
    train(config, resume=True, log=lambda _: None)
    resumed = read_metrics(config.out)
    assert [row["step"] for row in resumed] == list(range(1, 9))
    assert [(r["loss"], r["kd"], r["ce"], r["lr"], r.get("val_loss"), r["epoch"]) for r in resumed] == \
        [(r["loss"], r["kd"], r["ce"], r["lr"], r.get("val_loss"), r["epoch"]) for r in straight]
    assert [r["step"] for r in resumed if "val_loss" in r] == [4, 8]
    assert all(r["tokens_per_s"] > 0 and r["time"] > 1.6e9 for r in resumed)


def test_read_metrics_refuses_a_missing_run_or_file_in_one_line_and_skips_a_half_written_last_line(tmp_path):
    from kdstore.errors import TrainError
    from kdstore.progress import read_metrics

    with pytest.raises(TrainError, match="run folder .*nowhere does not exist"):
        read_metrics(tmp_path / "nowhere")
    with pytest.raises(TrainError, match="holds no metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(TrainError, match="line 2 is not a JSON object"):
        read_metrics(tmp_path)


def test_the_progress_bar_shows_steps_of_the_total_eta_loss_parts_lr_and_throughput(config, capsys):
    from kdstore.progress import read_metrics

    train(replace(config, steps=4, log_every=2), log=print, progress=True)
    shown = capsys.readouterr()
    final = [line for line in shown.err.replace("\r", "\n").splitlines() if line.startswith("train:")][-1]
    assert re.search(r"100%.* 4/4 \[\d\d:\d\d<00:00, +[\d.]+(step/s|s/step)", final), final  # total, elapsed<ETA, rate
    for label in ("loss ", "kd ", "ce ", "lr ", "tok/s ", "val "):
        assert label in final, final
    assert "step 2  loss" in shown.out and "step 4  loss" in shown.out  # the log lines stay
    train(replace(config, steps=2, out=config.out + "-quiet"), log=print, progress=False, log_steps=False)
    quiet = capsys.readouterr()
    assert "train:" not in quiet.err and "step 1  loss" not in quiet.out and "done: step 2" in quiet.out
    assert [row["step"] for row in read_metrics(config.out + "-quiet")] == [1, 2]


def test_cli_quiet_prints_no_step_lines_and_a_pipe_gets_no_bar(config):
    args = ["train", config.store, "--student", config.student, "--steps", "2", "--batch-size", "4"]
    plain = CliRunner().invoke(cli, [*args, "--out", config.out])
    assert plain.exit_code == 0 and "step 2  loss" in plain.output and "train:" not in plain.output, plain.output
    quiet = CliRunner().invoke(cli, [*args, "--out", config.out + "-quiet", "--quiet"])
    assert quiet.exit_code == 0 and "step 2  loss" not in quiet.output and "done: step 2" in quiet.output


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (the tensorboard package is not a dependency)."""

    made: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_gets_the_logged_values_and_a_missing_package_is_one_line(config, monkeypatch):
    import types

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    lines: list[str] = []
    train(replace(config, steps=4, log_every=2, val_every=4, tensorboard=True), log=lines.append)
    writer = FakeSummaryWriter.made[-1]
    assert writer.log_dir == str(Path(config.out, "tensorboard")) and writer.purge_step is None and writer.closed
    assert [(tag, step) for tag, _, step in writer.scalars if tag in ("train/loss", "val/loss")] == \
        [("train/loss", 2), ("train/loss", 4), ("val/loss", 4)]
    assert {tag for tag, _, _ in writer.scalars} >= {"train/kd", "train/ce", "train/lr", "train/tokens_per_s"}
    assert any(line.startswith("TensorBoard: tensorboard --logdir") for line in lines)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    lines.clear()
    result = train(replace(config, steps=2, tensorboard=True, out=config.out + "-2"), log=lines.append)
    missing = [line for line in lines if "package" in line]
    assert result.step == 2 and len(missing) == 1 and "not installed" in missing[0] and "pip install tensorboard" in missing[0]


def test_validation_states_its_number_of_sequences_and_warns_below_32(config):
    lines: list[str] = []
    small = open_data(config)
    train(replace(config, steps=1), log=lines.append)
    assert f"validating on {len(small.val_rows)} sequences (val_fraction = 0.2)" in lines[0]
    assert len(small.val_rows) < 32 and lines[1].startswith(f"warning: only {len(small.val_rows)} validation sequences")

    chosen = replace(config, val_sequences=40, out=config.out + "-40")
    data = open_data(chosen)
    ids = [data.dataset[int(r)]["sequence_id"] for r in range(len(data.dataset))]
    lowest = sorted(ids, key=train_module.id_hash)[:40]
    assert sorted(ids[int(r)] for r in data.val_rows) == sorted(lowest) and len(data.train_rows) == len(ids) - 40
    lines.clear()
    train(replace(chosen, steps=1), log=lines.append)
    assert "validating on 40 sequences (val_sequences = 40)" in lines[0] and not any("warning" in x for x in lines)
    with pytest.raises(KdstoreError, match=f"val_sequences = {len(ids)} leaves nothing to train on"):
        open_data(replace(config, val_sequences=len(ids)))


# -- students from presets; the README's train line ---------------------------------------------
def test_preset_quarter_is_a_quarter_wide_half_deep_copy_of_the_bundled_teacher(config):
    lines: list[str] = []
    result = train(replace(config, student="preset:quarter", steps=2), log=lines.append)
    saved = json.loads(Path(result.out, "student", "config.json").read_text())
    teacher = json.loads(Path(DEFAULT_TEACHER, "config.json").read_text())
    assert (saved["hidden_size"], saved["num_hidden_layers"], saved["intermediate_size"]) == \
        (teacher["hidden_size"] // 4, teacher["num_hidden_layers"] // 2, teacher["intermediate_size"] // 4)
    assert saved["vocab_size"] == teacher["vocab_size"] and saved["model_type"] == teacher["model_type"]
    assert "training preset:quarter (llama: hidden size 32, 2 layers, 1 attention head;" in lines[0]


def test_a_preset_finds_the_teacher_where_the_store_recorded_it_else_the_bundled_one_else_says_so(tmp_path):
    from kdstore.store import open_store
    from kdstore.student import load_student

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = Path(DEFAULT_CORPUS, "fables.txt").read_text()[:3000]
    (corpus / "fables.txt").write_text(text[:text.rindex("\n\n")])
    stores = {}
    for name, edit in (("same", False), ("edited", True)):
        teacher = shutil.copytree(DEFAULT_TEACHER, tmp_path / f"teacher-{name}")
        if edit:  # another teacher: its content hash is no longer the bundled one's
            config_json = json.loads((teacher / "config.json").read_text())
            (teacher / "config.json").write_text(json.dumps({**config_json, "hidden_act": "gelu"}))
        stores[name] = tmp_path / f"store-{name}"
        build(BuildConfig(corpus=(str(corpus),), teacher=str(teacher), out=str(stores[name]), k=4, seq_len=32,
                          progress=False, device="cpu"))
        assert load_student("preset:half", open_store(stores[name]), 0).config.hidden_size == 64
        shutil.rmtree(teacher)
    assert load_student("preset:half", open_store(stores["same"]), 0).config.hidden_size == 64  # the bundled teacher
    with pytest.raises(KdstoreError, match=r"the teacher .*teacher-edited that built .* cannot be read here"):
        load_student("preset:half", open_store(stores["edited"]), 0)


def test_an_unknown_preset_is_refused_before_the_store_opens(config, monkeypatch):
    monkeypatch.setattr(train_module, "open_data", lambda *a, **k: pytest.fail("opened the store"))
    with pytest.raises(KdstoreError) as error:
        train(replace(config, student="preset:tiny"), log=lambda _: None)
    assert error.value.one_line().startswith("unknown student preset 'preset:tiny' (presets: preset:quarter, preset:half")


README = Path(__file__).parents[2] / "README.md"


def readme_commands() -> list[list[str]]:
    """Every `kdstore ...` command of README.md's bash blocks, split like a shell (``.venv/bin/`` dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            for part in re.split(r"&&|;", line):
                words = shlex.split(part, comments=True)
                if words and words[0].endswith("kdstore"):
                    commands.append(words[1:])
    return commands


def test_the_readme_train_line_runs_as_written_on_the_store_its_first_command_builds(store, tmp_path, monkeypatch):
    """The README builds `demo-store` with the bundled teacher, then trains on it: the same line, 2 steps, here on a
    smaller store of the bundled teacher under that name."""
    commands = readme_commands()
    build_out = commands[0][commands[0].index("--out") + 1]
    assert commands[0][0] == "build" and "--teacher" not in commands[0]  # the bundled teacher
    trains = [c for c in commands if c[0] == "train" and c[1] == build_out]
    assert trains, f"no README line trains on {build_out}"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(store, tmp_path / build_out)
    for args in trains:
        args = [*args[:args.index("--steps")], *args[args.index("--steps") + 2:]] if "--steps" in args else args
        result = CliRunner().invoke(cli, [*args, "--steps", "2", "--batch-size", "4"])
        assert result.exit_code == 0, f"{args}: {result.output}"
        out = args[args.index("--out") + 1]
        assert "done: step 2" in result.output and Path(out, "student", "config.json").is_file()


def _first_step_gradients(config: TrainConfig, monkeypatch) -> list[torch.Tensor]:
    """The gradients of the first optimizer step, as train hands them to gradient clipping (recorded by a spy)."""
    seen: list[list[torch.Tensor]] = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm):
        parameters = list(parameters)
        seen.append([p.grad.detach().clone() for p in parameters])
        return real(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(config, log=lambda _: None)
    return seen[0]


@pytest.fixture
def equal_length_config(tmp_path) -> TrainConfig:
    """40 training sequences of 17 tokens (every micro-batch counts the same positions), one step, no clipping."""
    store = write_store(tmp_path / "equal", CodecConfig(k=8, vocab_size=300), num_sequences=44, seq_len=17)
    return TrainConfig(store=str(store), student=str(student_config(tmp_path, 300)), steps=1, warmup_steps=0,
                       val_sequences=4, val_every=0, checkpoint_every=0, log_every=0, grad_clip=0, device="cpu")


def test_two_micro_batches_of_b_give_the_gradient_of_one_batch_of_2b(equal_length_config, tmp_path, monkeypatch):
    whole = _first_step_gradients(replace(equal_length_config, out=str(tmp_path / "a"), batch_size=4), monkeypatch)
    halves = _first_step_gradients(replace(equal_length_config, out=str(tmp_path / "b"), batch_size=2, grad_accum=2),
                                   monkeypatch)
    assert len(whole) == len(halves) and any(g.abs().sum() > 0 for g in whole)
    for one, accumulated in zip(whole, halves):
        torch.testing.assert_close(accumulated, one, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_gives_close_but_not_identical_gradients(equal_length_config, tmp_path, monkeypatch):
    fp32 = _first_step_gradients(replace(equal_length_config, out=str(tmp_path / "a"), batch_size=4), monkeypatch)
    bf16 = _first_step_gradients(replace(equal_length_config, out=str(tmp_path / "b"), batch_size=4, precision="bf16"),
                                 monkeypatch)
    flat32, flat16 = torch.cat([g.flatten() for g in fp32]), torch.cat([g.flatten() for g in bf16])
    assert flat16.dtype == torch.float32  # weights and their gradients stay fp32
    assert not torch.equal(flat16, flat32)  # the forward did run in bf16
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.99
