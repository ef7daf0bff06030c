"""`kdstore generate` end to end with real tiny transformers teachers, real prompt files and real processes."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from conftest import save_tiny_teacher
from kdstore.cli.main import cli
from kdstore.errors import GenerateError
from kdstore.generate import GenerateConfig, generate
from kdstore.generation_view import generation_summary
from kdstore.store import open_store
from kdstore.verify import verify_store

GENERATIONS = ("logits", "generations")


def prompt_file(path: Path, num_prompts: int = 6, seed: int = 0, messages: bool = False) -> Path:
    """JSONL prompts of tiny-teacher words ("w5 w17 ..."), lengths 2-9, each with a numeric reference answer."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_prompts):
        text = " ".join(f"w{rng.randrange(300)}" for _ in range(rng.randrange(2, 10)))
        prompt = [{"role": "user", "content": text}] if messages else text
        lines.append(json.dumps({"id": f"p{i}", "prompt": prompt, "answer": str(rng.randrange(300))}))
    path.write_text("\n".join(lines) + "\n")
    return path


def config(teacher: Path, prompts: Path, out: Path, **overrides) -> GenerateConfig:
    values = dict(prompts=str(prompts), teacher=str(teacher), out=str(out), n=3, k=8, max_new_tokens=12, device="cpu",
                  progress=False, batch_size=4, unit_prompts=2)
    return GenerateConfig(**{**values, **overrides})


def frame(store: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((store / "shards").glob("*.parquet")))


def test_generate_writes_a_store_that_verifies_with_every_completion_and_its_votes(tmp_path, tiny_teacher):
    prompts = prompt_file(tmp_path / "p.jsonl")
    result = generate(config(tiny_teacher, prompts, tmp_path / "g", temperature=1.0))
    assert result.finished and result.num_completions == 18 and result.num_prompts == 6
    store = open_store(tmp_path / "g", tables=GENERATIONS)
    assert store.manifest.format_version == 3 and verify_store(store) == []
    rows = frame(tmp_path / "g")
    assert rows["sequence_id"].to_list() == [f"p{i}/{s:04d}" for i in range(6) for s in range(3)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    for row in rows.iter_rows(named=True):
        record = json.loads(prompts.read_text().splitlines()[int(row["prompt_id"][1:])])
        assert row["input_ids"][:row["prompt_num_tokens"]] == tokenizer(record["prompt"])["input_ids"]
        completion = row["input_ids"][row["prompt_num_tokens"]:]
        assert 1 <= len(completion) == len(row["token_logprobs"]) <= 12
        assert row["finish_reason"] == ("length" if len(completion) == 12 and completion[-1] != 2 else "stop")
        assert row["text"] == tokenizer.decode(completion, skip_special_tokens=True)
        assert row["total_logprob"] == pytest.approx(sum(row["token_logprobs"]), abs=1e-4)
        assert row["correct"] == (row["answer"] == record["answer"])
    for _, group in rows.group_by("prompt_id"):
        answers = group["answer"].to_list()
        top = max(answers.count(a) for a in answers if a is not None) if any(answers) else None
        if top is not None:
            assert group["vote_share"].to_list() == pytest.approx([top / 3] * 3)
            assert answers.count(group["majority_answer"][0]) == top
    summary = generation_summary(store)
    assert (summary["num_prompts"], summary["num_completions"]) == (6, 18)
    assert summary["generated_tokens"] == sum(len(t) for t in rows["token_logprobs"].to_list())
    assert summary["accuracy"] == pytest.approx(rows["correct"].mean(), abs=1e-4)


def test_stored_distributions_are_the_teachers_at_temperature_1_whatever_the_sampling(tmp_path, tiny_teacher):
    from transformers import AutoModelForCausalLM

    generate(config(tiny_teacher, prompt_file(tmp_path / "p.jsonl"), tmp_path / "g", temperature=0.6, top_p=0.8))
    store = open_store(tmp_path / "g", tables=GENERATIONS)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    codebook = store.codec.codebook
    from kdstore.generation_view import _decoded

    for shard in store.manifest.shards:
        table = store.read_row_group(store.open_shard(shard), shard, 0)
        for index in range(table.num_rows):
            row = _decoded(store, table.slice(index, 1))
            start = row["prompt_num_tokens"]
            with torch.no_grad():  # one unpadded sequence: the reference the batched, cached, padded pass must match
                dense = torch.log_softmax(model(torch.tensor(row["input_ids"][None], dtype=torch.long)).logits[0], -1)
            dense = dense[start - 1:-1]
            tokens = torch.from_numpy(row["input_ids"][start:].astype(np.int64))
            assert torch.allclose(dense[torch.arange(len(tokens)), tokens], torch.tensor(row["token_logprobs"]), atol=1e-4)
            want = torch.gather(dense, 1, torch.from_numpy(row["topk_ids"].astype(np.int64)))
            assert (want - torch.from_numpy(row["topk_logprobs"])).abs().max() <= codebook.log_step / 2 + 1e-4
            assert set(row["topk_ids"][0]) == set(dense[0].topk(8).indices.tolist())


def test_greedy_completions_equal_transformers_generate_on_prompts_of_different_lengths(tmp_path, tiny_teacher):
    from transformers import AutoModelForCausalLM

    generate(config(tiny_teacher, prompt_file(tmp_path / "p.jsonl"), tmp_path / "g", temperature=0.0, n=1,
                    batch_size=6, unit_prompts=6))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    for row in frame(tmp_path / "g").iter_rows(named=True):
        prompt = torch.tensor([row["input_ids"][:row["prompt_num_tokens"]]])
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                                  pad_token_id=0, eos_token_id=2)[0, prompt.shape[1]:].tolist()
        assert row["input_ids"][row["prompt_num_tokens"]:] == expected


