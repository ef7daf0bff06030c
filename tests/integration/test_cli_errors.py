"""Bad input gets one clear line and loses nothing: every command, every common user mistake.

Each case runs the ``kdstore`` command on one mistake and proves four things: the exit status is not 0;
there is no traceback (an exception click does not handle counts as one); the output is exactly one line
``Error: ...``, the last (``verify`` may list ``problem: ...`` lines first; a progress bar is tolerated);
and nothing in the user's folders changed: the per-test folder (store copies, run folders, config files,
the working directory) and every shared fixture the case touched are snapshotted as
{path: (size, sha256)} before and after. A build or train into a new folder may leave that folder
behind only if nothing in it looks like a store or a run.

Run: .venv/bin/python -m pytest tests/integration/test_cli_errors.py
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing reaches the network, whatever imports huggingface_hub first

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from conftest import write_store  # noqa: E402
from kdstore.cli.main import cli  # noqa: E402
from kdstore.codec import CodecConfig  # noqa: E402

ASSETS = Path(__file__).parents[2] / "kdstore" / "assets"
BUNDLED_TEACHER = ASSETS / "teacher"
# lines a progress bar (tqdm) may leave in the output; never expected, only tolerated
PROGRESS = re.compile(r"\d+%\||\bit/s\b|unit/s")
# what makes a folder look like a store (kdstore/writer.py) or a training run (kdstore/checkpoint.py)
STORE_OR_RUN_NAMES = {"manifest.json", "shards", "_partitions", "_locks", "tokenizer", "checkpoint", "checkpoint.pt",
                      "checkpoint.previous", "student"}
# s3fs installed or not, this subprocess cannot import it
WITHOUT_S3FS = ("import sys; sys.modules['s3fs'] = None; from kdstore.cli.main import cli; "
                "cli(sys.argv[1:], prog_name='kdstore')")


# -- fixtures shared by every case ---------------------------------------------
@dataclass(frozen=True)
class Shared:
    synthetic: Path  # a sound 12-sequence store written by ShardWriter (k 8, vocab 300, no tokenizer)
    built: Path  # a store built by the bundled teacher (vocab 4096), its Arrow copy made
    run: Path  # a 2-step training run on ``built`` with --lr 0.001: RUN/checkpoint/
    corpus: Path  # a folder with one small .txt file
    student: Path  # a student config.json with the store's vocabulary (4096)


def student_config(path: Path, vocab_size: int) -> Path:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": True}
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    from kdstore.arrow_copy import convert_to_arrow
    from kdstore.build import BuildConfig, build

    root = tmp_path_factory.mktemp("cli-errors")
    synthetic = write_store(root / "synthetic", CodecConfig(k=8, vocab_size=300), num_sequences=12, shard_bytes=3000,
                            row_group_bytes=1000)
    corpus = root / "corpus"
    corpus.mkdir()
    text = (ASSETS / "corpus" / "stories.txt").read_text()[:8000]
    (corpus / "stories.txt").write_text(text[:text.rindex("\n\n")])
    built = root / "built"
    build(BuildConfig(corpus=(str(corpus),), out=str(built), k=4, seq_len=16, progress=False, device="cpu"))
    convert_to_arrow(built)  # made once here: a failed train must not be what makes it
    student = student_config(root / "student.json", 4096)
    result = CliRunner().invoke(cli, ["train", str(built), "--student", str(student), "--out", str(root / "run"),
                                      "--steps", "2", "--batch-size", "4", "--lr", "0.001"])
    assert result.exit_code == 0, result.output
    return Shared(synthetic, built, root / "run", corpus, student)


# -- what a case is ----------------------------------------------------------
@dataclass
class Call:
    args: list[str]
    expect: tuple[str, ...] = ()  # substrings of the Error line
    refuse: tuple[str, ...] = ()  # substrings that must not appear anywhere in the output
    exit_code: int | None = None  # None: any non-zero status
    problems_ok: bool = False  # verify lists "problem: ..." lines before its Error line
    new: Path | None = None  # a folder the command was asked to create: may appear, but holding nothing store-like
    without_s3fs: bool = False  # run in a subprocess that cannot import s3fs
    without: str = ""  # a module ("ray", "vllm"): run in a subprocess that cannot import it, installed or not
    isolated: bool = False  # run in a subprocess: the command leaves process state behind (Ray sets RAY_AUTH_MODE)
    absent: tuple[Path, ...] = ()  # files that must not exist afterwards (a pickle's payload, ...)
    environ: dict[str, str] = field(default_factory=dict)


class World:
    """The per-test folder and the shared fixtures; remembers which shared paths a case used, to snapshot them."""

    def __init__(self, tmp: Path, shared: Shared) -> None:
        self.tmp, self._shared, self.used = tmp, shared, []

    def _use(self, path: Path) -> str:
        self.used.append(path)
        return str(path)

    @property
    def built(self) -> str:
        return self._use(self._shared.built)

    @property
    def corpus(self) -> str:
        return self._use(self._shared.corpus)

    @property
    def student(self) -> str:
        return self._use(self._shared.student)

    def store(self) -> Path:
        """A fresh copy of the synthetic store, in the per-test folder."""
        return Path(shutil.copytree(self._shared.synthetic, self.tmp / "store"))

    def built_copy(self) -> Path:
        return Path(shutil.copytree(self._shared.built, self.tmp / "built"))

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self._shared.run, self.tmp / "run"))

    def teacher(self, without: tuple[str, ...] = ()) -> Path:
        folder = self.tmp / "teacher"
        shutil.copytree(BUNDLED_TEACHER, folder, ignore=shutil.ignore_patterns("README.md", *without))
        return folder

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path


def edit_manifest(store: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((store / "manifest.json").read_text())
    change(data)
    (store / "manifest.json").write_text(json.dumps(data))


CASES: dict[str, Callable[[World], Call]] = {}


def case(name: str):
    def register(setup: Callable[[World], Call]) -> Callable[[World], Call]:
        assert name not in CASES, name
        CASES[name] = setup
        return setup
    return register


# -- opening a store: info, verify, head, convert, export ------------------------
READERS = {"info": [], "verify": [], "head": [], "convert": ["--to", "arrow"],
           "export": ["--format", "axolotl", "--out", "exported"]}  # relative: into the watched working directory


def _unfinished(w: World) -> tuple[str, tuple[str, ...]]:
    store = w.store()
    (store / "manifest.json").unlink()
    return str(store), ("unfinished", str(store))


def _no_manifest(w: World) -> tuple[str, tuple[str, ...]]:
    folder = w.tmp / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not a store")
    return str(folder), ("manifest.json", str(folder))


def _empty_folder(w: World) -> tuple[str, tuple[str, ...]]:
    (w.tmp / "empty").mkdir()
    return str(w.tmp / "empty"), ("manifest.json", str(w.tmp / "empty"))


def _not_json(w: World) -> tuple[str, tuple[str, ...]]:
    store = w.store()
    (store / "manifest.json").write_text('{"format": "kdstore", "format_version": 2,')
    return str(store), ("not valid JSON", "manifest.json")


def _newer_version(w: World) -> tuple[str, tuple[str, ...]]:
    store = w.store()
    edit_manifest(store, lambda m: m.update(format_version=99))
    return str(store), ("version 99", "upgrade")


def _missing_field(w: World) -> tuple[str, tuple[str, ...]]:
    store = w.store()
    edit_manifest(store, lambda m: m.pop("codec"))
    return str(store), ("codec", "manifest.json")


def _parent_path(w: World) -> tuple[str, tuple[str, ...]]:
    store = w.store()
    edit_manifest(store, lambda m: m["shards"][0].update(path="../../x.parquet"))
    return str(store), ("outside the store", "../../x.parquet")


STORE_MISTAKES: dict[str, Callable[[World], tuple[str, tuple[str, ...]]]] = {
    "nonexistent-folder": lambda w: (str(w.tmp / "nowhere"), ("does not exist", str(w.tmp / "nowhere"))),
    "file-instead-of-folder": lambda w: (str(w.store() / "manifest.json"), ("is a file",)),
    "folder-without-manifest": _no_manifest,
    "empty-folder": _empty_folder,
    "unfinished-build": _unfinished,
    "manifest-not-json": _not_json,
    "manifest-newer-format-version": _newer_version,
    "manifest-missing-a-field": _missing_field,
    "manifest-names-a-parent-path": _parent_path,
    "unknown-url-scheme": lambda w: ("nosuch://x", ("nosuch://x",)),
}


def _reader_case(command: str, mistake: str) -> Callable[[World], Call]:
    def setup(w: World) -> Call:
        location, expect = STORE_MISTAKES[mistake](w)
        return Call([command, location, *READERS[command]], expect=expect)
    return setup


def _s3_case(command: str) -> Callable[[World], Call]:
    def setup(w: World) -> Call:
        return Call([command, "s3://bucket/x", *READERS[command]], expect=("s3://bucket/x", "pip install s3fs"),
                    refuse=("s3:/bucket",), without_s3fs=True)
    return setup


def _storage_option_case(command: str) -> Callable[[World], Call]:
    def setup(w: World) -> Call:
        return Call([command, str(w.store()), *READERS[command], "--storage-option", "endpoint_url"],
                    expect=("--storage-option", "KEY=VALUE"))
    return setup


READERS["check"] = ["--student", str(BUNDLED_TEACHER)]  # a sound student folder: the store is the mistake
READERS["stats"] = ["--plot", "plots", "--html", "report.html"]  # relative: nothing may appear in the working directory

for _command in READERS:
    for _mistake in STORE_MISTAKES:
        case(f"{_command}-{_mistake}")(_reader_case(_command, _mistake))
    case(f"{_command}-s3-url-without-s3fs")(_s3_case(_command))
    case(f"{_command}-storage-option-without-equals")(_storage_option_case(_command))


@case("info-no-store-argument")
def _(w: World) -> Call:
    return Call(["info"], expect=("STORE",), exit_code=2)


@case("info-manifest-is-a-json-list")
def _(w: World) -> Call:
    store = w.store()
    (store / "manifest.json").write_text("[]")
    return Call(["info", str(store)], expect=("not a kdstore manifest",))


@case("info-manifest-is-empty")
def _(w: World) -> Call:
    store = w.store()
    (store / "manifest.json").write_text("")
    return Call(["info", str(store)], expect=("manifest.json",))


@case("head-n-0")
def _(w: World) -> Call:
    return Call(["head", str(w.store()), "-n", "0"], expect=("-n 0",))


@case("head-top-0")
def _(w: World) -> Call:
    return Call(["head", str(w.store()), "--top", "0"], expect=("--top 0",))


@case("head-n-not-a-number")
def _(w: World) -> Call:
    return Call(["head", str(w.store()), "-n", "ten"], expect=("ten",), exit_code=2)


@case("head-id-that-does-not-exist")
def _(w: World) -> Call:
    return Call(["head", str(w.store()), "--id", "seq-99999"], expect=("seq-99999",))


@case("head-id-and-where-together")
def _(w: World) -> Call:
    return Call(["head", str(w.store()), "--id", "seq-00001", "--where", "num_tokens > 1"], expect=("--id", "--where"))


def head_where(w: World, where: str, *expect: str, store: str | None = None) -> Call:
    """``kdstore head STORE --where WHERE`` (default STORE: the bundled teacher's store, with teacher_score)."""
    return Call(["head", store or w.built, "--where", where], expect=expect)


HEAD_WHERE_MISTAKES = {  # name: (--where, what the Error line says)
    "python-expression": ("pl.col('teacher_score') < -3", ("'pl'", "Python is not accepted", "SQL condition")),
    "does-not-parse": ("teacher_score <", ("does not parse", "teacher_score <")),
    "names-a-missing-column": ("reference_score < 1", ("'reference_score' is not a column", "teacher_score")),
    "column-in-another-case": ("Teacher_Score < 1", ("'Teacher_Score' is not a column",)),
    "function": ("avg(teacher_score) > 1", ("'avg'", "functions are not accepted")),
    "subquery-reading-a-file": ("sequence_id IN (SELECT column_1 FROM read_csv('/etc/hostname'))", ("'SELECT'",)),
    "two-statements": ("num_tokens > 1; DROP TABLE x", ("';'", "character 15")),
    "double-quoted-name": ('"teacher_score" < 1', ("'\"'", "character 1")),
    "not-a-condition": ("num_tokens + 1", ("cannot be evaluated", "Boolean")),
    "compares-text-with-a-number": ("sequence_id < 3", ("cannot be evaluated", "sequence_id < 3")),
    "empty": ("", ("--where is empty",)),
    "only-spaces": ("   ", ("--where is empty",)),
    "matches-nothing": ("num_tokens > 100000", ("no sequence", "satisfies", "num_tokens > 100000")),
}
for _name, (_where, _expect) in HEAD_WHERE_MISTAKES.items():
    case(f"head-where-{_name}")(lambda w, where=_where, expect=_expect: head_where(w, where, *expect))


@case("head-where-score-of-a-store-without-scores")
def _(w: World) -> Call:
    return head_where(w, "teacher_score < -3", "'teacher_score' is not a column", "sequence_id, num_tokens",
                      store=str(w.store()))


@case("head-where-without-a-value")
def _(w: World) -> Call:
    return Call(["head", str(w.store()), "--where"], expect=("--where",), exit_code=2)


@case("convert-to-unknown-format")
def _(w: World) -> Call:
    return Call(["convert", str(w.store()), "--to", "parquet2"], expect=("parquet2",), exit_code=2)


@case("convert-cache-dir-inside-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return Call(["convert", str(w.store()), "--to", "arrow", "--cache-dir", str(notes / "cache")],
                expect=(str(notes),))


@case("convert-without-to")
def _(w: World) -> Call:  # click lists a required Choice's choices on lines of their own: still one line
    return Call(["convert", str(w.store())], expect=("--to", "arrow"), exit_code=2)


@case("verify-store-with-a-deleted-shard")
def _(w: World) -> Call:
    store = w.store()
    sorted((store / "shards").glob("*.parquet"))[0].unlink()
    return Call(["verify", str(store)], expect=("problem",), exit_code=1, problems_ok=True)


@case("verify-store-with-a-truncated-shard")
def _(w: World) -> Call:
    store = w.store()
    shard = sorted((store / "shards").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    return Call(["verify", str(store)], expect=("problem",), exit_code=1, problems_ok=True)


@case("head-store-with-a-deleted-shard")
def _(w: World) -> Call:
    store = w.store()
    sorted((store / "shards").glob("*.parquet"))[0].unlink()
    return Call(["head", str(store)], expect=("missing",))


@case("convert-store-with-a-damaged-shard")
def _(w: World) -> Call:
    store = w.store()
    shard = sorted((store / "shards").glob("*.parquet"))[-1]
    data = bytearray(shard.read_bytes())
    data[200:204] = b"\x00\x01\x02\x03"
    shard.write_bytes(bytes(data))
    return Call(["convert", str(store), "--to", "arrow"], expect=(shard.name,))


@case("unknown-command")
def _(w: World) -> Call:
    return Call(["inflo", str(w.store())], expect=("inflo",), exit_code=2)


# -- export --------------------------------------------------------------------------
def export_call(w: World, *args: str, store: str | None = None, out: Path | None = None, **call: object) -> Call:
    """``kdstore export STORE --out TMP/exported ARGS`` (ARGS hold --format): the out folder must not appear."""
    return Call(["export", store or str(w.store()), "--out", str(out or w.tmp / "exported"), *args], **call)


@case("export-out-is-a-non-empty-folder")
def _(w: World) -> Call:
    w.write("thesis/chapter1.tex", "\\chapter{One}\n")
    return export_call(w, "--format", "axolotl", out=w.tmp / "thesis", expect=(str(w.tmp / "thesis"), "not empty"))


@case("export-out-is-the-store-itself")
def _(w: World) -> Call:
    store = w.store()
    return export_call(w, "--format", "hf", store=str(store), out=store, expect=(str(store), "not empty"))


@case("export-out-is-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return export_call(w, "--format", "axolotl", out=notes, expect=(str(notes), "file"))


@case("export-out-inside-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return export_call(w, "--format", "axolotl", out=notes / "exported", expect=(str(notes), "file"))


@case("export-out-is-a-url")
def _(w: World) -> Call:
    return Call(["export", str(w.store()), "--format", "axolotl", "--out", "s3://bucket/exported"],
                expect=("s3://bucket/exported", "local folder"))


@case("export-no-format")
def _(w: World) -> Call:
    return export_call(w, expect=("--format",), exit_code=2)


# -- copy and merge ---------------------------------------------------------------------------------------------
@case("copy-source-does-not-exist")
def _(w: World) -> Call:
    return Call(["copy", str(w.tmp / "nosuch"), str(w.tmp / "copied")], expect=(str(w.tmp / "nosuch"), "does not exist"),
                new=w.tmp / "copied")


@case("copy-source-is-not-a-store")
def _(w: World) -> Call:
    w.write("photos/cat.jpg", b"\xff\xd8")
    return Call(["copy", str(w.tmp / "photos"), str(w.tmp / "copied")], expect=("photos", "manifest.json"),
                new=w.tmp / "copied")


@case("copy-target-holds-the-users-files")
def _(w: World) -> Call:
    w.write("thesis/chapter1.tex", "\\chapter{One}\n")
    return Call(["copy", str(w.store()), str(w.tmp / "thesis")], expect=(str(w.tmp / "thesis"), "chapter1.tex"))


@case("copy-target-is-another-store")
def _(w: World) -> Call:
    other = write_store(w.tmp / "other", CodecConfig(k=4, vocab_size=300), num_sequences=2)
    return Call(["copy", str(w.store()), str(other)], expect=(str(other), "another store"))


@case("copy-source-shard-damaged")
def _(w: World) -> Call:
    store = w.store()
    shard = sorted((store / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return Call(["copy", str(store), str(w.tmp / "copied")], expect=(shard.name, "sha256"), new=w.tmp / "copied")


@case("copy-target-option-without-equals")
def _(w: World) -> Call:
    return Call(["copy", str(w.store()), str(w.tmp / "copied"), "--target-option", "endpoint_url"],
                expect=("--target-option", "KEY=VALUE"), refuse=("--storage-option",), exit_code=2)


@case("copy-s3-url-without-s3fs")
def _(w: World) -> Call:
    return Call(["copy", str(w.store()), "s3://bucket/x"], expect=("s3://bucket/x", "pip install s3fs"),
                refuse=("s3:/bucket",), without_s3fs=True)


@case("merge-a-single-store")
def _(w: World) -> Call:
    return Call(["merge", str(w.store()), "--out", str(w.tmp / "merged")], expect=("at least two",), new=w.tmp / "merged")


@case("merge-stores-of-another-codec")
def _(w: World) -> Call:
    other = write_store(w.tmp / "other", CodecConfig(k=4, vocab_size=300), num_sequences=2)
    return Call(["merge", str(w.store()), str(other), "--out", str(w.tmp / "merged")],
                expect=("codec.k is 4", "8 in"), new=w.tmp / "merged")


@case("merge-a-store-that-does-not-exist")
def _(w: World) -> Call:
    return Call(["merge", str(w.store()), str(w.tmp / "nosuch"), "--out", str(w.tmp / "merged")],
                expect=(str(w.tmp / "nosuch"), "does not exist"), new=w.tmp / "merged")


@case("merge-out-is-a-url")
def _(w: World) -> Call:
    other = write_store(w.tmp / "other", CodecConfig(k=8, vocab_size=300), num_sequences=2, seed=3)
    return Call(["merge", str(w.store()), str(other), "--out", "s3://bucket/merged"], expect=("s3://bucket/merged", "local"))


@case("merge-out-holds-the-users-files")
def _(w: World) -> Call:
    w.write("thesis/chapter1.tex", "\\chapter{One}\n")
    other = write_store(w.tmp / "other", CodecConfig(k=8, vocab_size=300), num_sequences=2, seed=3)
    return Call(["merge", str(w.store()), str(other), "--out", str(w.tmp / "thesis")],
                expect=(str(w.tmp / "thesis"), "not empty"))


@case("export-format-bogus")
def _(w: World) -> Call:
    return export_call(w, "--format", "torchtune", expect=("--format", "torchtune"), exit_code=2)


@case("export-no-out")
def _(w: World) -> Call:
    return Call(["export", str(w.store()), "--format", "axolotl"], expect=("--out",), exit_code=2)


@case("export-temperature-0")
def _(w: World) -> Call:
    return export_call(w, "--format", "axolotl", "--temperature", "0", expect=("--temperature 0", "above 0"))


@case("export-temperature-negative")
def _(w: World) -> Call:
    return export_call(w, "--format", "axolotl", "--temperature", "-2", expect=("--temperature -2", "above 0"))


@case("export-temperature-nan")
def _(w: World) -> Call:
    return export_call(w, "--format", "axolotl", "--temperature", "nan", expect=("--temperature nan",))


@case("export-temperature-not-a-number")
def _(w: World) -> Call:
    return export_call(w, "--format", "axolotl", "--temperature", "warm", expect=("--temperature", "warm"), exit_code=2)


@case("export-hf-with-temperature")
def _(w: World) -> Call:
    return export_call(w, "--format", "hf", "--temperature", "2", expect=("--temperature", "axolotl"))


@case("export-hf-with-top-k-only")
def _(w: World) -> Call:
    return export_call(w, "--format", "hf", "--top-k-only", expect=("--top-k-only", "axolotl"))


@case("export-axolotl-of-a-store-with-sampled-draws")
def _(w: World) -> Call:
    codec = CodecConfig(k=1, vocab_size=300, sampled_draws=64, sampled_scheme="systematic")
    store = write_store(w.tmp / "sampled", codec, num_sequences=2)
    return export_call(w, "--format", "axolotl", store=str(store), expect=("64 sampled draws", "--top-k-only"))


@case("export-store-without-sequences")
def _(w: World) -> Call:
    store = write_store(w.tmp / "empty-store", CodecConfig(k=4, vocab_size=50), num_sequences=0)
    return export_call(w, "--format", "axolotl", store=str(store), expect=("no sequences",))


@case("export-store-with-a-damaged-shard-midway")
def _(w: World) -> Call:
    store = w.store()
    shard = sorted((store / "shards").glob("*.parquet"))[-1]  # the others are exported before it is read
    data = bytearray(shard.read_bytes())
    data[200:204] = b"\x00\x01\x02\x03"
    shard.write_bytes(bytes(data))
    return export_call(w, "--format", "axolotl", store=str(store), expect=(shard.name,))


# -- build -------------------------------------------------------------------------
def build_call(w: World, *args: str, corpus: list[str] | None = None, seq_len: bool = True, **call: object) -> Call:
    """``kdstore build CORPUS --out TMP/out [--seq-len 16] ARGS``: the out folder may appear only if it holds nothing
    store-like. ``seq_len=False`` for a config file's seq_len, which the flag would override."""
    out = w.tmp / "out"
    if "--teacher" not in args:
        w.used.append(BUNDLED_TEACHER)  # the default teacher: nothing may be written into it either
    return Call(["build", *(corpus if corpus is not None else [w.corpus]), "--out", str(out),
                 *(["--seq-len", "16"] if seq_len else []), *args], new=out, **call)


@case("build-out-is-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return Call(["build", w.corpus, "--out", str(notes), "--seq-len", "16"], expect=(str(notes), "file"))


@case("build-out-is-a-non-empty-folder-that-is-not-a-store")
def _(w: World) -> Call:
    w.write("thesis/chapter1.tex", "\\chapter{One}\n")
    w.write("thesis/data/results.csv", "a,b\n1,2\n")
    return Call(["build", w.corpus, "--out", str(w.tmp / "thesis"), "--seq-len", "16"],
                expect=(str(w.tmp / "thesis"), "not empty"))


@case("build-out-with-a-manifest-that-is-not-json")
def _(w: World) -> Call:
    w.write("out/manifest.json", "this is my manifest of ship cargo\n")
    return Call(["build", w.corpus, "--out", str(w.tmp / "out"), "--seq-len", "16"], expect=("manifest.json", "JSON"))


@case("build-out-is-a-store-made-with-another-k")
def _(w: World) -> Call:
    store = w.built_copy()
    return Call(["build", w.corpus, "--out", str(store), "--seq-len", "16", "-k", "8", "--device", "cpu"],
                expect=(str(store),))


@case("build-k-0")
def _(w: World) -> Call:
    return build_call(w, "-k", "0", expect=("k = 0", ">= 1"))


@case("build-k-negative")
def _(w: World) -> Call:
    return build_call(w, "-k", "-1", expect=("k = -1", ">= 1"))


@case("build-k-above-the-vocabulary")
def _(w: World) -> Call:
    return build_call(w, "-k", "5000", "--device", "cpu", expect=("5000", "4096"))


@case("build-seq-len-1")
def _(w: World) -> Call:
    return build_call(w, "--seq-len", "1", expect=("seq_len = 1", ">= 2"))


@case("build-seq-len-not-a-number")
def _(w: World) -> Call:
    return build_call(w, "--seq-len", "abc", expect=("--seq-len", "abc"), exit_code=2)


@case("build-seq-len-above-the-teachers-maximum")
def _(w: World) -> Call:
    return build_call(w, "--seq-len", "4096", "--device", "cpu", expect=("4096", "1024"))


@case("build-num-partitions-0")
def _(w: World) -> Call:
    return build_call(w, "--num-partitions", "0", expect=("num_partitions = 0",))


@case("build-partition-5-of-4")
def _(w: World) -> Call:
    return build_call(w, "--num-partitions", "4", "--partition", "5", expect=("partition = 5", "0 to 3"))


@case("build-partition-without-num-partitions")
def _(w: World) -> Call:
    return build_call(w, "--partition", "2", expect=("partition = 2",))


@case("build-finalize-a-folder-without-partitions")
def _(w: World) -> Call:
    (w.tmp / "out").mkdir()
    return Call(["build", "--out", str(w.tmp / "out"), "--finalize"], expect=(str(w.tmp / "out"), "partitions"))


@case("build-out-inside-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return build_call(w, "--out", str(notes / "store"), "--device", "cpu", expect=(str(notes),))


@case("build-sampled-draws-negative")
def _(w: World) -> Call:
    return build_call(w, "--sampled-draws", "-1", expect=("sampled_draws = -1",))


@case("build-world-size-not-an-integer")
def _(w: World) -> Call:
    return build_call(w, expect=("WORLD_SIZE",), environ={"WORLD_SIZE": "two"})


@case("build-corpus-does-not-exist")
def _(w: World) -> Call:
    return build_call(w, corpus=[str(w.tmp / "nosuch-corpus")], expect=(str(w.tmp / "nosuch-corpus"), "does not exist"))


@case("build-corpus-empty-folder")
def _(w: World) -> Call:
    (w.tmp / "corpus").mkdir()
    return build_call(w, corpus=[str(w.tmp / "corpus")], expect=(str(w.tmp / "corpus"),))


@case("build-corpus-unsupported-extension")
def _(w: World) -> Call:
    table = w.write("corpus/table.csv", "text\nhello\n")
    return build_call(w, corpus=[str(table)], expect=(".csv",))


@case("build-corpus-jsonl-invalid-json-line")
def _(w: World) -> Call:
    data = w.write("data.jsonl", '{"text": "a good line"}\n{"text": "broken\n')
    return build_call(w, corpus=[str(data)], expect=("data.jsonl", "2", "not valid JSON"))


@case("build-corpus-jsonl-without-text-field")
def _(w: World) -> Call:
    data = w.write("data.jsonl", '{"body": "no text field here"}\n')
    return build_call(w, corpus=[str(data)], expect=("data.jsonl", "'text'"))


@case("build-corpus-not-utf8")
def _(w: World) -> Call:
    data = w.write("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))
    return build_call(w, corpus=[str(data)], expect=("latin1.txt", "UTF-8"))


@case("build-teacher-folder-does-not-exist")
def _(w: World) -> Call:
    return build_call(w, "--teacher", "./nosuch", expect=("./nosuch", "does not exist"), refuse=("repo id", "repo_id"))


@case("build-teacher-is-a-file")
def _(w: World) -> Call:
    weights = w.write("weights.bin", b"\0" * 64)
    return build_call(w, "--teacher", str(weights), expect=(str(weights),))


@case("build-teacher-folder-without-config-json")
def _(w: World) -> Call:
    return build_call(w, "--teacher", str(w.teacher(without=("config.json",))), "--device", "cpu",
                      expect=("config.json",))


@case("build-teacher-weights-truncated")
def _(w: World) -> Call:
    teacher = w.teacher()
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    return build_call(w, "--teacher", str(teacher), "--device", "cpu", expect=("model.safetensors",))


@case("build-teacher-without-tokenizer-files")
def _(w: World) -> Call:
    teacher = w.teacher(without=("tokenizer.json", "tokenizer_config.json"))
    return build_call(w, "--teacher", str(teacher), "--device", "cpu", expect=("tokenizer",))


@case("build-config-file-does-not-exist")
def _(w: World) -> Call:
    return build_call(w, "--config", str(w.tmp / "build.toml"), expect=("build.toml",))


@case("build-config-not-toml")
def _(w: World) -> Call:
    toml = w.write("build.toml", "k: 8\nseq_len: 16\n")
    return build_call(w, "--config", str(toml), expect=("build.toml",))


@case("build-config-unknown-key")
def _(w: World) -> Call:
    toml = w.write("build.toml", "top_k = 8\n")
    return build_call(w, "--config", str(toml), expect=("top_k",))


@case("build-config-k-is-a-string")
def _(w: World) -> Call:
    toml = w.write("build.toml", 'k = "8"\n')
    return build_call(w, "--config", str(toml), expect=('k = "8"', "integer"))


@case("build-config-seq-len-abc")
def _(w: World) -> Call:
    toml = w.write("build.toml", 'seq_len = "abc"\n')
    return build_call(w, "--config", str(toml), seq_len=False, expect=('seq_len = "abc"', "integer"))


@case("build-config-zstd-level-out-of-range")
def _(w: World) -> Call:
    toml = w.write("build.toml", "zstd_level = 30\n")
    return build_call(w, "--config", str(toml), expect=("zstd_level", "22"))


@case("build-config-trust-remote-code")
def _(w: World) -> Call:
    toml = w.write("build.toml", "trust_remote_code = true\n")
    return build_call(w, "--config", str(toml), expect=("trust_remote_code", "--trust-remote-code"))


@case("build-dtype-bogus")
def _(w: World) -> Call:
    return build_call(w, "--dtype", "float8", expect=("--dtype", "float8"), exit_code=2)


@case("build-device-cuda-without-a-gpu")
def _(w: World) -> Call:
    return build_call(w, "--device", "cuda", expect=("cuda", "GPU"), environ={"CUDA_VISIBLE_DEVICES": ""})


@case("build-device-unknown-name")
def _(w: World) -> Call:
    return build_call(w, "--device", "gpu", expect=("gpu",))


@case("build-engine-ray-without-ray-installed")
def _(w: World) -> Call:
    return build_call(w, "--engine", "ray", expect=("Ray", "kdstore[ray]"), without="ray")


def _closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening: a connection is refused at once
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@case("build-ray-address-unreachable")
def _(w: World) -> Call:
    address = f"127.0.0.1:{_closed_port()}"
    pytest.importorskip("ray")
    return build_call(w, "--engine", "ray", "--ray-address", address, expect=(address, "ray start --head"))


@case("build-ray-address-not-host-port")
def _(w: World) -> Call:
    pytest.importorskip("ray")
    return build_call(w, "--engine", "ray", "--ray-address", "headnode", expect=("'headnode'", "HOST:PORT"))


@case("build-ray-cluster-with-fewer-gpus-than-asked")
def _(w: World) -> Call:  # a local Ray instance of this machine's CPUs, started and stopped by the build
    pytest.importorskip("ray")
    return build_call(w, "--engine", "ray", "--num-gpus-per-worker", "64", expect=("--num-gpus-per-worker 64", "GPU(s)"),
                      isolated=True)


@case("build-ray-partition-given")
def _(w: World) -> Call:
    return build_call(w, "--engine", "ray", "--num-partitions", "2", "--partition", "1", expect=("--partition 1",))


@case("build-ray-device-cuda-without-gpus-per-worker")
def _(w: World) -> Call:
    return build_call(w, "--engine", "ray", "--device", "cuda", expect=("--device cuda", "--num-gpus-per-worker"))


@case("build-ray-vllm-without-gpus-per-worker")
def _(w: World) -> Call:
    return build_call(w, "--engine", "ray", "--backend", "vllm", "-k", "8", expect=("--backend vllm", "--num-gpus-per-worker 1"))


@case("build-num-gpus-per-worker-negative")
def _(w: World) -> Call:
    return build_call(w, "--engine", "ray", "--num-gpus-per-worker", "-1", expect=("num_gpus_per_worker = -1.0",))


@case("build-backend-vllm-not-installed")
def _(w: World) -> Call:
    return build_call(w, "--backend", "vllm", "-k", "8", expect=("vLLM", "pip install vllm"), without="vllm")


@case("build-backend-vllm-max-logprobs-below-k")
def _(w: World) -> Call:
    toml = w.write("build.toml", 'backend = "vllm"\n[vllm_options]\nmax_logprobs = 20\n')
    return build_call(w, "--config", str(toml), "-k", "64",
                      expect=("max_logprobs = 20", "K = 64", "raise max_logprobs under [vllm_options]"))


@case("build-backend-vllm-with-sampled-draws")
def _(w: World) -> Call:
    return build_call(w, "--backend", "vllm", "--sampled-draws", "16", expect=("--sampled-draws 16", "--backend vllm"))


@case("build-backend-vllm-teacher-it-cannot-load")
def _(w: World) -> Call:
    pytest.importorskip("vllm", reason="needs vLLM (and the GPU it runs on)")
    teacher = w.teacher()
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    return build_call(w, "--backend", "vllm", "--teacher", str(teacher), "-k", "8",
                      expect=("vLLM cannot load teacher", str(teacher)))
# -- generate ----------------------------------------------------------------------
PROBLEM = {"id": "q1", "prompt": "Question: Ben has 7 marbles and finds 5 more. How many marbles does he have?\nAnswer:",
           "answer": "12"}


def generate_call(w: World, *args: str, prompts: Path | None = None, **call: object) -> Call:
    """``kdstore generate PROMPTS --out TMP/out --device cpu ARGS`` with the bundled teacher unless ``--teacher``."""
    out = w.tmp / "out"
    if prompts is None:
        prompts = w.write("prompts.jsonl", json.dumps(PROBLEM) + "\n")
    if "--teacher" not in args:
        w.used.append(BUNDLED_TEACHER)
    return Call(["generate", str(prompts), "--out", str(out), "--device", "cpu", "--max-new-tokens", "4", *args],
                new=out, **call)


@case("generate-n-0")
def _(w: World) -> Call:
    return generate_call(w, "-n", "0", expect=("n = 0", ">= 1"))


@case("generate-prompt-longer-than-the-teachers-context")
def _(w: World) -> Call:
    return generate_call(w, "--max-new-tokens", "1010", expect=("prompt q1", "context of 1024", "--too-long skip"))


@case("generate-chat-template-from-a-tokenizer-without-one")
def _(w: World) -> Call:
    return generate_call(w, "--chat-template", expect=("--chat-template", "has no chat template"))


@case("generate-messages-without-a-chat-template")
def _(w: World) -> Call:
    prompts = w.write("chat.jsonl", json.dumps({"prompt": [{"role": "user", "content": "Hello"}]}) + "\n")
    return generate_call(w, prompts=prompts, expect=("messages list", "--chat-template"))


@case("generate-empty-prompt-file")
def _(w: World) -> Call:
    return generate_call(w, prompts=w.write("empty.jsonl", "\n"), expect=("empty.jsonl", "holds no prompts"))


@case("generate-prompt-file-missing")
def _(w: World) -> Call:
    return generate_call(w, prompts=w.tmp / "nowhere.jsonl", expect=("nowhere.jsonl", "does not exist"))


@case("generate-prompt-field-missing")
def _(w: World) -> Call:
    return generate_call(w, "--prompt-field", "question", expect=("record 1", "no 'question' field", "--prompt-field"))


@case("generate-prompt-line-not-json")
def _(w: World) -> Call:
    prompts = w.write("broken.jsonl", json.dumps(PROBLEM) + "\n{not json\n")
    return generate_call(w, prompts=prompts, expect=("line 2", "not JSON"))


@case("generate-teacher-with-nan-logprobs")
def _(w: World) -> Call:
    import torch
    from transformers import AutoModelForCausalLM

    folder = w.teacher()
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return generate_call(w, "--teacher", str(folder), expect=("NaN or inf log-probs for prompt q1",))


@case("generate-temperature-negative")
def _(w: World) -> Call:
    return generate_call(w, "--temperature", "-1", expect=("temperature = -1", ">= 0"))


@case("generate-top-p-0")
def _(w: World) -> Call:
    return generate_call(w, "--top-p", "0", expect=("top_p = 0", "> 0"))


@case("generate-k-above-the-vocabulary")
def _(w: World) -> Call:
    return generate_call(w, "-k", "5000", expect=("5000", "4096"))


@case("generate-answer-pattern-not-a-regex")
def _(w: World) -> Call:
    return generate_call(w, "--answer-extractor", "regex", "--answer-pattern", "(", expect=("--answer-pattern", "regular"))


@case("generate-answer-pattern-without-the-regex-extractor")
def _(w: World) -> Call:
    return generate_call(w, "--answer-pattern", "is (\\d+)", expect=("--answer-pattern", "--answer-extractor regex"))


@case("generate-config-sets-trust-remote-code")
def _(w: World) -> Call:
    config = w.write("generate.toml", "trust_remote_code = true\n")
    return generate_call(w, "--config", str(config), expect=("trust_remote_code", "--trust-remote-code"))


@case("generate-config-unknown-key")
def _(w: World) -> Call:
    config = w.write("generate.toml", "samples = 4\n")
    return generate_call(w, "--config", str(config), expect=("unknown keys: samples",))


@case("generate-out-is-a-non-empty-folder-that-is-not-a-store")
def _(w: World) -> Call:
    w.write("notes/todo.txt", "buy milk\n")
    prompts = w.write("prompts.jsonl", json.dumps(PROBLEM) + "\n")
    return Call(["generate", str(prompts), "--out", str(w.tmp / "notes"), "--device", "cpu"],
                expect=(str(w.tmp / "notes"), "not empty"))


@case("generate-out-is-a-url")
def _(w: World) -> Call:
    prompts = w.write("prompts.jsonl", json.dumps(PROBLEM) + "\n")
    return Call(["generate", str(prompts), "--out", "s3://bucket/gens", "--device", "cpu"],
                expect=("s3://bucket/gens", "local folder"))


@case("generate-into-a-logits-store")
def _(w: World) -> Call:
    store = w.built_copy()
    prompts = w.write("prompts.jsonl", json.dumps(PROBLEM) + "\n")
    return Call(["generate", str(prompts), "--out", str(store), "--device", "cpu", "-k", "4", "--max-new-tokens", "2"],
                expect=(str(store),))


# -- train ---------------------------------------------------------------------------
def train_call(w: World, *args: str, store: str | None = None, student: str | None = None, steps: bool = True,
               **call: object) -> Call:
    """``kdstore train STORE --student S --out TMP/run [--steps 2] --batch-size 4 ARGS`` into a new run folder.
    ``steps=False`` for a config file's steps, which the flag would override."""
    out = w.tmp / "run"
    return Call(["train", store or w.built, "--student", student or w.student, "--out", str(out),
                 *(["--steps", "2"] if steps else []), "--batch-size", "4", *args], new=out, **call)


def resume_call(w: World, *args: str, **call: object) -> Call:
    """``kdstore train ... --resume`` of a copy of the 2-step run (its folder must not change)."""
    run = w.run_copy()
    return Call(["train", w.built, "--student", w.student, "--out", str(run), "--steps", "2", "--batch-size", "4",
                 "--lr", "0.001", "--resume", *args], **call)


@case("train-store-does-not-exist")
def _(w: World) -> Call:
    return train_call(w, store=str(w.tmp / "nowhere"), expect=(str(w.tmp / "nowhere"), "does not exist"))


@case("train-store-is-a-folder-without-manifest")
def _(w: World) -> Call:
    (w.tmp / "data").mkdir()
    return train_call(w, store=str(w.tmp / "data"), expect=("manifest.json",))


@case("train-no-student")
def _(w: World) -> Call:
    return Call(["train", w.built, "--out", str(w.tmp / "run"), "--steps", "2"], new=w.tmp / "run",
                expect=("student",))


@case("train-student-json-does-not-exist")
def _(w: World) -> Call:
    return train_call(w, student="nosuch.json", expect=("nosuch.json", "does not exist"))  # no hub: test_train.py


@case("train-student-folder-without-config")
def _(w: World) -> Call:
    (w.tmp / "my-student").mkdir()
    return train_call(w, student=str(w.tmp / "my-student"), expect=(str(w.tmp / "my-student"),))


@case("train-student-with-too-few-logits")
def _(w: World) -> Call:
    other = student_config(w.tmp / "student-1000.json", 1000)  # more than 4096 is a padded superset: it trains
    return train_call(w, student=str(other), expect=("4096", "1000"))


@case("train-lr-negative")
def _(w: World) -> Call:
    return train_call(w, "--lr", "-1", expect=("lr = -1", "> 0"))


@case("train-lr-0")
def _(w: World) -> Call:
    return train_call(w, "--lr", "0", expect=("lr = 0", "> 0"))


@case("train-steps-0")
def _(w: World) -> Call:
    return train_call(w, "--steps", "0", expect=("steps = 0", ">= 1"))


@case("train-grad-accum-0")
def _(w: World) -> Call:
    return train_call(w, "--grad-accum", "0", expect=("grad_accum = 0", ">= 1"))


@case("train-precision-bogus")
def _(w: World) -> Call:
    return train_call(w, "--precision", "fp8", expect=("--precision", "fp8"), exit_code=2)


@case("train-steps-negative")
def _(w: World) -> Call:
    return train_call(w, "--steps", "-5", expect=("steps = -5", ">= 1"))


@case("train-batch-size-0")
def _(w: World) -> Call:
    return train_call(w, "--batch-size", "0", expect=("batch_size = 0", ">= 1"))


@case("train-batch-size-not-a-number")
def _(w: World) -> Call:
    return train_call(w, "--batch-size", "eight", expect=("--batch-size", "eight"), exit_code=2)


@case("train-ce-weight-2")
def _(w: World) -> Call:
    return train_call(w, "--ce-weight", "2", expect=("ce_weight", "2"))


@case("train-loss-bogus")
def _(w: World) -> Call:
    return train_call(w, "--loss", "kl_forward", expect=("kl_forward", "forward_kl"))


@case("train-config-steps-is-a-string")
def _(w: World) -> Call:
    toml = w.write("train.toml", 'steps = "10"\n')
    return train_call(w, "--config", str(toml), steps=False, expect=('steps = "10"', "integer"))


@case("train-config-unknown-key")
def _(w: World) -> Call:
    toml = w.write("train.toml", "learning_rate = 0.001\n")
    return train_call(w, "--config", str(toml), expect=("learning_rate",))


@case("train-config-not-toml")
def _(w: World) -> Call:
    toml = w.write("train.toml", "[loss\nname = jsd\n")
    return train_call(w, "--config", str(toml), expect=("train.toml",))


@case("train-config-does-not-exist")
def _(w: World) -> Call:
    return train_call(w, "--config", str(w.tmp / "train.toml"), expect=("train.toml",))


@case("train-val-store-does-not-exist")
def _(w: World) -> Call:
    toml = w.write("train.toml", f'val_store = "{w.tmp / "nosuch-val"}"\n')
    return train_call(w, "--config", str(toml), expect=(str(w.tmp / "nosuch-val"), "does not exist"))


@case("train-sampled-kl-on-a-store-without-draws")
def _(w: World) -> Call:
    return train_call(w, "--loss", "sampled_kl", expect=("sampled",))


@case("train-out-is-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return Call(["train", w.built, "--student", w.student, "--out", str(notes), "--steps", "2", "--batch-size", "4"],
                expect=(str(notes),))


@case("train-again-into-a-run-with-a-checkpoint")
def _(w: World) -> Call:
    run = w.run_copy()
    return Call(["train", w.built, "--student", w.student, "--out", str(run), "--steps", "2", "--batch-size", "4",
                 "--lr", "0.001"], expect=("already holds a checkpoint", "--resume"))


@case("train-resume-without-a-checkpoint")
def _(w: World) -> Call:
    return train_call(w, "--resume", expect=("nothing to resume",))


class _Payload:
    """A pickle that creates a file when loaded: what an attacker's checkpoint.pt could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@case("train-resume-with-a-pickle-checkpoint")
def _(w: World) -> Call:
    marker = w.tmp.parent / f"{w.tmp.name}-pickle-ran"
    (w.tmp / "run").mkdir()
    (w.tmp / "run" / "checkpoint.pt").write_bytes(pickle.dumps({"model": _Payload(marker)}))
    return Call(["train", w.built, "--student", w.student, "--out", str(w.tmp / "run"), "--steps", "2",
                 "--batch-size", "4", "--resume"], expect=("checkpoint.pt",), absent=(marker,))


@case("train-resume-with-other-settings")
def _(w: World) -> Call:
    return resume_call(w, "--lr", "0.002", expect=("lr", "0.001", "0.002"))


@case("train-resume-with-a-damaged-checkpoint")
def _(w: World) -> Call:
    call = resume_call(w)
    (w.tmp / "run" / "checkpoint" / "state.json").write_text("{ not json")
    return Call(call.args, expect=("checkpoint", "damaged"))


@case("train-student-unknown-preset")
def _(w: World) -> Call:
    return train_call(w, student="preset:tiny", expect=("preset:tiny", "preset:quarter, preset:half"))


@case("train-student-preset-without-a-name")
def _(w: World) -> Call:
    return train_call(w, student="preset:", expect=("'preset:'", "preset:quarter"))


@case("train-student-preset-whose-teacher-is-gone")
def _(w: World) -> Call:  # built by a teacher that is not the bundled one (another config), then deleted
    from kdstore.build import BuildConfig, build

    teacher = w.teacher()
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    store = w.tmp / "store-of-a-gone-teacher"
    build(BuildConfig(corpus=(w.corpus,), teacher=str(teacher), out=str(store), k=4, seq_len=16, progress=False,
                      device="cpu"))
    shutil.rmtree(teacher)
    return train_call(w, store=str(store), student="preset:quarter", expect=(str(teacher), "cannot be read here",
                                                                              "config.json"))


@case("train-config-val-sequences-negative")
def _(w: World) -> Call:
    toml = w.write("train.toml", "val_sequences = -1\n")
    return train_call(w, "--config", str(toml), expect=("val_sequences = -1", ">= 0"))


@case("train-config-val-sequences-is-the-whole-store")
def _(w: World) -> Call:
    toml = w.write("train.toml", "val_sequences = 100000\n")
    return train_call(w, "--config", str(toml), expect=("val_sequences = 100000", "leaves nothing to train on"))


@case("train-config-val-sequences-above-the-val-store")
def _(w: World) -> Call:
    toml = w.write("train.toml", f'val_store = "{w.built}"\nval_sequences = 100000\n')
    return train_call(w, "--config", str(toml), expect=("val_sequences = 100000", "val_store", "holds"))


@case("train-config-tensorboard-is-a-string")
def _(w: World) -> Call:
    toml = w.write("train.toml", 'tensorboard = "yes"\n')
    return train_call(w, "--config", str(toml), expect=('tensorboard = "yes"', "true or false"))


@case("train-quiet-with-a-value")
def _(w: World) -> Call:
    return train_call(w, "--quiet", "yes", expect=("yes",), exit_code=2)


# -- check ---------------------------------------------------------------------------
@case("check-student-does-not-exist")
def _(w: World) -> Call:
    missing = str(w.tmp / "nosuch-student")
    return Call(["check", w.built, "--student", missing], expect=(missing, "does not exist", "never downloads"))


@case("check-student-is-a-hub-id")
def _(w: World) -> Call:
    return Call(["check", w.built, "--student", "Qwen/Qwen2.5-0.5B"], expect=("Qwen/Qwen2.5-0.5B", "does not exist"))


@case("check-student-folder-without-tokenizer-files")
def _(w: World) -> Call:
    model = student_config(w.write("my-student/config.json", "").parent / "config.json", 4096).parent
    return Call(["check", w.built, "--student", str(model)], expect=(str(model), "no tokenizer files", "save_pretrained"))


@case("check-student-is-a-file")
def _(w: World) -> Call:
    return Call(["check", w.built, "--student", w.student], expect=(str(w.student), "is a file"))


@case("check-student-tokenizer-json-damaged")
def _(w: World) -> Call:
    student = w.teacher()
    (student / "tokenizer.json").write_text("{ not json")
    return Call(["check", w.built, "--student", str(student)], expect=("cannot load the tokenizer", str(student)))


@case("check-student-config-json-damaged")
def _(w: World) -> Call:
    student = w.teacher()
    (student / "config.json").write_text("{ not json")
    return Call(["check", w.built, "--student", str(student)], expect=(str(student / "config.json"), "JSON"))


@case("check-store-without-a-tokenizer-folder")
def _(w: World) -> Call:
    return Call(["check", str(w.store()), "--student", str(Path(w.built) / "tokenizer")],
                expect=("no tokenizer/ folder", "kdstore build"))


@case("check-store-tokenizer-edited-after-the-build")
def _(w: World) -> Call:
    store = w.built_copy()
    (store / "tokenizer" / "tokenizer_config.json").write_text("{}")
    return Call(["check", str(store), "--student", str(BUNDLED_TEACHER)], expect=("tokenizer files", "do not match"))


@case("check-no-student")
def _(w: World) -> Call:
    return Call(["check", w.built], expect=("--student",), exit_code=2)


@case("check-student-vocab-size-0")
def _(w: World) -> Call:
    return Call(["check", w.built, "--student", str(BUNDLED_TEACHER), "--student-vocab-size", "0"],
                expect=("--student-vocab-size", "0"), exit_code=2)


# -- stats ---------------------------------------------------------------------------
def stats_call(w: World, *args: str, store: str | None = None, **call: object) -> Call:
    """``kdstore stats STORE ARGS`` on a copy of the synthetic store."""
    return Call(["stats", store or str(w.store()), *args], **call)


@case("stats-plot-is-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return stats_call(w, "--plot", str(notes), expect=(str(notes), "is a file"))


@case("stats-plot-inside-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return stats_call(w, "--plot", str(notes / "plots"), expect=(str(notes), "is a file"))


@case("stats-plot-in-a-missing-folder")
def _(w: World) -> Call:
    return stats_call(w, "--plot", str(w.tmp / "nowhere" / "plots"), expect=(str(w.tmp / "nowhere"), "does not exist"))


@case("stats-plot-is-a-url")
def _(w: World) -> Call:
    return stats_call(w, "--plot", "s3://bucket/plots", expect=("s3://bucket/plots", "local path"))


@case("stats-html-into-a-missing-folder")
def _(w: World) -> Call:
    return stats_call(w, "--html", str(w.tmp / "nowhere" / "report.html"), expect=(str(w.tmp / "nowhere"), "does not exist"))


@case("stats-html-is-a-folder")
def _(w: World) -> Call:
    (w.tmp / "reports").mkdir()
    return stats_call(w, "--html", str(w.tmp / "reports"), expect=(str(w.tmp / "reports"), "is a folder"))


@case("stats-html-inside-a-file")
def _(w: World) -> Call:
    notes = w.write("notes.txt", "my notes\n")
    return stats_call(w, "--html", str(notes / "report.html"), expect=(str(notes), "is a file"))


@case("stats-store-without-sequences")
def _(w: World) -> Call:
    store = write_store(w.tmp / "empty-store", CodecConfig(k=4, vocab_size=50), num_sequences=0)
    return stats_call(w, "--plot", "plots", store=str(store), expect=("no sequences",))


@case("stats-generations-store-without-completions")
def _(w: World) -> Call:  # a finished generations store with no rows (every prompt skipped): nothing to measure
    import dataclasses

    from conftest import make_manifest
    from kdstore.format import FORMAT_VERSION, TABLE_GENERATIONS, generations_schema
    from kdstore.writer import ShardWriter

    codec = CodecConfig(k=4, vocab_size=50)
    manifest = dataclasses.replace(make_manifest(codec), table=TABLE_GENERATIONS, format_version=FORMAT_VERSION)
    with ShardWriter(w.tmp / "empty-generations", manifest, generations_schema(codec)):
        pass
    return stats_call(w, "--plot", "plots", store=str(w.tmp / "empty-generations"), expect=("holds no completions",))


@case("stats-store-with-a-damaged-shard-midway")
def _(w: World) -> Call:  # the other shards are measured first; no plot or report may appear
    store = w.store()
    shard = sorted((store / "shards").glob("*.parquet"))[-1]
    data = bytearray(shard.read_bytes())
    data[200:204] = b"\x00\x01\x02\x03"
    shard.write_bytes(bytes(data))
    return stats_call(w, "--plot", "plots", "--html", "report.html", store=str(store), expect=(shard.name,))


@case("stats-no-store-argument")
def _(w: World) -> Call:
    return Call(["stats", "--json"], expect=("STORE",), exit_code=2)


def metrics_run(w: World, text: str) -> Path:
    """A run folder holding only ``metrics.jsonl`` with ``text`` (docs/train.md's line format)."""
    run = w.tmp / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(text)
    return run


LOGGED = '{"step": 10, "loss": 3.5, "kd": 3.5, "ce": 7.1, "lr": 0.0004, "tokens_per_s": 21500.0, "epoch": 0, "time": 1.7e9}\n'


@case("stats-run-with-an-empty-metrics-file")
def _(w: World) -> Call:
    run = metrics_run(w, "")
    return stats_call(w, "--plot", "plots", "--html", "report.html", store=str(run),
                      expect=(str(run / "metrics.jsonl"), "no logged step"))


@case("stats-run-with-a-broken-metrics-line")
def _(w: World) -> Call:  # a damaged line mid-file (not a half-written last one): its number is named
    run = metrics_run(w, LOGGED + "{not json\n" + LOGGED.replace('"step": 10', '"step": 20'))
    return stats_call(w, "--plot", "plots", store=str(run), expect=(str(run / "metrics.jsonl"), "line 2"))


@case("stats-folder-neither-store-nor-run")
def _(w: World) -> Call:
    folder = w.tmp / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("mine\n")
    return stats_call(w, "--html", "report.html", store=str(folder), expect=(str(folder), "manifest.json", "metrics.jsonl"))


# -- score and select (MiniPLM difference sampling) -------------------------------------
def _reference(w: World, **config: int) -> Path:
    """The bundled teacher under another name, its config.json changed by ``config``: a reference model."""
    folder = w.teacher()
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **config}))
    return folder


@case("score-reference-with-another-tokenizer")
def _(w: World) -> Call:
    from conftest import save_tiny_teacher

    reference = save_tiny_teacher(w.tmp / "word-model")
    store = w.built_copy()
    ours = json.loads((store / "manifest.json").read_text())["tokenizer"]["files_sha256"]
    return Call(["score", str(store), "--reference", str(reference), "--device", "cpu"],
                expect=("another tokenizer", ours, "reference files_sha256"))


@case("score-reference-context-shorter-than-the-sequences")
def _(w: World) -> Call:  # the shared store's sequences have 16 tokens
    reference = _reference(w, max_position_embeddings=8)
    return Call(["score", str(w.built_copy()), "--reference", str(reference), "--device", "cpu"],
                expect=("at most 8 positions", "16 tokens"))


@case("score-a-view")
def _(w: World) -> Call:
    from kdstore.selection import SelectConfig, select

    select(SelectConfig(store=str(w.built_copy()), out=str(w.tmp / "view"), by="teacher-nll"))
    return Call(["score", str(w.tmp / "view"), "--reference", str(BUNDLED_TEACHER)], expect=("is a selection view",))


@case("build-reference-with-another-tokenizer")
def _(w: World) -> Call:
    from conftest import save_tiny_teacher

    reference = save_tiny_teacher(w.tmp / "word-model")
    return Call(["build", w.corpus, "--out", str(w.tmp / "out"), "--reference", str(reference), "-k", "4", "--seq-len",
                 "16", "--device", "cpu"], expect=("another tokenizer", "reference files_sha256"), new=w.tmp / "out")


# -- generate and score --engine ray (kdstore/engine.py; build's cases are above) -------------
@case("generate-engine-ray-without-ray-installed")
def _(w: World) -> Call:
    return generate_call(w, "--engine", "ray", expect=("Ray", "kdstore[ray]"), without="ray")


@case("generate-ray-partition-given")
def _(w: World) -> Call:
    return generate_call(w, "--engine", "ray", "--num-partitions", "2", "--partition", "1", expect=("--partition 1",))


@case("generate-num-gpus-per-worker-negative")
def _(w: World) -> Call:
    return generate_call(w, "--engine", "ray", "--num-gpus-per-worker", "-1", expect=("num_gpus_per_worker = -1.0",))


@case("score-engine-ray-without-ray-installed")
def _(w: World) -> Call:
    return Call(["score", str(w.built_copy()), "--reference", str(BUNDLED_TEACHER), "--engine", "ray"],
                expect=("Ray", "kdstore[ray]"), without="ray")


@case("score-ray-device-cuda-without-gpus-per-worker")
def _(w: World) -> Call:
    return Call(["score", str(w.built_copy()), "--reference", str(BUNDLED_TEACHER), "--engine", "ray", "--device",
                 "cuda"], expect=("--device cuda", "--num-gpus-per-worker"))


@case("score-ray-address-unreachable")
def _(w: World) -> Call:
    address = f"127.0.0.1:{_closed_port()}"
    pytest.importorskip("ray")
    return Call(["score", str(w.built_copy()), "--reference", str(BUNDLED_TEACHER), "--engine", "ray", "--ray-address",
                 address], expect=(address, "ray start --head"))


@case("select-keep-zero")
def _(w: World) -> Call:
    return Call(["select", w.built, "--by", "teacher-nll", "--keep", "0", "--out", str(w.tmp / "view")],
                expect=("keep = 0.0", "> 0.0 and <= 1.0"), new=w.tmp / "view")


@case("select-keep-above-one")
def _(w: World) -> Call:
    return Call(["select", w.built, "--by", "teacher-nll", "--keep", "1.5", "--out", str(w.tmp / "view")],
                expect=("keep = 1.5", "> 0.0 and <= 1.0"), new=w.tmp / "view")


@case("select-by-a-score-not-there")
def _(w: World) -> Call:
    return Call(["select", w.built, "--by", "difference", "--out", str(w.tmp / "view")],
                expect=("'reference_score'", "kdstore score STORE --reference MODEL"), new=w.tmp / "view")


@case("select-from-a-store-that-fails-verify")
def _(w: World) -> Call:
    store = w.built_copy()
    shard = sorted((store / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return Call(["select", str(store), "--by", "teacher-nll", "--out", str(w.tmp / "view")],
                expect=("fails verify", shard.name), new=w.tmp / "view")


@case("select-where-names-a-missing-column")
def _(w: World) -> Call:
    return Call(["select", w.built, "--by", "teacher-nll", "--where", "reference_score < -2", "--out",
                 str(w.tmp / "view")], expect=("'reference_score' is not a column",), new=w.tmp / "view")


@case("select-into-a-folder-with-files")
def _(w: World) -> Call:
    w.write("mine/notes.txt", "mine\n")
    return Call(["select", w.built, "--by", "teacher-nll", "--out", str(w.tmp / "mine")], expect=("not an empty folder",))


@case("copy-a-view")
def _(w: World) -> Call:
    from kdstore.selection import SelectConfig, select

    select(SelectConfig(store=str(w.built_copy()), out=str(w.tmp / "view"), by="teacher-nll"))
    return Call(["copy", str(w.tmp / "view"), str(w.tmp / "copied")], expect=("selection view", "--materialize"),
                new=w.tmp / "copied")


@case("view-whose-parent-changed-since")
def _(w: World) -> Call:
    from kdstore.selection import SelectConfig, select

    parent = w.built_copy()
    select(SelectConfig(store=str(parent), out=str(w.tmp / "view"), by="teacher-nll"))
    manifest = json.loads((parent / "manifest.json").read_text())
    shard = manifest["shards"][0]
    shard["sha256"] = "0" * 64  # as if the parent had been built again
    (parent / "manifest.json").write_text(json.dumps(manifest))
    return Call(["info", str(w.tmp / "view")], expect=(shard["path"], "changed since the selection"))


# -- the test ------------------------------------------------------------------------
def snapshot(paths: list[Path], leave_out: Path | None = None) -> dict[str, object]:
    """{path: (size, sha256)} of every file, {path: "dir"} of every folder, {path: None} of a missing path;
    nothing in or at ``leave_out``."""
    found: dict[str, object] = {}
    for root in paths:
        if not os.path.lexists(root):
            found[str(root)] = None
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            if leave_out is not None and (path == leave_out or leave_out in path.parents):
                continue
            if path.is_dir():
                found[str(path)] = "dir"
            else:
                data = path.read_bytes()
                found[str(path)] = (len(data), hashlib.sha256(data).hexdigest())
    return found


def run_cli(call: Call, cwd: Path, monkeypatch) -> tuple[int, str]:
    if call.without_s3fs or call.without or call.isolated:
        environ = {**os.environ, "HF_HUB_OFFLINE": "1", **call.environ}
        hidden = "s3fs" if call.without_s3fs else call.without
        script = WITHOUT_S3FS.replace("sys.modules['s3fs'] = None; ", f"sys.modules[{hidden!r}] = None; " if hidden else "")
        done = subprocess.run([sys.executable, "-c", script, *call.args], cwd=cwd, env=environ, timeout=120,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return done.returncode, done.stdout
    for key, value in call.environ.items():
        monkeypatch.setenv(key, value)
    if "CUDA_VISIBLE_DEVICES" in call.environ:  # torch reads it once; a GPU machine must look like one without
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(cli, call.args, prog_name="kdstore")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(f"uncaught {type(result.exception).__name__}, a traceback for the user:\n{result.output}\n{tb}")
    return result.exit_code, result.output


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_line_and_loses_nothing(name, shared, tmp_path, monkeypatch):
    world = World(tmp_path, shared)
    cwd = tmp_path / "cwd"  # where a default --out (kdstore-store, kdstore-run) would land
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    call = CASES[name](world)
    watched = [tmp_path, *dict.fromkeys(world.used)]
    before = snapshot(watched, leave_out=call.new)

    code, output = run_cli(call, cwd, monkeypatch)

    shown = f"exit {code}, output:\n{output}"
    print(f"{name}: {shown}")  # pytest -rA shows what every case printed
    assert code != 0, shown
    assert call.exit_code is None or code == call.exit_code, shown
    assert "Traceback" not in output, shown
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines and lines[-1] == errors[0], shown
    noise = [line for line in lines[:-1] if not PROGRESS.search(line)
             and not (call.problems_ok and line.startswith("problem: "))]
    assert not noise, shown
    for text in call.expect:
        assert text in errors[0], f"{text!r} not in the Error line; {shown}"
    for text in call.refuse:
        assert text not in output, f"{text!r} in the output; {shown}"

    after = snapshot(watched, leave_out=call.new)
    assert after == before, f"files changed: {sorted(set(before.items()) ^ set(after.items()), key=str)}; {shown}"
    if call.new is not None and call.new.exists():
        left = {p.name for p in call.new.iterdir()} & STORE_OR_RUN_NAMES
        assert not left, f"{call.new} was left holding {sorted(left)}; {shown}"
    for path in call.absent:
        assert not path.exists(), f"{path} exists: the pickle ran; {shown}"
