"""The teacher: load a `transformers` causal LM, run it, and sparsify its logits on the device.

Only what the store keeps leaves the device: per position K ids, K log-probs,
the tail mass, the target log-prob, and optionally sampled ids with counts.
The full-vocabulary logits are produced a chunk of positions at a time (the
decoder runs once, the output head per chunk), so a 128k vocabulary never
needs a [B, T, V] fp32 tensor.

Math (fp32 throughout, whatever the teacher's dtype):
    lse           = logsumexp(logits)                    one pass over V
    topk          = topk(logits) - lse                   one pass over V
    target        = logits[next token] - lse
    tail_logmass  = log(1 - sum(exp(topk)))              in float64 on the K values
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdstore.errors import TeacherError, first_line
from kdstore.format import sha256_named_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Position chunk for the output head: chunk * V fp32 logits stay near 256 MB.
HEAD_CHUNK_ELEMENTS = 1 << 26
# Config attributes that change logits after the output head; models that have
# them run the plain full forward instead of decoder + head.
_POST_HEAD_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


@dataclass
class Teacher:
    model: Any
    device: torch.device
    dtype_name: str
    source: str
    vocab_size: int  # the logit dimension
    max_positions: int | None
    trust_remote_code: bool = False  # whether the model's own Python code was allowed to run

    def info(self) -> dict[str, Any]:
        """The manifest's ``teacher`` record."""
        config = self.model.config
        return {
            "model": self.source,
            "revision": getattr(config, "_commit_hash", None),
            "content_sha256": content_sha256(Path(self.source)) if Path(self.source).is_dir() else None,
            "dtype": self.dtype_name,
            "vocab_size": self.vocab_size,
            "architecture": (config.architectures or [type(self.model).__name__])[0],
            "trust_remote_code": self.trust_remote_code,
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":  # under torchrun, rank r of a node takes GPU LOCAL_RANK
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK", "")
        return torch.device(f"cuda:{local_rank}" if local_rank.isdigit() else "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"--device {name} asked for CUDA, but torch sees no GPU", hint="use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TeacherError(f"--device {name!r} is not a device torch knows", hint="use cpu, cuda, cuda:N or auto") from None


def load_teacher(source: str, dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False) -> Teacher:
    """Load a causal LM with ``from_pretrained`` (a local folder or a hub id) in eval mode."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise TeacherError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    _check_source(source)
    torch_device = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except SafetensorError as exc:  # a truncated or damaged weights file
        raise TeacherError(f"cannot load teacher {source!r}: {_damaged_weights(Path(source))}{first_line(exc)}",
                           hint="download or save the teacher's weights again") from None
    except (OSError, ValueError) as exc:
        raise TeacherError(f"cannot load teacher {source!r}: {first_line(exc)}") from None
    model.to(torch_device).eval()
    vocab_size = model.get_output_embeddings().weight.shape[0]
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[DTYPES[dtype]]
    return Teacher(model, torch_device, name, str(source), vocab_size, max_positions, trust_remote_code)


# Files `transformers` builds a tokenizer from; a teacher folder without any of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any:
    """The teacher's tokenizer (``AutoTokenizer.from_pretrained``); TeacherError when it has none or it fails to load."""
    from transformers import AutoTokenizer

    _check_source(source)
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TeacherError(f"teacher folder {source} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:3])}, ...)",
                           hint="save the tokenizer beside the model: tokenizer.save_pretrained(folder)")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise TeacherError(f"cannot load the tokenizer of teacher {source!r}: {first_line(exc)}",
                           hint="check the tokenizer files in the teacher folder (tokenizer.json, tokenizer_config.json)"
                           ) from None


def _check_source(source: str) -> None:
    """A path that does not exist is reported as such; transformers would take it for a hub id and name id rules."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherError(f"teacher {source} is a file; --teacher takes a model folder or a hub id",
                               hint="pass the folder holding config.json and the weights")
        return
    looks_like_path = source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or source.endswith("/")
    if looks_like_path:
        raise TeacherError(f"teacher folder {source} does not exist",
                           hint="check the path (a hub id looks like org/name, without ./ or /)")


def _damaged_weights(folder: Path) -> str:
    """'<file> is truncated or damaged: ' for the first weights file of ``folder`` safetensors cannot open, else ''."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError):
            return f"{path.name} is truncated or damaged: "
    return ""


def content_sha256(folder: Path) -> str:
    """sha256 over the config and weight files of a model folder, in name order."""
    patterns = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json")
    return sha256_named_files(sorted({p for pattern in patterns for p in folder.glob(pattern)}))


@torch.inference_mode()
def teacher_logits_chunks(teacher: Teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          lengths: Sequence[int] | None = None):
    """Yield (row index tensor, position index tensor, fp32 logits [N, V]) over the real positions, row after row.

    input_ids, attention_mask: [B, T] on the teacher's device, right-padded.
    Only positions 0..len-2 of each row are yielded (each predicts a next token).
    ``lengths``: the rows' lengths as the host knows them; the positions are then indexed on the host, which
    spares the device a ``nonzero`` that would make the host wait for the previous batch to finish.
    """
    model = teacher.model
    rows, positions = predicted_positions(attention_mask, lengths)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // teacher.vocab_size)
    if any(getattr(model.config, a, None) for a in _POST_HEAD_ATTRIBUTES) or not hasattr(model, "get_decoder"):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        for start in range(0, len(rows), chunk):
            r, p = rows[start:start + chunk], positions[start:start + chunk]
            yield r, p, logits[r, p].float()
        return
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    for start in range(0, len(rows), chunk):
        r, p = rows[start:start + chunk], positions[start:start + chunk]
        yield r, p, head(hidden[r, p]).float()


def predicted_positions(attention_mask: torch.Tensor, lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N], positions [N]) of every position that predicts a next token (0..len-2 of each row), row-major,
    on the mask's device. From ``lengths`` (host) when given: no device synchronisation."""
    if lengths is None:
        predicting = attention_mask.clone()
        counts = attention_mask.sum(dim=1)
        predicting[torch.arange(len(counts), device=counts.device), counts - 1] = 0
        return predicting.nonzero(as_tuple=True)
    per_row = torch.as_tensor(lengths, dtype=torch.long) - 1
    rows = torch.repeat_interleave(torch.arange(len(per_row)), per_row)
    starts = torch.cumsum(per_row, 0) - per_row
    positions = torch.arange(len(rows)) - torch.repeat_interleave(starts, per_row)
    return to_device(rows, attention_mask.device), to_device(positions, attention_mask.device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: on CUDA through pinned memory without blocking the host; as is on the CPU."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def sparsify(logits: torch.Tensor, targets: torch.Tensor, k: int, overwrite: bool = False) -> dict[str, torch.Tensor]:
    """fp32 logits [N, V], next-token ids [N] -> top-K ids/log-probs [N, K], tail [N], target [N] (on device).

    ``overwrite=True`` lets the log-sum-exp work in the logits' own memory (they hold exp(logit - max)
    afterwards): torch.logsumexp allocates an [N, V] temporary, and with V = 128k on a CPU that costs as
    much again as the arithmetic (111 vs 55 ms for 512 positions).
    """
    values, ids = torch.topk(logits, k, dim=-1, sorted=False)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    row_max = values.amax(dim=-1, keepdim=True)  # the top-1 logit: the row's max
    scratch = logits if overwrite else logits.clone()
    lse = (row_max + scratch.sub_(row_max).exp_().sum(dim=-1, keepdim=True).log()).squeeze(1)
    topk_logprobs = values - lse[:, None]
    target = target_logit - lse
    head_mass = torch.logsumexp(topk_logprobs.double(), dim=-1)
    tail = torch.log(-torch.expm1(head_mass.clamp(max=0.0)))  # log(1 - sum p); -inf when K = V
    return {"topk_ids": ids, "topk_logprobs": topk_logprobs, "tail_logmass": tail.float(),
            "target_logprob": target, "lse": lse}


def sample_sparse(logits: torch.Tensor, topk_ids: torch.Tensor, uniforms: torch.Tensor,
                  mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ids by inverse CDF from the teacher (mode "full") or from its tail beyond the top-K (mode "tail").

    logits [N, V] fp32, topk_ids [N, K], uniforms [N, D] in [0, 1) -> distinct ids [N, D]
    padded with -1, and their counts [N, D]. The caller derives the uniforms from
    (seed, sequence id, position), so draws do not depend on how sequences were batched.
    """
    weights = torch.softmax(logits.double(), dim=-1)
    if mode == "tail":
        weights = weights.scatter(1, topk_ids, 0.0)
    cdf = weights.cumsum_(dim=-1)
    total = cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniforms.double() * total).clamp_(max=cdf.shape[1] - 1)
    drawn, _ = drawn.sort(dim=1)
    new_run = torch.ones_like(drawn, dtype=torch.bool)
    new_run[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new_run.long().cumsum(dim=1) - 1
    ids = torch.full_like(drawn, -1).scatter(1, slot, drawn)
    counts = torch.zeros_like(drawn).scatter_add(1, slot, torch.ones_like(drawn))
    return ids, counts


_COPY_STREAMS: dict[torch.device, Any] = {}


class HostCopy:
    """Sparse results on their way to the host; ``wait()`` returns them as numpy arrays.

    On CUDA the copy runs on a side stream into pinned memory (non_blocking), ordered after the work that made
    the tensors, so the next forward is queued at once and overlaps the copy; only the thread that calls
    ``wait`` (the encoder) blocks, on the copy's event. On the CPU the tensors are already host memory: ``wait``
    returns views of them.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._event: Any = None
        device = next(iter(tensors.values())).device
        if device.type != "cuda":
            self._host = {name: t.cpu() for name, t in tensors.items()}
            return
        if device not in _COPY_STREAMS:
            _COPY_STREAMS[device] = torch.cuda.Stream(device)
        stream = _COPY_STREAMS[device]
        stream.wait_stream(torch.cuda.current_stream(device))
        self._host = {}
        with torch.cuda.stream(stream):
            for name, tensor in tensors.items():
                self._host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                self._host[name].copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)  # its memory is not reused before the copy is done
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def wait(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return {name: t.numpy() for name, t in self._host.items()}
