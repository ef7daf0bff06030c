"""Human-readable views of a store (``kdstore head``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from kdstore.errors import KdstoreError
from kdstore.store import Store, open_store


def load_store_tokenizer(store: Store) -> Any | None:
    """The tokenizer saved in the store, or None when it has none."""
    if store.tokenizer_path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(store.tokenizer_path, local_files_only=True)


def format_head(path: str | os.PathLike[str], num_positions: int, top: int, sequence_id: str | None = None,
                storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """Lines showing ``num_positions`` positions of one sequence: next token, its p, top alternatives."""
    for flag, value in (("-n", num_positions), ("--top", top)):
        if value < 1:  # checked before the store is opened: a remote one costs a round trip
            raise KdstoreError(f"{flag} {value}: expected 1 or more", hint=f"pass {flag} 1 or more")
    store = open_store(path, storage_options)
    sequence = next((s for s in store.iter_sequences() if sequence_id in (None, s["sequence_id"])), None)
    if sequence is None:
        raise KdstoreError(f"no sequence {sequence_id!r} in {path}" if sequence_id else f"{path} holds no sequences",
                           hint="omit --sequence to show the first sequence" if sequence_id else "")
    tokenizer = load_store_tokenizer(store)
    show = (lambda i: repr(tokenizer.decode([int(i)]))) if tokenizer else (lambda i: f"#{int(i)}")
    yield f"sequence {sequence['sequence_id']}: {len(sequence['input_ids'])} tokens"
    tokens, ids, values = sequence["input_ids"], sequence["topk_ids"], sequence["topk_logprobs"]
    for t in range(min(num_positions, len(ids))):
        order = np.argsort(-values[t])[:top]
        alternatives = "  ".join(f"{show(ids[t, j])} {np.exp(values[t, j]):.3f}" for j in order)
        target = f" p={np.exp(sequence['target_logprob'][t]):.3f}" if "target_logprob" in sequence else ""
        tail = f" | tail {np.exp(sequence['tail_logmass'][t]):.3f}" if "tail_logmass" in sequence else ""
        yield f"{t:>5} {show(tokens[t])} -> {show(tokens[t + 1])}{target} | {alternatives}{tail}"
