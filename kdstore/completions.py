"""Training on a generations store: completions served as training sequences, with filters.

    rows = select_completions(store, CompletionFilter(only_correct=True, best_of=2))
    dataset = CompletionDataset(store, rows)          # dataset[i]: a sample kdstore.collate takes
    collate = CompletionCollator(Collator(store.codec))
    batch = collate([dataset[i] for i in range(8)])   # labels -100 on the prompt: loss on the completion only

A completion's sample is its whole sequence, prompt then completion (``input_ids`` [T]), with per-position
columns for its T - 1 positions: the stored teacher top-K / tail / target on the completion positions
(P - 1 .. T - 2, each predicting a completion token) and a filler on the prompt positions. The collator turns
the filler positions into ignored labels (-100), so the KD term (stored top-K) and the CE term (the sampled
tokens) both count completion tokens only, as SFT trainers mask a prompt or a chat template's user turns.

Filters, applied in this order: ``only_correct`` (``correct`` is true), ``only_majority``
(``agrees_with_majority`` is true), ``where`` (an SQL condition over the completion columns, checked word by
word as ``kdstore head --where`` checks it, then evaluated by polars), then ``best_of`` N: the N completions of
each prompt with the highest ``total_logprob`` (ties: the lower sample index).

Rows are read through ``Store.open_shard`` / ``read_row_group`` (checked row groups); the selected rows' stored
columns stay in memory (about 100 bytes a token at K = 32), which suits generation stores of up to a few
million tokens per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdstore.collate import IGNORE_INDEX, Collator
from kdstore.errors import KdstoreError, first_line
from kdstore.store import Store, StoredRows

# per-completion columns a filter may name (num_tokens: prompt and completion; num_completion_tokens: completion)
FILTER_COLUMNS = ("sequence_id", "prompt_id", "sample_index", "correct", "agrees_with_majority", "vote_share",
                  "total_logprob", "finish_reason", "answer", "reference_answer", "majority_answer", "seed",
                  "prompt_num_tokens", "num_tokens", "num_completion_tokens")
_STORED = ("sequence_id", "input_ids", "prompt_num_tokens", "topk_id_deltas", "topk_logprob_codes",
           "tail_logmass_codes", "target_logprob_codes")


@dataclass(frozen=True)
class CompletionFilter:
    only_correct: bool = False
    only_majority: bool = False
    best_of: int = 0  # 0: every completion that passes the other filters
    where: str = ""  # SQL over FILTER_COLUMNS, e.g. "finish_reason = 'stop' AND vote_share >= 0.5"

    def is_set(self) -> bool:
        return self.only_correct or self.only_majority or self.best_of > 0 or bool(self.where)


def _row_groups(store: Store, columns: list[str]) -> Any:
    for shard in store.manifest.shards:
        parquet = store.open_shard(shard)
        for group in range(parquet.num_row_groups):
            yield store.read_row_group(parquet, shard, group, columns)


def completion_frame(store: Store) -> Any:
    """One polars row per completion of ``store`` (store order): the FILTER_COLUMNS."""
    import polars as pl

    stored = [c for c in FILTER_COLUMNS if c not in ("num_tokens", "num_completion_tokens")]
    frames = []
    for table in _row_groups(store, [*stored, "input_ids"]):
        lengths = pc.list_value_length(table["input_ids"]).cast(pa.int64())
        table = table.drop_columns(["input_ids"]).append_column("num_tokens", lengths)
        frames.append(pl.from_arrow(table).with_columns(
            (pl.col("num_tokens") - pl.col("prompt_num_tokens")).alias("num_completion_tokens")))
    return pl.concat(frames) if frames else pl.DataFrame()


def select_completions(store: Store, selection: CompletionFilter) -> np.ndarray:
    """Store-order row indices of the completions that pass ``selection`` (module docstring)."""
    import polars as pl

    from kdstore.inspect import parse_where

    if store.manifest.table != "generations":
        raise KdstoreError(f"{store.location} is a {store.manifest.table!r} store; completion filters read generations "
                           "stores", hint="drop only_correct / only_majority / best_of / completion_where")
    frame = completion_frame(store).with_row_index("row")
    if selection.only_correct:
        frame = frame.filter(pl.col("correct").fill_null(False))
    if selection.only_majority:
        frame = frame.filter(pl.col("agrees_with_majority").fill_null(False))
    if selection.where:
        condition = parse_where(selection.where, FILTER_COLUMNS)
        try:
            frame = frame.filter(condition)
        except pl.exceptions.PolarsError as exc:
            raise KdstoreError(f"completion_where {selection.where!r} cannot be evaluated: {first_line(exc)}",
                               hint=f"an SQL condition over {', '.join(FILTER_COLUMNS)}") from None
    if selection.best_of:
        frame = frame.sort(["prompt_id", "total_logprob", "sample_index"], descending=[False, True, False]) \
            .group_by("prompt_id", maintain_order=True).head(selection.best_of)
    return np.sort(frame.get_column("row").to_numpy().astype(np.int64))


class CompletionDataset:
    """Map-style dataset over completions ``rows`` (store-order indices) of a generations store.

    ``dataset[i]`` is a collator sample (module docstring) with ``loss_start`` = P - 1, the first position whose
    label counts; ``group_sizes`` makes each completion its own shuffle group, as ``kdstore.loader.Sequences``.
    """

    def __init__(self, store: Store, rows: np.ndarray | None = None) -> None:
        self.store, codec = store, store.codec
        wanted = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._groups: list[tuple[StoredRows, np.ndarray, np.ndarray]] = []  # rows, prompt lengths, store indices
        first = 0
        for table in _row_groups(store, list(_STORED)):
            indices = np.arange(first, first + table.num_rows)
            first += table.num_rows
            keep = indices if wanted is None else indices[np.isin(indices, wanted)]
            if len(keep):
                taken = table.take(pa.array(keep - indices[0]))
                self._groups.append((StoredRows(codec, taken), taken["prompt_num_tokens"].to_numpy(), keep))
        self._starts = np.cumsum([0] + [len(g[2]) for g in self._groups])
        self.group_sizes = [1] * int(self._starts[-1])
        floor = np.asarray(codec.codebook.encode(np.array([codec.codebook.floor_logprob - 1.0])))[0]
        # filler of a prompt position: ids 0..K-1 (deltas 0, 1, 1, ...), the floor code, all mass in the tail
        self._filler = {"topk_id_deltas": np.minimum(np.arange(codec.k), 1).astype(np.uint32),
                        "topk_logprob_codes": floor, "tail_logmass_codes": 0, "target_logprob_codes": floor}
        self._code_dtype = codec.codebook.dtype

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"completion index {index} is outside 0..{len(self) - 1}")
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        rows, prompt_lengths, store_rows = self._groups[group]
        row = index - int(self._starts[group])
        sample = rows.sample(row)
        prompt_positions = int(prompt_lengths[row]) - 1
        for name, fill in self._filler.items():
            stored = sample[name]
            shape = (prompt_positions, *stored.shape[1:])
            filler = np.broadcast_to(np.asarray(fill, dtype=stored.dtype), shape)
            sample[name] = np.concatenate([filler, stored])
        sample["index"], sample["loss_start"] = int(store_rows[row]), prompt_positions
        return sample


class CompletionCollator:
    """``Collator`` plus the prompt mask: labels before each sample's ``loss_start`` become -100."""

    def __init__(self, collate: Collator) -> None:
        self.collate = collate
        self.logprob_table = collate.logprob_table

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(samples)
        for b, sample in enumerate(samples):
            batch["labels"][b, :sample["loss_start"]] = IGNORE_INDEX
        return batch


