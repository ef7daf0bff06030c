"""Named errors. Each carries a one-line message and a fix-it hint.

The CLI prints ``Error: <message>`` plus the hint and exits 1; library users
catch the class they care about. Nothing here imports click. The classes are
grouped by the stage that raises them: the store and its format, building a
store, loading it into a trainer, training a student.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none: what a one-line error quotes
    of a library's exception."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class KdstoreError(Exception):
    """Base class of every error kdstore raises on purpose."""

    hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        """The message and the hint, on one line, for the CLI."""
        text = str(self)
        return f"{text} ({self.hint})" if self.hint else text


# -- the store and its format: open, read, write, verify --------------------
class StoreNotFoundError(KdstoreError):
    hint = "check the path; a store is a folder holding manifest.json"


class ManifestError(KdstoreError):
    hint = "the manifest is damaged or was edited by hand; rebuild or restore it"


class FormatVersionError(KdstoreError):
    hint = "upgrade kdstore (pip install -U kdstore) to read this store"


class ShardMissingError(KdstoreError):
    hint = "restore the shard file or rebuild the store; do not rename shards"


class ChecksumError(KdstoreError):
    hint = "the shard changed after it was written; restore it from a good copy or rebuild"


class ShardCorruptError(KdstoreError):
    hint = "the shard is truncated or not Parquet; restore it from a good copy or rebuild"


class SchemaError(KdstoreError):
    hint = "the shard columns do not match the format spec in schemas/"


class CodecError(KdstoreError):
    hint = "check K, the vocabulary size and the shapes passed to the codec"


class StoreMismatchError(KdstoreError):
    hint = "write into a new folder, or use the store's teacher, tokenizer, codec and build settings (values above)"


class StoreLockedError(KdstoreError):
    hint = "another process is writing this partition; wait for it or pick another partition"


class VerifyError(KdstoreError):
    hint = "run `kdstore verify STORE` for the full list of problems"


class UnsafeFileError(KdstoreError):
    hint = "kdstore reads only regular files inside the store folder: replace the link by the file itself"


class StorageError(KdstoreError):
    hint = "check the location, its credentials (--storage-option KEY=VALUE) and the network"


class ArrowCopyError(KdstoreError):
    hint = "delete the Arrow copy named above; it is remade from the verified shards on next use"


class EmptyStoreError(KdstoreError):
    hint = "build the store with at least one sequence (`kdstore info STORE` shows the counts)"


class StatsError(KdstoreError):
    hint = "--plot takes a local folder (made if missing, in an existing folder); --html a local file in an existing folder"


class ExportError(KdstoreError):
    hint = "docs/export.md says what each --format holds and needs"


# -- building a store: corpus, teacher, build -------------------------------
class CorpusError(KdstoreError):
    hint = "check the corpus paths and CorpusConfig; inputs are .txt, .md, .jsonl, .json, .parquet or saved HF datasets"


class TeacherError(KdstoreError):
    hint = "check --teacher, --dtype and --device"


class BuildError(KdstoreError):
    hint = "fix the input named above and rerun; committed work is kept"


class EngineError(BuildError):
    hint = "check --engine, --ray-address and --num-gpus-per-worker (docs/build.md, Ray)"


class BackendError(BuildError):
    hint = "check --backend and the vLLM settings (docs/build.md, vLLM backend)"


class OutputFolderError(BuildError):
    hint = "pick a new or empty --out folder: kdstore writes only into folders it made, and overwrites nothing else"


# -- loading a store into a trainer: tokenizer, partition, collate, resume ---
class TokenizerMismatchError(KdstoreError):
    hint = "train the student with the teacher's tokenizer (STORE/tokenizer/), or pass allow_tokenizer_mismatch=True"


class TokenizerError(KdstoreError):
    hint = "pass a local tokenizer or model folder holding the tokenizer files (tokenizer.save_pretrained(folder) writes them)"


class PartitionError(KdstoreError):
    # row_group_bytes: a BuildConfig field and build.toml key (kdstore/build.py); tests/integration/test_build.py checks it
    hint = ("use fewer ranks or a smaller batch, or rebuild the store with smaller row groups: a lower "
            "row_group_bytes (default 1048576) in the build.toml of `kdstore build --config build.toml`")


class CollateError(KdstoreError):
    hint = "check the Collator arguments against the store (`kdstore info STORE` shows K and the columns)"


class ResumeError(KdstoreError):
    hint = "resume with the same store, PlanConfig, ranks and DataLoader workers as the run that saved the state"


# -- training a student -----------------------------------------------------
class TrainError(KdstoreError):
    hint = "fix the input named above and rerun"


class StudentMismatchError(TrainError):
    hint = "give the student a vocab_size equal to the store's (the store was made with the teacher's tokenizer)"


class ResumeMismatchError(TrainError):
    hint = "resume with the checkpoint's settings (shown above), or start a new run with another --out"


class NonFiniteLossError(TrainError):
    hint = "lower --lr, raise warmup_steps or check the batch named above; resume from the last good checkpoint"


# -- generating completions ---------------------------------------------------
class PromptError(KdstoreError):
    hint = "check the prompt file and --prompt-field / --answer-field (docs/generate.md)"


class GenerateError(KdstoreError):
    hint = "fix the input named above and rerun with the same --out; committed completions are kept"
# -- scoring a store with a reference model and selecting from it (kdstore.score, kdstore.selection) ----------
class ScoreError(KdstoreError):
    hint = "see `kdstore score --help`"


class SelectionError(KdstoreError):
    hint = "see `kdstore select --help`"


class ViewParentChangedError(SelectionError):
    hint = "select again from the parent as it is now (kdstore select PARENT ... --out NEW)"
