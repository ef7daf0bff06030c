"""Can a student be distilled from a store? An exact comparison of the store's tokenizer with the student's.

    from kdstore.vocab import compare_vocab
    report = compare_vocab("store", "path/to/student")  # a local tokenizer or model folder, or a tokenizer object
    print("\\n".join(report.lines()))                     # or report.to_dict()
    report.compatible                                    # False: report.problem says why, in one line

    kdstore check STORE --student FOLDER [--json]        # the same report; exit 1 when not compatible

A KD loss trains the student's logit i on the teacher's probability of the store's token i, so distillation
needs every store id to mean the same token to the student, and the student's logits to reach every id of
the store's tokenizer. The report puts the pair in one of five kinds:

* ``identical``: the same tokenizer files, or the same token -> id map and the same special tokens;
* ``special_tokens_differ``: the same token -> id map, other special tokens (bos/eos/pad/unk ids, added
  or special flags): compatible; the differences are listed as cautions;
* ``prefix``: the student's vocabulary is part of the store's (same ids), the store has more tokens;
* ``superset``: the student has every store token under the same id, and more ids the store never uses
  (a student tokenizer with extra tokens above);
* ``mismatched_ids``: some store token has another id, or none, in the student's vocabulary: never compatible.

The student's logit dimension is the size the caller gives (``student_vocab_size``), else its model's
``config.json`` ``vocab_size`` when the folder holds one (the Qwen2.5 case: one tokenizer of 151,665 ids,
embeddings padded to 151,936 or 152,064 rows), else the tokenizer's number of ids. Prefix, superset and even
identical tokenizers are compatible only when that dimension covers every id of the store's tokenizer.
Teacher logit rows above the store's tokenizer (padding, ``manifest["teacher"]["vocab_size"]``) that the
student lacks are named as a caution: a KD loss must drop those ids.

Nothing is downloaded: a student is a local path (``local_files_only=True``), and a remote store's
tokenizer files are read through its Store and checked against the manifest's ``files_sha256``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdstore.errors import TokenizerError, TokenizerMismatchError, first_line
from kdstore.format import sha256_named_files
from kdstore.store import Store, open_store

IDENTICAL, SPECIAL_TOKENS_DIFFER, PREFIX, SUPERSET, MISMATCHED = (
    "identical", "special_tokens_differ", "prefix", "superset", "mismatched_ids")
ROLES = ("bos", "eos", "pad", "unk")  # the special ids the manifest records (kdstore.build.tokenizer_info)
NUM_EXAMPLES = 5  # mismatched tokens shown; the count is always exact


@dataclass(frozen=True)
class IdMismatch:
    """A store token the student's vocabulary holds under another id (``student_id``), or not at all (None)."""

    token: str
    store_id: int
    student_id: int | None
    student_token_at_store_id: str | None  # what the student's vocabulary has under ``store_id``, if anything


@dataclass(frozen=True)
class SpecialDifference:
    """One special-token setting that differs: ``name`` is a role (bos, eos, pad, unk), ``added 'TOKEN'`` or
    ``special 'TOKEN'``; ``store`` / ``student`` the id with that role or flag on each side, None without."""

    name: str
    store: int | None
    student: int | None