def open_completion_data(config: Any, storage_options: dict[str, Any] | None = None) -> Any:
    """``kdstore train`` on a generations store: the filtered completions, split by prompt so that no prompt has
    completions on both sides. Validation: ``val_fraction`` of the (filtered) prompts by id hash, or the prompts of
    lowest id hash until ``val_sequences`` completions, or every completion of a generations ``val_store``."""
    from kdstore.errors import TrainError
    from kdstore.store import open_store
    from kdstore.train import Data, held_out, id_hash

    if config.loss.name == "sampled_kl":
        raise TrainError("loss sampled_kl needs sampled draws; training on completions uses their stored top-K",
                         hint="pick another loss, e.g. forward_kl")
    selection = CompletionFilter(config.only_correct, config.only_majority, config.best_of, config.completion_where)
    store = open_store(config.store, storage_options, tables=("generations",))
    rows = select_completions(store, selection)
    if not len(rows):
        raise TrainError(f"no completion of {config.store} passes the completion filters",
                         hint="loosen only_correct / only_majority / best_of / completion_where (`kdstore info` "
                              "shows the accuracy)")
    dataset = CompletionDataset(store, rows)
    collate = CompletionCollator(Collator(store.codec))
    if config.val_store:
        val_store = open_store(config.val_store, storage_options, tables=("generations",))
        val_dataset = CompletionDataset(val_store)  # read whole: the filters choose what to train on
        return Data(dataset, np.arange(len(dataset)), val_dataset, np.arange(len(val_dataset)), collate, collate)
    prompts = completion_frame(store).get_column("prompt_id").to_numpy()[rows]
    if config.val_sequences:
        order = sorted(set(prompts), key=id_hash)
        is_val, taken = np.zeros(len(rows), dtype=bool), 0
        for prompt in order:
            if taken >= config.val_sequences:
                break
            is_val |= prompts == prompt
            taken = int(is_val.sum())
    else:
        is_val = np.array([held_out(p, config.val_fraction) for p in prompts], dtype=bool)
    if is_val.all() or not is_val.any():
        raise TrainError(f"the validation split leaves {int(is_val.sum())} of {len(rows)} completions for validation",
                         hint="pick a val_fraction or val_sequences that leaves completions on both sides, or a val_store")
    return Data(dataset, np.flatnonzero(~is_val), dataset, np.flatnonzero(is_val), collate, collate)