def test_sampling_top_k_1_is_greedy_and_a_rerun_reproduces_every_bit(tmp_path, tiny_teacher):
    prompts = prompt_file(tmp_path / "p.jsonl")
    generate(config(tiny_teacher, prompts, tmp_path / "greedy", temperature=0.0))
    generate(config(tiny_teacher, prompts, tmp_path / "top1", temperature=1.3, top_k=1))
    assert frame(tmp_path / "greedy")["input_ids"].to_list() == frame(tmp_path / "top1")["input_ids"].to_list()
    generate(config(tiny_teacher, prompts, tmp_path / "a", temperature=1.0, seed=5))
    generate(config(tiny_teacher, prompts, tmp_path / "b", temperature=1.0, seed=5))
    shards = [json.loads((tmp_path / s / "manifest.json").read_text())["shards"] for s in "ab"]
    assert shards[0] == shards[1]  # same sha256 of every shard
    seeds = frame(tmp_path / "a")["seed"].to_list()
    assert len(set(seeds)) == len(seeds)


def test_a_stop_string_ends_the_completion_and_is_kept(tmp_path, tiny_teacher):
    prompts = prompt_file(tmp_path / "p.jsonl")
    generate(config(tiny_teacher, prompts, tmp_path / "free", temperature=1.0))
    free = frame(tmp_path / "free")
    words = [t.split() for t in free["text"].to_list()]
    stop = max({w for ws in words for w in ws[1:]}, key=lambda w: sum(w in ws[1:] for ws in words))  # a common word
    generate(config(tiny_teacher, prompts, tmp_path / "stopped", temperature=1.0, stop=(stop,)))
    stopped = frame(tmp_path / "stopped")
    assert verify_store(open_store(tmp_path / "stopped", tables=GENERATIONS)) == []
    # Each completion ends with the token that completes the first appearance of the stop string (kept), or at the
    # end-of-sequence token. (Not compared token for token with the free run: a completion that stops early changes
    # the batch its neighbours are computed in, and a matmul of another shape may round differently.)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    num_stopped = 0
    for row in stopped.iter_rows(named=True):
        completion = row["input_ids"][row["prompt_num_tokens"]:]
        before_last = tokenizer.decode(completion[:-1], skip_special_tokens=True)
        assert stop not in before_last
        if row["finish_reason"] == "stop" and completion[-1] != tokenizer.eos_token_id:
            num_stopped += 1
            assert stop in row["text"]
        elif row["finish_reason"] == "length":
            assert stop not in row["text"] and len(completion) == 12
    assert num_stopped > 0