@dataclass(frozen=True)
class VocabReport:
    """The comparison of a store's tokenizer with a student's (``compare_vocab``)."""

    store: str  # the store's location
    store_tokenizer: str  # manifest["tokenizer"]["name"]
    student: str  # the student's path, or its tokenizer's name_or_path
    kind: str  # IDENTICAL, SPECIAL_TOKENS_DIFFER, PREFIX, SUPERSET or MISMATCHED
    compatible: bool  # every store id means the same token to the student, and its logits reach them all
    problem: str | None  # why not compatible, one line naming the kind of mismatch and its count
    same_files: bool  # the student's saved tokenizer files hash to the store's files_sha256
    store_num_ids: int  # ids of the store's tokenizer (max id + 1; len(tokenizer) when ids are dense)
    student_num_ids: int
    teacher_vocab_size: int | None  # the teacher's logit dimension: the store's top-K ids are below it
    student_logit_size: int  # the student's logit dimension
    student_logit_source: str  # "student_vocab_size", "config.json vocab_size" or "tokenizer (no config.json)"
    num_mismatched: int  # store tokens with another id, or none, in the student's vocabulary
    mismatched: tuple[IdMismatch, ...]  # the first NUM_EXAMPLES of them, by store id
    num_store_only: int  # store tokens the student lacks (a prefix: ids the student never uses)
    num_student_only: int  # student tokens the store lacks
    special_differences: tuple[SpecialDifference, ...]
    cautions: tuple[str, ...]  # differences that do not stop distillation but change what the student learns

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The readable report that ``kdstore check`` prints."""
        files = "the same files" if self.same_files else "other files"
        lines = [f"store tokenizer    {self.store_tokenizer!r}: {self.store_num_ids:,} ids ({self.store})",
                 f"student tokenizer  {self.student!r}: {self.student_num_ids:,} ids, {files}",
                 f"teacher logits     {'unknown' if self.teacher_vocab_size is None else f'{self.teacher_vocab_size:,}'}",
                 f"student logits     {self.student_logit_size:,} ({self.student_logit_source})",
                 f"vocabulary         {_describe(self)}"]
        lines += [f"  {_show_mismatch(m)}" for m in self.mismatched]
        if self.num_mismatched > len(self.mismatched):
            lines.append(f"  ... and {self.num_mismatched - len(self.mismatched):,} more")
        lines += [f"caution: {c}" for c in self.cautions]
        lines.append(f"compatible for distillation: {'yes' if self.compatible else 'no'}")
        return lines


def _describe(report: VocabReport) -> str:
    if report.kind == IDENTICAL:
        return ("identical: the same tokenizer files" if report.same_files else
                "identical: the same token -> id map and special tokens (the files differ: normaliser, merges or settings)")
    if report.kind == SPECIAL_TOKENS_DIFFER:
        return f"the same token -> id map, other special tokens ({len(report.special_differences)} differences, below)"
    if report.kind == PREFIX:
        return (f"the student's is part of the store's, with the same ids; the store has {report.num_store_only:,} "
                "more tokens")
    if report.kind == SUPERSET:
        more = report.num_student_only
        return (f"the student has every store token under the same id, and {more:,} more id{'s' * (more != 1)} "
                "the store never uses")
    taken = any(m.student_id is not None or m.student_token_at_store_id is not None for m in report.mismatched)
    if report.num_student_only and not taken:  # both sides hold tokens the other lacks, no id is taken twice
        return (f"mismatched: {report.num_mismatched:,} store tokens are not in the student's, which has "
                f"{report.num_student_only:,} the store lacks")
    return f"mismatched: {report.num_mismatched:,} store tokens have another id, or none, in the student's"


def _show_mismatch(m: IdMismatch) -> str:
    if m.student_id is not None:
        return f"{m.token!r}: store id {m.store_id}, student id {m.student_id}"
    taken = f" (its id {m.store_id} is {m.student_token_at_store_id!r})" if m.student_token_at_store_id is not None else ""
    return f"{m.token!r}: store id {m.store_id}, not in the student's{taken}"


def _show_specials(differences: tuple[SpecialDifference, ...]) -> str:
    return "; ".join(f"{d.name}: store {'none' if d.store is None else d.store}, "
                     f"student {'none' if d.student is None else d.student}" for d in differences)


# -- the comparison -----------------------------------------------------------------
def compare_vocab(store: str | os.PathLike[str] | Store, student: str | os.PathLike[str] | Any,
                  student_vocab_size: int | None = None, storage_options: dict[str, Any] | None = None) -> VocabReport:
    """Compare the store's tokenizer with the student's, id by id (the module docstring says how it judges).

    ``student``: a local tokenizer or model folder (never downloaded), or a loaded ``transformers`` tokenizer.
    ``student_vocab_size``: the student's logit dimension, when the caller knows it (``kdstore train`` with a
    new student from a config.json: pass the store's tokenizer folder and the config's vocab_size).
    Raises TokenizerError for a student or store without a readable tokenizer.
    """
    if student_vocab_size is not None and (not isinstance(student_vocab_size, int) or student_vocab_size < 1):
        raise TokenizerError(f"student_vocab_size {student_vocab_size!r}: expected an integer of 1 or more",
                             hint="pass the student's logit dimension (its config's vocab_size), or None")
    folder = _student_folder(student)
    opened = open_store(store, storage_options)
    with _store_tokenizer_folder(opened) as store_folder:
        store_tokenizer = _load_tokenizer(store_folder, f"the tokenizer of store {opened.location}")
        student_tokenizer = student if folder is None else _load_tokenizer(folder, f"the tokenizer in {student}")
        same_files = _student_sha256(student_tokenizer, folder, store_folder) == _recorded_sha256(opened, store_folder)
    logit_size, logit_source = _student_logit_size(folder, student_vocab_size, student_tokenizer)
    name = str(student) if folder is not None else str(getattr(student, "name_or_path", type(student).__name__))
    return _judge(opened, name, store_tokenizer, student_tokenizer, same_files, logit_size, logit_source)


def _judge(store: Store, student_name: str, store_tokenizer: Any, student_tokenizer: Any, same_files: bool,
           student_logit_size: int, student_logit_source: str) -> VocabReport:
    """The report for two loaded tokenizers (``compare_vocab`` loads them)."""
    store_vocab, student_vocab = store_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    conflicts, store_only, student_only = _compare_ids(store_vocab, student_vocab)
    specials = () if same_files else _special_differences(store_tokenizer, student_tokenizer, store_vocab, student_vocab)
    # both sides holding tokens the other lacks is no prefix nor superset: the store-only tokens are the mismatch
    missing = [] if conflicts or not (store_only and student_only) else [
        IdMismatch(t, store_vocab[t], None, None) for t in store_only]
    mismatched = conflicts or missing
    if mismatched:
        kind = MISMATCHED
    elif store_only or student_only:
        kind = PREFIX if store_only else SUPERSET
    else:
        kind = SPECIAL_TOKENS_DIFFER if specials else IDENTICAL
    store_num_ids, student_num_ids = _num_ids(store_vocab), _num_ids(student_vocab)
    teacher = store.manifest.teacher.get("vocab_size")
    problem = _problem(kind, conflicts, missing, len(student_only), store_num_ids, student_logit_size,
                       student_logit_source)
    cautions = [f"the special tokens differ ({_show_specials(specials)}): the student learns the store's special ids "
                "from its sequences; use it with the store's tokenizer, or give its tokenizer the same special tokens"
                ] if specials else []
    if problem is None and isinstance(teacher, int) and student_logit_size < teacher:
        cautions.append(f"the teacher has {teacher:,} logits, the student {student_logit_size:,}: teacher ids "
                        f"{student_logit_size}..{teacher - 1} (padding rows, no token) must be dropped by the KD loss")
    return VocabReport(
        store=store.location, store_tokenizer=str(store.manifest.tokenizer.get("name")), student=student_name, kind=kind,
        compatible=problem is None, problem=problem, same_files=same_files, store_num_ids=store_num_ids,
        student_num_ids=student_num_ids, teacher_vocab_size=teacher if isinstance(teacher, int) else None,
        student_logit_size=student_logit_size, student_logit_source=student_logit_source,
        num_mismatched=len(mismatched), mismatched=tuple(mismatched[:NUM_EXAMPLES]), num_store_only=len(store_only),
        num_student_only=len(student_only), special_differences=specials, cautions=tuple(cautions))


def _compare_ids(store_vocab: dict[str, int], student_vocab: dict[str, int]) -> tuple[list[IdMismatch], list[str], list[str]]:
    """(store tokens whose id means something else to the student, by store id; store-only tokens; student-only tokens).

    A store token is mismatched when the student has it under another id, or lacks it while giving its id to
    another token; a store token the student lacks under an id the student never uses is store-only.
    """
    student_by_id = {i: t for t, i in student_vocab.items()}
    mismatched, store_only = [], []
    for token, store_id in sorted(store_vocab.items(), key=lambda item: item[1]):
        student_id = student_vocab.get(token)
        if student_id == store_id:
            continue
        if student_id is None and store_id not in student_by_id:
            store_only.append(token)
        else:
            mismatched.append(IdMismatch(token, store_id, student_id, student_by_id.get(store_id)))
    student_only = [t for t in student_vocab if t not in store_vocab]
    return mismatched, store_only, student_only


def _special_differences(store_tokenizer: Any, student_tokenizer: Any, store_vocab: dict[str, int],
                         student_vocab: dict[str, int]) -> tuple[SpecialDifference, ...]:
    """Role ids (bos, eos, pad, unk) that differ; then tokens both hold under one id that are added tokens, or
    special tokens, on one side only (tokens only one side has are counted as store-only / student-only), leaving
    out the tokens of the roles that differ: a changed eos makes both eos tokens change flags."""
    found = [SpecialDifference(role, _role_id(store_tokenizer, role), _role_id(student_tokenizer, role))
             for role in ROLES if _role_id(store_tokenizer, role) != _role_id(student_tokenizer, role)]
    role_ids = {i for d in found for i in (d.store, d.student)}
    shared = {t for t, i in store_vocab.items() if student_vocab.get(t) == i and i not in role_ids}
    for flag, store_set, student_set in (
            ("added", set(_added_vocab(store_tokenizer)), set(_added_vocab(student_tokenizer))),
            ("special", set(getattr(store_tokenizer, "all_special_tokens", ())),
             set(getattr(student_tokenizer, "all_special_tokens", ())))):
        for token in sorted((store_set ^ student_set) & shared, key=store_vocab.__getitem__):
            found.append(SpecialDifference(f"{flag} {token!r}", store_vocab[token] if token in store_set else None,
                                           student_vocab[token] if token in student_set else None))
    return tuple(found)


def _role_id(tokenizer: Any, role: str) -> int | None:
    value = getattr(tokenizer, f"{role}_token_id", None)
    return value if isinstance(value, int) else None


def _added_vocab(tokenizer: Any) -> dict[str, int]:
    return tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}


def _num_ids(vocab: dict[str, int]) -> int:
    return max(vocab.values(), default=-1) + 1


def _problem(kind: str, conflicts: list[IdMismatch], missing: list[IdMismatch], num_student_only: int,
             store_num_ids: int, logit_size: int, logit_source: str) -> str | None:
    """One line naming the kind of mismatch and its count, or None when the student is compatible."""
    if conflicts:
        count = len(conflicts)
        return (f"mismatched ids: {count:,} store token{'s have' if count != 1 else ' has'} another id, or none, in the "
                f"student's vocabulary (e.g. {_show_mismatch(conflicts[0])})")
    if missing:
        return (f"mismatched vocabularies: {len(missing):,} store tokens are missing from the student's, which has "
                f"{num_student_only:,} tokens the store lacks (e.g. {missing[0].token!r}, store id {missing[0].store_id})")
    if logit_size < store_num_ids:
        return (f"{kind}: the student's {logit_size:,} logits ({logit_source}) do not reach the store's ids "
                f"{logit_size}..{store_num_ids - 1}: {store_num_ids - logit_size:,} store ids uncovered")
    return None


# -- loading both sides -------------------------------------------------------------
def _student_folder(student: Any) -> Path | None:
    """The student's folder, checked to exist and hold tokenizer files; None for a tokenizer object."""
    if not isinstance(student, (str, os.PathLike)):
        if not hasattr(student, "get_vocab"):
            raise TokenizerError(f"the student {type(student).__name__} is not a tokenizer (it has no get_vocab())")
        return None
    from kdstore.teacher import TOKENIZER_FILES

    folder = Path(student).expanduser()
    if not folder.exists():
        raise TokenizerError(f"the student {student} does not exist: kdstore compares local folders only, it never "
                             "downloads", hint="pass a local tokenizer or model folder; fetch a hub model first with "
                                               "`hf download NAME --local-dir DIR`")
    if not folder.is_dir():
        raise TokenizerError(f"the student {student} is a file, not a tokenizer or model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TokenizerError(f"the student folder {student} holds no tokenizer files (none of "
                             f"{', '.join(TOKENIZER_FILES[:3])}, ...)")
    return folder


def _load_tokenizer(folder: Path, what: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise TokenizerError(f"cannot load {what}: {first_line(exc)}",
                             hint=f"check or save again the tokenizer files in {folder} (tokenizer.save_pretrained)") from None


@contextmanager
def _store_tokenizer_folder(store: Store) -> Iterator[Path]:
    """The store's tokenizer files in a local folder, checked against the manifest (Store.local_tokenizer)."""
    listed = store.manifest.tokenizer.get("files") or []
    if store.tokenizer_path is None and (store.is_local or not listed):
        raise TokenizerError(
            f"the store {store.location} has no tokenizer/ folder: its tokenizer was not saved with it",
            hint="rebuild it with `kdstore build`, which saves the teacher's tokenizer in STORE/tokenizer/; a store "
                 "written with ShardWriter needs tokenizer_dir= and manifest.tokenizer from kdstore.build.tokenizer_info")
    with store.local_tokenizer() as folder:
        yield folder


def _recorded_sha256(store: Store, folder: Path) -> str:
    recorded = store.manifest.tokenizer.get("files_sha256")
    return recorded if isinstance(recorded, str) else sha256_named_files(sorted(p for p in folder.iterdir() if p.is_file()))


def _student_sha256(tokenizer: Any, folder: Path | None, store_folder: Path) -> str | None:
    """sha256 of the student's files named like the store's tokenizer files (a folder student), or of what
    save_pretrained writes (a tokenizer object, as the build recorded the store's); None when it cannot be had.

    A folder is hashed as it is, not re-saved: a tokenizer loaded with local_files_only=True saves that
    flag into tokenizer_config.json, and its files would never hash like the build's."""
    if folder is not None:
        paths = [folder / p.name for p in sorted(store_folder.iterdir()) if p.is_file()]
        return sha256_named_files(paths) if all(p.is_file() for p in paths) else None
    if not hasattr(tokenizer, "save_pretrained"):
        return None
    from kdstore.build import tokenizer_info

    with tempfile.TemporaryDirectory(prefix="kdstore-tokenizer-") as scratch:
        tokenizer.save_pretrained(scratch)
        return tokenizer_info(tokenizer, Path(scratch))["files_sha256"]


def _student_logit_size(folder: Path | None, given: int | None, tokenizer: Any) -> tuple[int, str]:
    """The student's logit dimension and where it came from: given, the model's config.json, or the tokenizer."""
    if given is not None:
        return given, "student_vocab_size"
    config = folder / "config.json" if folder is not None else None
    if config is not None and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"the student's {config} is not valid JSON: {exc}",
                                 hint="restore the model's config.json") from None
        size = data.get("vocab_size") if isinstance(data, dict) else None
        if size is None and isinstance(data, dict):  # a multimodal config keeps the language model's under text_config
            size = (data.get("text_config") or {}).get("vocab_size")
        if isinstance(size, int) and size > 0:
            return size, "config.json vocab_size"
    return _num_ids(tokenizer.get_vocab()), "the tokenizer's ids; no config.json vocab_size"


# -- refusing an incompatible student (the datasets' student_tokenizer=) ------------
def require_compatible(report: VocabReport, allow_mismatch: bool = False, stacklevel: int = 1) -> None:
    """Raise TokenizerMismatchError for an incompatible student (warn instead when ``allow_mismatch``);
    warn with the cautions of a compatible one. ``stacklevel`` as warnings.warn's, counted from the caller."""
    if report.compatible:
        if report.cautions:
            warnings.warn(f"student tokenizer {report.student!r}: {'; '.join(report.cautions)}", stacklevel=stacklevel + 1)
        return
    message = (f"the store was made with tokenizer {report.store_tokenizer!r} and the student tokenizer {report.student!r} "
               f"does not fit it: {report.problem}")
    if not allow_mismatch:
        raise TokenizerMismatchError(message, hint="run `kdstore check STORE --student FOLDER` for the full report; train "
                                                   "the student with the store's tokenizer (STORE/tokenizer/), or pass "
                                                   "allow_tokenizer_mismatch=True")
    warnings.warn(f"{message}; going on because allow_tokenizer_mismatch=True", stacklevel=stacklevel + 1)
