"""The training checkpoint and the exported student: what ``kdstore train`` leaves in RUN_DIR.

    save_checkpoint(run_dir, {"config": config.flat(), **asdict(run)}, trainables, rank)
    saved = read_checkpoint(run_dir)                             # TrainError if missing, old, damaged or crafted
    differ = config_differences(saved["config"], config.flat(), may_change=("out", "device", "log_every"))
    run = restore_checkpoint(saved, rank, trainables)           # RunState: step, epoch, batches_in_epoch, history
    export_student(student, store.tokenizer_path, run_dir / STUDENT_DIR)

RUN_DIR/checkpoint/ holds no pickle, so reading one runs no code from it. ``tensors.safetensors`` holds every
tensor (weights, optimizer moments, torch's RNG state); ``state.json`` holds everything else, each tensor
replaced by ``{"__tensor__": "<its name in tensors.safetensors>"}`` and the two shapes JSON lacks tagged:
``{"__tuple__": [...]}`` and ``{"__items__": [[key, value], ...]}`` (a dict whose keys are not all strings,
like the optimizer's per-parameter state). Its keys: ``format`` (CHECKPOINT_FORMAT), ``config`` (the flat
resolved config), ``step``, ``epoch``, ``batches_in_epoch``, ``history``, ``world_size``, ``model``,
``optimizer``, ``scheduler``, ``taid`` (null unless the loss is TAID) and ``ranks``: one ``{"loader", "rng"}``
per rank, gathered from every rank, since each has its own loader position and RNG streams. The loader's
state is torchdata's nested dicts of ints, strings and lists; torchdata's own RandomSampler would put its
generator state there as a uint8 tensor, which goes to the safetensors file like any other. The numpy and
Python RNG states are JSON lists of ints.

Rank 0 writes the folder under a name of its own, fsyncs it and renames it into place; the previous
checkpoint is renamed to ``checkpoint.previous`` just before and deleted just after, and read when a crash
fell between the two renames, so a whole checkpoint is always there. Reading checks every value against
what this run's own objects hold (keys, types, tensor dtypes and shapes) before anything is loaded, and an
old pickle checkpoint (``checkpoint.pt``) is refused unread: all as one-line ``TrainError``s. Which config
differences refuse a resume is the caller's (``kdstore.train``) decision.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdstore.config_file import check_config
from kdstore.errors import TrainError, first_line
from kdstore.taid import TaidState
from kdstore.writer import _fsync_dir

CHECKPOINT_NAME = "checkpoint"  # RUN_DIR/checkpoint/{state.json, tensors.safetensors}
CHECKPOINT_FORMAT = "kdstore-checkpoint/1"
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # the torch.save pickle of kdstore before CHECKPOINT_FORMAT: never read
STUDENT_DIR = "student"
_PREVIOUS = "checkpoint.previous"  # the last checkpoint while the next one is renamed into place
_STATE, _TENSORS = "state.json", "tensors.safetensors"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_DAMAGED = "the checkpoint is damaged or was not written by kdstore; start a new run with another --out"


@dataclass
class RunState:
    """Where the run is, besides the weights: saved in the checkpoint next to them."""

    step: Annotated[int, Field(ge=0)] = 0
    epoch: Annotated[int, Field(ge=0)] = 0  # the epoch of the next batch
    batches_in_epoch: Annotated[int, Field(ge=0)] = 0  # this rank's batches of ``epoch`` consumed
    history: list[dict[str, Any]] = field(default_factory=list)

    def advance_batch(self, num_batches: int) -> None:
        self.batches_in_epoch += 1
        if self.batches_in_epoch == num_batches:  # the loader's state now says "epoch done": the next one starts
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0


@dataclass
class Trainables:
    """The stateful objects a checkpoint saves and restores (``optimizer``, ``scheduler``, ``loader``: torch's)."""

    student: torch.nn.Module  # the bare module, not its DDP wrapper, so the keys carry no "module." prefix
    optimizer: Any
    scheduler: Any
    loader: Any  # a kdstore DataLoader: its state_dict is this rank's position in the epoch
    taid: TaidState | None = None


@dataclass(frozen=True)
class _Header:
    """state.json's fields besides RunState's and the trainables' states, as a reader accepts them."""

    config: dict[str, str | int | float | bool | None]
    world_size: Annotated[int, Field(ge=1)]
    ranks: list[dict[str, Any]]


def capture_rng_state() -> dict[str, Any]:
    """This process's torch and CUDA (when present) RNG states as uint8 tensors, numpy's and Python's as lists."""
    kind, key, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, key.tolist(), int(position), int(has_gauss), float(gauss)],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo ``capture_rng_state``; a checkpoint written on CUDA restores on CPU without its CUDA state."""
    torch.set_rng_state(state["torch"])
    kind, key, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing ----------------------------------------------------------------
def save_checkpoint(run_dir: Path, run: dict[str, Any], trainables: Trainables, rank: int) -> None:
    """Write RUN_DIR/checkpoint/ as a whole (see the module docstring). Every rank calls it; rank 0 writes.

    ``run``: ``config`` (the flat resolved config) and the RunState fields, stored as given.
    """
    ranks = [{"loader": trainables.loader.state_dict(), "rng": capture_rng_state()}]
    if dist.is_initialized():
        mine, ranks = ranks[0], [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if rank != 0:
        return
    taid = trainables.taid
    state = {"format": CHECKPOINT_FORMAT, **run, "world_size": len(ranks), "model": trainables.student.state_dict(),
             "optimizer": trainables.optimizer.state_dict(), "scheduler": trainables.scheduler.state_dict(),
             "taid": taid.state_dict() if taid is not None else None, "ranks": ranks}
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _to_json(state, "", tensors)
    for stale in run_dir.glob(f"{CHECKPOINT_NAME}.tmp-*"):  # left by a save that crashed: never renamed, never read
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f"{CHECKPOINT_NAME}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        save_file(_unshared(tensors), tmp / _TENSORS)
        (tmp / _STATE).write_text(json.dumps(skeleton), encoding="utf-8")
        for name in (_TENSORS, _STATE):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        _swap_into_place(run_dir, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(run_dir: Path, tmp: Path) -> None:
    """checkpoint -> checkpoint.previous, tmp -> checkpoint, then drop the previous one."""
    current, previous = run_dir / CHECKPOINT_NAME, run_dir / _PREVIOUS
    if current.is_dir():  # else a crash between the renames left the last good one as previous: keep it
        shutil.rmtree(previous, ignore_errors=True)
        current.rename(previous)
    tmp.rename(current)
    _fsync_dir(run_dir)
    shutil.rmtree(previous, ignore_errors=True)


def _to_json(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, each tensor moved into ``tensors`` under its path (``model/lm_head.weight``)."""
    if isinstance(value, torch.Tensor):
        if name in tensors:  # a key holding "/" would make two paths one
            raise ValueError(f"two tensors would both be stored as {name!r}")
        tensors[name] = value
        return {_TENSOR: name}
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in (_TENSOR, _TUPLE, _ITEMS)):
            return {k: _to_json(v, f"{name}/{k}".lstrip("/"), tensors) for k, v in value.items()}
        if not all(_hashable(k) for k in value):
            raise TypeError(f"{name}: dict keys must be None, bool, int, float or str in a checkpoint")
        return {_ITEMS: [[k, _to_json(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{name}: a {type(value).__name__} has no place in a checkpoint")  # a bug, not a user mistake


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage: safetensors refuses tied weights that share one."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return out


# -- reading ----------------------------------------------------------------
def has_checkpoint(run_dir: Path) -> bool:
    """Whether RUN_DIR holds a checkpoint of any format (an old pickle one included)."""
    return (run_dir / LEGACY_CHECKPOINT_NAME).exists() or _checkpoint_dir(run_dir) is not None


def _checkpoint_dir(run_dir: Path) -> Path | None:
    for name in (CHECKPOINT_NAME, _PREVIOUS):  # previous: a save stopped between its two renames
        if (run_dir / name).is_dir():
            return run_dir / name
    return None


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Everything ``save_checkpoint`` wrote, tensors on the CPU; ``TrainError`` for anything else."""
    legacy = run_dir / LEGACY_CHECKPOINT_NAME
    if legacy.exists():
        raise TrainError(f"{legacy} is an old, unsafe checkpoint format (a pickle, which can run any code when "
                         "loaded) and is not read", hint="start a new run with another --out; kdstore now writes "
                         f"RUN_DIR/{CHECKPOINT_NAME}/ as JSON and safetensors")
    folder = _checkpoint_dir(run_dir)
    if folder is None:
        raise TrainError(f"nothing to resume: {run_dir / CHECKPOINT_NAME} does not exist", hint="drop --resume to start the run")
    try:
        skeleton = json.loads((folder / _STATE).read_text(encoding="utf-8"))
        saved = _from_json(skeleton, load_file(folder / _TENSORS))
    except (OSError, ValueError, RecursionError, SafetensorError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise TrainError(f"{folder} is not a checkpoint kdstore can read: {first_line(exc)}",
                         hint=_DAMAGED) from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise TrainError(f"{folder / _STATE} is not a {CHECKPOINT_FORMAT} checkpoint (format {found!r})", hint=_DAMAGED)
    missing = [f.name for f in (*fields(RunState), *fields(_Header))] + ["model", "optimizer", "scheduler", "taid"]
    missing = [name for name in missing if name not in saved]
    if missing:
        raise TrainError(f"{folder / _STATE} lacks {', '.join(missing)}", hint=_DAMAGED)
    what = f"{folder / _STATE} holds bad values"
    check_config(RunState, {f.name: saved[f.name] for f in fields(RunState)}, TrainError, what=what)
    check_config(_Header, {f.name: saved[f.name] for f in fields(_Header)}, TrainError, what=what)
    if len(saved["ranks"]) != saved["world_size"]:
        raise TrainError(f"{folder / _STATE} has world_size {saved['world_size']} but {len(saved['ranks'])} rank states",
                         hint=_DAMAGED)
    return saved


def _from_json(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Undo ``_to_json``: tagged objects back to tensors, tuples and dicts; ValueError naming a bad tag."""
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tag = next(iter(value)) if len(value) == 1 else None
    if tag == _TENSOR:
        if not (isinstance(value[tag], str) and value[tag] in tensors):
            raise ValueError(f"state.json names a tensor {value[tag]!r} that {_TENSORS} does not hold")
        return tensors[value[tag]]
    if tag == _TUPLE and isinstance(value[tag], list):
        return tuple(_from_json(v, tensors) for v in value[tag])
    if tag == _ITEMS:
        items = value[tag]
        if not (isinstance(items, list) and all(isinstance(i, list) and len(i) == 2 and _hashable(i[0]) for i in items)):
            raise ValueError(f"state.json has a malformed {_ITEMS} entry")
        return {key: _from_json(v, tensors) for key, v in items}
    return {k: _from_json(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> bool:
    return key is None or isinstance(key, (bool, int, float, str))


def config_differences(saved: dict[str, Any], now: dict[str, Any], may_change: tuple[str, ...]) -> list[str]:
    """One line per flat config field outside ``may_change`` whose value differs, naming both values."""
    return [f"{k} = {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(set(now) | set(saved)) if k not in may_change and saved.get(k) != now.get(k)]


def restore_checkpoint(saved: dict[str, Any], rank: int, trainables: Trainables) -> RunState:
    """Load ``saved`` into ``trainables`` and this rank's loader and RNG; returns where the run was.

    Every state is first compared with this run's own (``_differences``), so a checkpoint that does not fit
    is refused before anything is loaded, naming the first differences with both sides.
    """
    mine, optimizer, taid = saved["ranks"][rank], trainables.optimizer, trainables.taid
    rng = capture_rng_state()
    found_rng = mine.get("rng") if isinstance(mine, dict) else None
    if isinstance(found_rng, dict) and ("cuda" in found_rng) != ("cuda" in rng):  # restored only where both have CUDA
        found_rng = {k: v for k, v in found_rng.items() if k != "cuda"}
        rng.pop("cuda", None)
    templates = {"model": trainables.student.state_dict(), "optimizer": {**optimizer.state_dict(), "state": None},
                 "scheduler": trainables.scheduler.state_dict(), "taid": taid.state_dict() if taid is not None else None,
                 "loader": trainables.loader.state_dict(), "rng": rng}
    found = {**{key: saved[key] for key in ("model", "optimizer", "scheduler", "taid")}, "rng": found_rng,
             "loader": mine.get("loader") if isinstance(mine, dict) else None}
    problems = [line for key in templates for line in _differences(found[key], templates[key], key)]
    if isinstance(saved["optimizer"], dict):
        problems += _optimizer_state_differences(saved["optimizer"].get("state"), optimizer)
    if problems:
        raise TrainError(f"the checkpoint does not fit this run: {'; '.join(problems[:4])}"
                         f"{f'; and {len(problems) - 4} more' if len(problems) > 4 else ''}", hint=_DAMAGED)
    try:
        trainables.student.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        trainables.scheduler.load_state_dict(saved["scheduler"])
        if taid is not None:
            taid.load_state_dict(saved["taid"])
        trainables.loader.load_state_dict(mine["loader"])
        restore_rng_state(mine["rng"])
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError) as exc:  # right shape, bad values
        raise TrainError(f"the checkpoint does not fit this run: {first_line(exc)}", hint=_DAMAGED) from None
    return RunState(**{f.name: saved[f.name] for f in fields(RunState)})


def _differences(saved: Any, template: Any, where: str) -> list[str]:
    """Where ``saved`` is not shaped like ``template``, this run's own state: keys, types, tensor dtypes and shapes.

    None in the template (a state this run has not filled yet, like TAID's first loss) accepts anything:
    the object's own ``load_state_dict`` checks it.
    """
    if template is None:
        return []
    if isinstance(template, dict) and isinstance(saved, dict):
        if saved.keys() != template.keys():
            return [f"{where}: keys {_names(saved.keys() - template.keys())} in the checkpoint only, "
                    f"{_names(template.keys() - saved.keys())} in this run only"]
        return [line for key in template for line in _differences(saved[key], template[key], f"{where}/{key}")]
    if isinstance(template, (list, tuple)) and type(saved) is type(template) and len(saved) == len(template):
        return [line for i, (s, t) in enumerate(zip(saved, template)) for line in _differences(s, t, f"{where}/{i}")]
    if isinstance(template, torch.Tensor):
        same = isinstance(saved, torch.Tensor) and (saved.dtype, saved.shape) == (template.dtype, template.shape)
    else:
        same = type(saved) is type(template) and not isinstance(template, (dict, list, tuple))
    return [] if same else [f"{where}: {_describe(saved)} in the checkpoint, {_describe(template, value_too=False)} now"]


def _optimizer_state_differences(state: Any, optimizer: Any) -> list[str]:
    """The optimizer's per-parameter state: each entry a float tensor shaped like its parameter, or a scalar (step)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict numbers them in this order
    if not isinstance(state, dict):
        return [f"optimizer/state: {_describe(state)} in the checkpoint, a dict now"]
    lines = []
    for index, entry in state.items():
        if not (type(index) is int and 0 <= index < len(params) and isinstance(entry, dict)):
            lines.append(f"optimizer/state/{index}: {_describe(entry)} in the checkpoint, parameters 0 to {len(params) - 1} now")
            continue
        for name, value in entry.items():
            shape = params[index].shape
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape in (shape, ())):
                lines.append(f"optimizer/state/{index}/{name}: {_describe(value)} in the checkpoint, "
                             f"a float tensor {list(shape)} (or a scalar) now")
    return lines


def _describe(value: Any, value_too: bool = True) -> str:
    """A tensor's dtype and shape, a container's type and length, a scalar's type (and value, cut at 40 characters)."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}" if value_too else type(value).__name__


def _names(keys: Any) -> str:
    return ", ".join(sorted(map(str, keys))) or "none"


def describe_checkpoint(run_dir: Path) -> str:
    """RUN_DIR's checkpoint and its step, for messages."""
    folder = _checkpoint_dir(run_dir)
    if folder is None:
        return "none (no checkpoint was written yet)"
    try:
        step = json.loads((folder / _STATE).read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder} (unreadable)"
    return f"{folder} (step {step})"


def export_student(student: torch.nn.Module, tokenizer_dir: Path | None, folder: Path) -> None:
    """``save_pretrained`` plus the store's tokenizer into ``folder``, replacing it only once complete."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    for path in tokenizer_dir.iterdir() if tokenizer_dir else ():
        shutil.copy2(path, tmp / path.name)
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