def test_too_long_prompts_are_refused_or_skipped_and_counted(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "short", max_positions=16)
    prompts = prompt_file(tmp_path / "p.jsonl")
    with pytest.raises(GenerateError, match="passes the teacher's context of 16"):
        generate(config(teacher, prompts, tmp_path / "refused", max_new_tokens=10))
    assert not (tmp_path / "refused" / "manifest.json").exists()
    result = generate(config(teacher, prompts, tmp_path / "skipped", max_new_tokens=10, too_long="skip"))
    lengths = [len(json.loads(line)["prompt"].split()) for line in prompts.read_text().splitlines()]
    assert result.num_skipped_too_long == sum(n + 10 > 16 for n in lengths) > 0
    assert result.num_prompts == sum(n + 10 <= 16 for n in lengths)
    assert any("skipped" in line for line in result.summary_lines())


def test_an_answer_pattern_that_never_matches_is_counted_and_reported(tmp_path, tiny_teacher):
    args = ["generate", str(prompt_file(tmp_path / "p.jsonl")), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "g"),
            "-n", "2", "--max-new-tokens", "4", "--device", "cpu", "--answer-extractor", "regex",
            "--answer-pattern", "never (here)"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "12 of 12 completions have no answer" in result.output and "found no answer in any" in result.output
    rows = frame(tmp_path / "g")
    assert rows["answer"].null_count() == 12 and rows["correct"].to_list() == [False] * 12
    assert rows["majority_answer"].null_count() == 12


