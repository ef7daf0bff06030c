"""The student ``kdstore train`` distils into: where it comes from, and presets derived from the store's teacher.

    check_student_source("student.json")                 # TrainError at once if a local path is not there
    student = load_student("preset:quarter", store, seed=0)
    config = preset_config("quarter", teacher_config)   # a quarter-width, half-depth copy of a transformers config

A student is a transformers ``config.json`` (``from_config``, initialised from ``seed``), a folder holding only
a config, a model folder with weights (``from_pretrained``), a hub id, or ``preset:NAME``: a smaller copy of
the config of the teacher that built the store (``manifest["teacher"]["model"]``: a local folder, the
bundled teacher when the store's content hash says it was, or a hub id). Presets keep the teacher's
architecture, tokenizer and vocabulary, so any store fits its own teacher's presets.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from kdstore.errors import StudentMismatchError, TrainError, first_line
from kdstore.store import Store
from kdstore.teacher import TOKENIZER_FILES
from kdstore.vocab import compare_vocab, require_compatible

PRESET_PREFIX = "preset:"
# name -> (width fraction, depth fraction) of the teacher's config
PRESETS: dict[str, tuple[float, float]] = {
    "quarter": (0.25, 0.5),  # the bundled teacher (128 wide, 4 layers): 32 wide, 2 layers, 164k parameters
    "half": (0.5, 0.5),
}
_NEEDED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_STUDENT_HINT = "pass a transformers config.json, a model folder, a hub id like org/name, or preset:quarter"


def preset_name(source: str) -> str | None:
    """``"preset:quarter"`` -> ``"quarter"``; None for any other student. Unknown presets are refused."""
    if not source.startswith(PRESET_PREFIX):
        return None
    name = source[len(PRESET_PREFIX):]
    if name not in PRESETS:
        raise TrainError(f"unknown student preset {source!r}",
                         hint=f"presets: {', '.join(PRESET_PREFIX + n for n in PRESETS)}; or pass a config.json")
    return name


def check_student_source(source: str) -> None:
    """Refuse at once an unknown preset, or a student that looks like a local path and is not there, or that
    cannot be a hub id: transformers would take it for a hub id and retry the network for ~26 s before failing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if preset_name(source) is not None or Path(source).expanduser().exists():
        return
    try:
        validate_repo_id(source)  # "org/name" or "name": letters, digits, - _ . ; at most one "/"
        hub_id = True
    except HFValidationError:
        hub_id = False
    if not hub_id or source.endswith(".json") or source.startswith(("./", "../", "~")):
        raise TrainError(f"student {source} does not exist", hint=_STUDENT_HINT)


def load_student(source: str, store: Store, seed: int) -> torch.nn.Module:
    """A causal LM from a preset, a config file / folder (``from_config``) or a model folder (``from_pretrained``);
    the hub only for a ``source`` that is no local path (``check_student_source``).

    Its output layer must cover the store's vocabulary (more logits, a padded superset, are fine: the KD loss
    normalises over the student's own). A folder that ships tokenizer files must fit the store's tokenizer
    (``kdstore.vocab``, the report of ``kdstore check``); a student made from a config uses the store's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_student_source(source)
    local = Path(source).expanduser()
    preset = preset_name(source)
    torch.manual_seed(seed)  # the same initial weights on every rank and in every run with this seed
    try:
        if preset is not None:
            student = AutoModelForCausalLM.from_config(preset_config(preset, teacher_config(store)))
        elif local.is_dir() and (any(local.glob("*.safetensors")) or any(local.glob("*.bin"))):
            student = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
        else:
            student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local if local.exists() else source))
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load student {source!r}: {first_line(exc)}", hint=_STUDENT_HINT) from None
    num_logits, vocab_size = student.get_output_embeddings().weight.shape[0], store.codec.vocab_size
    if num_logits < vocab_size:
        raise StudentMismatchError(f"the store's vocabulary has {vocab_size} tokens but student {source} has "
                                   f"{num_logits} output logits")
    if preset is None and local.is_dir() and any((local / name).is_file() for name in TOKENIZER_FILES):
        require_compatible(compare_vocab(store, local, student_vocab_size=num_logits))
    return student.train()


# -- presets ------------------------------------------------------------------
def teacher_config(store: Store) -> Any:
    """The transformers config of the teacher that built ``store``, from where its manifest says it was."""
    from transformers import AutoConfig

    from kdstore.build import DEFAULT_TEACHER
    from kdstore.teacher import content_sha256

    record = store.manifest.teacher
    model, revision = str(record.get("model", "")), record.get("revision")
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file() and record.get("content_sha256") == content_sha256(Path(DEFAULT_TEACHER)):
        folder = Path(DEFAULT_TEACHER)  # a store of the bundled teacher, built where kdstore was installed elsewhere
    try:
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder)
        if model.startswith(("/", "./", "../", "~")):
            raise OSError(f"{model} does not exist here")
        return AutoConfig.from_pretrained(model, revision=revision)  # a hub id: the hub or its local cache
    except (OSError, ValueError) as exc:
        raise TrainError(f"a student preset copies the teacher's config, but the teacher {model} that built "
                         f"{store.location} cannot be read here: {first_line(exc)}",
                         hint="run where the teacher folder is, or pass --student a transformers config.json") from None


def preset_config(name: str, teacher: Any) -> Any:
    """A copy of the ``teacher`` config, ``PRESETS[name]`` as wide and deep: the same architecture, vocabulary,
    head width (``head_dim``) and ratio of query to key/value heads; at least one head and one layer."""
    width, depth = PRESETS[name]
    missing = [key for key in _NEEDED if not isinstance(getattr(teacher, key, None), int)]
    if missing:
        raise TrainError(f"preset:{name} scales {', '.join(_NEEDED)}, but the teacher's {teacher.model_type} config "
                         f"has no {', '.join(missing)}", hint="pass --student a transformers config.json")
    heads = teacher.num_attention_heads
    head_dim = getattr(teacher, "head_dim", None) or teacher.hidden_size // heads
    group = heads // (getattr(teacher, "num_key_value_heads", None) or heads)  # query heads per key/value head
    student = copy.deepcopy(teacher)
    student.num_attention_heads = max(1, round(teacher.hidden_size * width / head_dim))
    student.hidden_size = student.num_attention_heads * head_dim  # a whole number of heads
    student.intermediate_size = max(1, round(teacher.intermediate_size * width))
    student.num_hidden_layers = max(1, round(teacher.num_hidden_layers * depth))
    kv_heads = max(1, student.num_attention_heads // max(1, group))
    while student.num_attention_heads % kv_heads:
        kv_heads -= 1
    if hasattr(teacher, "num_key_value_heads"):
        student.num_key_value_heads = kv_heads
    if hasattr(teacher, "head_dim"):
        student.head_dim = head_dim
    if isinstance(getattr(teacher, "layer_types", None), list):  # per-layer kinds (sliding / full attention)
        student.layer_types = teacher.layer_types[:student.num_hidden_layers]
    return student


def describe_student(source: str, student: torch.nn.Module) -> str:
    """``student.json (140,000 parameters)``, or for a preset what it became:
    ``preset:quarter (llama: hidden size 32, 2 layers, 1 attention head; 164,000 parameters)``."""
    parameters = f"{sum(p.numel() for p in student.parameters()):,} parameters"
    if preset_name(source) is None:
        return f"{source} ({parameters})"
    config = student.config
    heads = config.num_attention_heads
    return (f"{source} ({config.model_type}: hidden size {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"{heads} attention head{'s' if heads > 1 else ''}; {parameters})")