def test_a_teacher_with_nan_logits_stops_naming_the_prompt(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_teacher(tmp_path / "nan")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    with pytest.raises(GenerateError, match="NaN or inf log-probs for prompt p"):
        generate(config(folder, prompt_file(tmp_path / "p.jsonl"), tmp_path / "g"))
    assert not (tmp_path / "g" / "manifest.json").exists()


def test_chat_template_renders_messages_and_the_system_turn(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "chat")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant{% endif %}")
    tokenizer.save_pretrained(teacher)
    prompts = prompt_file(tmp_path / "p.jsonl", messages=True)
    generate(config(teacher, prompts, tmp_path / "g", chat_template=True, system="w7 w8", n=1))
    for row in frame(tmp_path / "g").iter_rows(named=True):
        messages = json.loads(row["prompt"])
        want = tokenizer.apply_chat_template([{"role": "system", "content": "w7 w8"}, *messages],
                                             add_generation_prompt=True, tokenize=False)
        assert row["input_ids"][:row["prompt_num_tokens"]] == tokenizer(want, add_special_tokens=False)["input_ids"]


def test_two_partitions_hold_the_same_completions_as_one(tmp_path, tiny_teacher):
    prompts = prompt_file(tmp_path / "p.jsonl", num_prompts=8)
    generate(config(tiny_teacher, prompts, tmp_path / "one", temperature=0.0))
    for part in (0, 1):
        generate(config(tiny_teacher, prompts, tmp_path / "two", temperature=0.0, num_partitions=2, partition=part))
    assert verify_store(open_store(tmp_path / "two", tables=GENERATIONS)) == []
    one, two = (frame(tmp_path / s).sort("sequence_id") for s in ("one", "two"))
    assert one["sequence_id"].to_list() == two["sequence_id"].to_list()
    assert one["seed"].to_list() == two["seed"].to_list()


def test_config_file_is_read_and_flags_override_it(tmp_path, tiny_teacher):
    (tmp_path / "generate.toml").write_text(f'teacher = "{tiny_teacher}"\nn = 2\nmax_new_tokens = 3\ndevice = "cpu"\n'
                                            'k = 4\nstop = ["w1"]\nprogress = false\n')
    result = CliRunner().invoke(cli, ["generate", str(prompt_file(tmp_path / "p.jsonl")), "--config",
                                      str(tmp_path / "generate.toml"), "--out", str(tmp_path / "g"), "-n", "1"])
    assert result.exit_code == 0, result.output
    build = json.loads((tmp_path / "g" / "manifest.json").read_text())["build"]
    assert (build["n"], build["max_new_tokens"], build["stop"]) == (1, 3, ["w1"])


def _holds_a_flock(pid: int) -> bool:
    return any(line.split()[1] == "FLOCK" and line.split()[4] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 4)


def test_kill_9_at_random_points_then_rerun_gives_the_uninterrupted_store(tmp_path, tiny_teacher):
    prompts = prompt_file(tmp_path / "p.jsonl", num_prompts=24)
    (tmp_path / "generate.toml").write_text(
        f'teacher = "{tiny_teacher}"\nk = 8\nn = 2\nmax_new_tokens = 24\nunit_prompts = 2\nbatch_size = 4\n'
        'shard_bytes = 8000\nrow_group_bytes = 4000\nprogress = false\ndevice = "cpu"\ntemperature = 1.0\n')
    command = [sys.executable, "-m", "kdstore.cli.main", "generate", str(prompts), "--config",
               str(tmp_path / "generate.toml"), "--out"]

    def start(out: Path) -> subprocess.Popen | None:
        process = subprocess.Popen([*command, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not _holds_a_flock(process.pid):
            if process.poll() is not None:
                return None
            time.sleep(0.005)
        return process

    whole_run = start(tmp_path / "whole")
    began = time.perf_counter()
    assert whole_run is not None and whole_run.wait() == 0
    seconds = time.perf_counter() - began
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert len(whole["shards"]) >= 3
    rng, target, kills = random.Random(3), tmp_path / "killed", 0
    for _ in range(20):
        process = start(target)
        if process is not None:
            time.sleep(rng.uniform(0.0, seconds))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait()
        if (target / "manifest.json").exists():
            break
        if kills >= 5:
            break
    assert kills >= 1
    if not (target / "manifest.json").exists():
        assert subprocess.run([*command, str(target)], capture_output=True).returncode == 0
    finished = json.loads((target / "manifest.json").read_text())
    assert [s["sha256"] for s in finished["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert verify_store(open_store(target, tables=GENERATIONS)) == []
    shutil.rmtree(target)


# -- verify, info, head ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_teacher) -> Path:
    root = tmp_path_factory.mktemp("generated")
    generate(config(tiny_teacher, prompt_file(root / "p.jsonl"), root / "g", temperature=1.0))
    return root / "g"


@pytest.mark.parametrize("column, change, problem", [
    ("total_logprob", lambda v: v + 1.0, "total_logprob is not the sum"),
    ("finish_reason", lambda v: "tired", "finish_reason is not stop or length"),
    ("prompt_num_tokens", lambda v: 0, "prompt_num_tokens does not fit"),
    ("correct", lambda v: None, "correct is null while a reference_answer is given"),
    ("vote_share", lambda v: 1.5, "vote_share disagrees"),
    ("sample_index", lambda v: 7, "sequence_id is not PROMPT_ID/SAMPLE"),
])
def test_verify_names_each_broken_generations_invariant(generated, column, change, problem):
    import pyarrow as pa

    from kdstore.verify import check_generation_rows

    store = open_store(generated, tables=GENERATIONS)
    shard = store.manifest.shards[0]
    table = store.read_row_group(store.open_shard(shard), shard, 0)
    assert check_generation_rows(store.codec, table, store.manifest.build) == []
    values = table[column].to_pylist()
    values[1] = change(values[1])
    broken = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                              pa.array(values, type=table.schema.field(column).type))
    problems = check_generation_rows(store.codec, broken, store.manifest.build)
    assert any(problem in p and "p0/0001" in p for p in problems), problems


def test_verify_names_a_token_logprob_that_disagrees_with_its_code(generated):
    import pyarrow as pa

    from kdstore.verify import check_generation_rows

    store = open_store(generated, tables=GENERATIONS)
    shard = store.manifest.shards[0]
    table = store.read_row_group(store.open_shard(shard), shard, 0)
    values = table["token_logprobs"].to_pylist()
    values[0][0] -= 3.0
    broken = table.set_column(table.schema.get_field_index("token_logprobs"), table.schema.field("token_logprobs"),
                              pa.array(values, type=table.schema.field("token_logprobs").type))
    problems = check_generation_rows(store.codec, broken, store.manifest.build)
    assert any("differ from their target code" in p for p in problems), problems


def test_info_summarises_prompts_completions_tokens_accuracy_and_votes(generated):
    result = CliRunner().invoke(cli, ["info", str(generated), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    rows = frame(generated)
    assert (summary["table"], summary["num_prompts"], summary["num_completions"]) == ("generations", 6, 18)
    assert summary["generated_tokens"] == sum(len(t) for t in rows["token_logprobs"].to_list())
    assert summary["finish_reasons"] == dict(rows["finish_reason"].value_counts().sort("finish_reason").iter_rows())
    assert summary["mean_vote_share"] == pytest.approx(rows.group_by("prompt_id").agg(pl.first("vote_share"))["vote_share"]
                                                       .mean(), abs=1e-4)
    text = CliRunner().invoke(cli, ["info", str(generated)]).output
    assert "num_prompts: 6" in text and "accuracy" in text


def test_head_shows_a_prompt_its_completions_and_the_teachers_alternatives(generated):
    result = CliRunner().invoke(cli, ["head", str(generated), "--id", "p2/0001", "-n", "3", "--top", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = frame(generated).filter(pl.col("prompt_id") == "p2")
    assert lines[0].startswith("prompt p2 (") and "3 completions" in lines[0]
    completions = [line for line in lines if line.startswith("completion ")]
    assert [line.split()[1].rstrip(":") for line in completions] == rows["sequence_id"].to_list()
    for line, answer in zip(completions, rows["answer"].to_list()):
        assert f"answer {answer!r}" in line
    alternatives = [line for line in lines if " p=" in line]
    assert len(alternatives) == sum(min(3, len(t)) for t in rows["token_logprobs"].to_list())
    assert all(line.count(" | ") == 2 and "tail" in line for line in alternatives)
    missing = CliRunner().invoke(cli, ["head", str(generated), "--id", "nothing"])
    assert missing.exit_code == 1 and "no prompt 'nothing'" in missing.output


# -- training on completions -----------------------------------------------------------------------------------
def test_completions_are_served_with_the_prompt_masked_and_the_stored_top_k_on_the_completion(generated):
    from kdstore.collate import IGNORE_INDEX, Collator, widen
    from kdstore.completions import CompletionCollator, CompletionDataset, CompletionFilter, select_completions
    from kdstore.generation_view import _decoded

    store = open_store(generated, tables=GENERATIONS)
    rows = select_completions(store, CompletionFilter())
    dataset, collate = CompletionDataset(store, rows), CompletionCollator(Collator(store.codec))
    batch = widen(collate([dataset[i] for i in range(len(dataset))]), collate.logprob_table)
    table = store.read_row_group(store.open_shard(store.manifest.shards[0]), store.manifest.shards[0], 0)
    for b in range(table.num_rows):
        row = _decoded(store, table.slice(b, 1))
        start, length = row["prompt_num_tokens"], len(row["input_ids"])
        labels = batch["labels"][b]
        assert (labels[:start - 1] == IGNORE_INDEX).all() and (labels[length - 1:] == IGNORE_INDEX).all()
        assert labels[start - 1:length - 1].tolist() == row["input_ids"][start:].tolist()  # the completion tokens
        assert torch.equal(batch["topk_ids"][b, start - 1:length - 1], torch.from_numpy(row["topk_ids"].astype(np.int64)))
        assert torch.equal(batch["topk_logprobs"][b, start - 1:length - 1], torch.from_numpy(row["topk_logprobs"]))


def test_filters_keep_correct_majority_best_of_and_where_as_polars_computes_them(generated):
    from kdstore.completions import CompletionFilter, select_completions

    store = open_store(generated, tables=GENERATIONS)
    rows = frame(generated).with_row_index("row")
    def chosen(**selection) -> list[int]:
        return select_completions(store, CompletionFilter(**selection)).tolist()
    assert chosen(only_majority=True) == rows.filter(pl.col("agrees_with_majority"))["row"].to_list()
    assert chosen(only_correct=True) == rows.filter(pl.col("correct"))["row"].to_list()
    best = rows.sort("total_logprob", descending=True).group_by("prompt_id").head(1)["row"].sort().to_list()
    assert chosen(best_of=1) == best
    long = rows.filter(pl.col("input_ids").list.len() - pl.col("prompt_num_tokens") > 6)["row"].to_list()
    assert chosen(where="num_completion_tokens > 6") == long
    with pytest.raises(Exception, match="not a column"):
        chosen(where="read_csv('/etc/passwd')")


def test_kdstore_train_takes_a_generations_store_kd_and_ce_only(generated, tmp_path):
    config = _toml(tmp_path, "val_sequences = 3")
    for name, loss in (("kd", []), ("ce", ["--ce-weight", "1"])):
        result = CliRunner().invoke(cli, ["train", str(generated), "--student", "preset:quarter", "--out",
                                          str(tmp_path / name), "--steps", "3", "--batch-size", "4", *loss,
                                          "--config", str(config)])
        assert result.exit_code == 0, result.output
        assert "training" in result.output and (tmp_path / name / "student" / "config.json").exists()
    wrong = CliRunner().invoke(cli, ["train", str(generated), "--student", "preset:quarter", "--out", str(tmp_path / "x"),
                                     "--steps", "1", "--config", str(_toml(tmp_path, 'completion_where = "vote_share > 2"'))])
    assert wrong.exit_code == 1 and "no completion" in wrong.output


def _toml(folder: Path, text: str) -> Path:
    (folder / "train.toml").write_text(text + "\n")
    return folder / "train.toml"


def test_filters_choose_what_to_train_on_and_a_generations_val_store_is_read_whole(generated, tmp_path):
    config = _toml(tmp_path, f'completion_where = "sample_index = 0"\nval_store = "{generated}"\nsteps = 1')
    result = CliRunner().invoke(cli, ["train", str(generated), "--student", "preset:quarter", "--out", str(tmp_path / "r"),
                                      "--config", str(config), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "on 6 sequences" in result.output and "validating on 18 sequences" in result.output
    from conftest import write_store
    from kdstore.codec import CodecConfig
    from kdstore.errors import TrainError
    from kdstore.train import TrainConfig, open_data

    logits_store = write_store(tmp_path / "logits", CodecConfig(k=4, vocab_size=50), num_sequences=4)
    with pytest.raises(TrainError, match="only_correct, only_majority, best_of and completion_where"):
        open_data(TrainConfig(store=str(logits_store), student="unused", only_correct=True))


def test_resuming_from_an_edited_prompt_file_is_refused(tmp_path, tiny_teacher):
    from kdstore.errors import StoreMismatchError

    prompts = prompt_file(tmp_path / "p.jsonl")
    generate(config(tiny_teacher, prompts, tmp_path / "g", n=1))
    prompt_file(prompts, seed=1)
    with pytest.raises(StoreMismatchError, match="prompts_sha256"):
        generate(config(tiny_teacher, prompts, tmp_path / "g", n=1))


def test_a_generations_store_copies_whole_and_verifies_at_the_target(tmp_path, tiny_teacher):
    from kdstore.transfer import copy_store

    generate(config(tiny_teacher, prompt_file(tmp_path / "p.jsonl"), tmp_path / "g", temperature=1.0))
    result = copy_store(tmp_path / "g", tmp_path / "copy")
    source, copied = open_store(tmp_path / "g", tables=GENERATIONS), open_store(tmp_path / "copy", tables=GENERATIONS)
    assert result.num_files_copied >= len(source.manifest.shards) > 0
    assert copied.manifest.shards == source.manifest.shards and verify_store(copied) == []
    assert frame(tmp_path / "copy").equals(frame(tmp_path / "g"))
    assert copy_store(tmp_path / "g", tmp_path / "copy").num_files_copied == 0  # a second copy finds it whole
