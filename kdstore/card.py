"""The store's dataset card: a ``README.md`` that the Hugging Face Hub and ``datasets`` read, and people too.

    text = dataset_card(manifest)      # what kdstore writes as STORE/README.md once the manifest is written
    is_kdstore_card(text)              # True for a card kdstore wrote (rewritten when the store changes)

The YAML header's ``configs`` point ``datasets.load_dataset(store_folder)`` (and
the Hub's viewer) at the shards, so the logits table loads without kdstore.
The body states what the store holds, with the true code width, and carries
one-liners for kdstore, HF ``datasets``, polars, pyarrow and duckdb, and the
numpy that decodes a row without kdstore. Each ``python`` block runs as is in
the store folder: tests/integration/test_interop.py executes them.
"""

from __future__ import annotations

import json
from typing import Any

from kdstore.format import Manifest

CARD_MARKER = "<!-- kdstore dataset card: kdstore rewrites this file when the store changes -->"
SHARDS_GLOB = "shards/*.parquet"


def is_kdstore_card(text: str) -> bool:
    """Whether a README.md is a card kdstore wrote (so kdstore may replace it), not a user's file."""
    return CARD_MARKER in text[:4096]


def _yaml_header(manifest: Manifest) -> str:
    build = manifest.build
    tags = ["knowledge-distillation", "teacher-logits", "kdstore"]
    header = {
        "pretty_name": f"kdstore {manifest.table} of {manifest.teacher['model']}",
        "license": build.get("license") or "other",
        "tags": tags,
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": SHARDS_GLOB}]}],
    }
    # JSON is YAML: every value is quoted and escaped the same way, whatever a teacher path holds
    lines = ["---"] + [f"{key}: {json.dumps(value)}" for key, value in header.items()] + ["---"]
    return "\n".join(lines) + "\n"


def _codec_line(codec: dict[str, Any]) -> str:
    logprobs = codec["logprobs"]
    bits = {"uint8": 8, "uint16": 16}[logprobs["dtype"]]
    sampled = codec.get("sampled")
    draws = (f"; {sampled['draws']} {sampled.get('scheme', 'iid')} draws per position ({sampled['mode']} mode) in "
             "`sampled_num_ids` / `sampled_id_deltas` / `sampled_counts`") if sampled else ""
    return (f"top-{codec['k']} token ids and log-probs per position over the full vocabulary of {codec['vocab_size']}, "
            f"the tail mass and the target token's log-prob; log-probs are {bits}-bit codes ({logprobs['dtype']}, "
            f"{logprobs['num_codes']} levels, at most {logprobs['max_abs_logprob_error']} nats off above "
            f"log p = {logprobs['floor_logprob']}){draws}")


def dataset_card(manifest: Manifest) -> str:
    """The README.md of a store folder (see the module docstring)."""
    teacher, tokenizer, build = manifest.teacher, manifest.tokenizer, manifest.build
    corpus = ", ".join(f"`{c}`" for c in build.get("corpus", [])) or "(not recorded)"
    per_token = manifest.total_bytes / manifest.num_tokens if manifest.num_tokens else 0.0
    first_shard = manifest.shards[0].path if manifest.shards else "shards/part-00000-000000.parquet"
    teacher_cell = (f"`{teacher['model']}` ({teacher['dtype']}, {teacher['vocab_size']} logits, "
                    f"weights sha256 `{str(teacher.get('content_sha256'))[:16]}`)")
    tokenizer_cell = (f"`{tokenizer['name']}` ({tokenizer['vocab_size']} tokens, files sha256 "
                      f"`{str(tokenizer.get('files_sha256'))[:16]}`, in `tokenizer/`)")
    size_cell = (f"{manifest.num_sequences:,} sequences, {manifest.num_tokens:,} tokens, {len(manifest.shards)} Parquet "
                 f"shard{'' if len(manifest.shards) == 1 else 's'}, {manifest.total_bytes:,} bytes ({per_token:.1f} bytes/token)")
    tail = ('tail_logmass = codebook[np.array(row["tail_logmass_codes"])]'
            + " " * 35 + "# [T - 1]\n") if "tail_logmass_codes" in manifest.columns else ""
    return f"""{_yaml_header(manifest)}
# kdstore {manifest.table} store

{CARD_MARKER}

Offline teacher outputs for knowledge distillation, written by kdstore
(format version {manifest.format_version}; the format is documented in kdstore's docs/format.md).

| | |
|---|---|
| teacher | {teacher_cell} |
| tokenizer | {tokenizer_cell} |
| per position | {_codec_line(manifest.codec)} |
| corpus | {corpus}, {build.get('seq_len', '?')} tokens per sequence |
| size | {size_cell} |
| license | {build.get('license') or 'other (not stated by the builder)'} |

One row per sequence. Position t of a sequence predicts token t + 1, so a
sequence of T tokens has T - 1 positions; `manifest.json` lists every shard
with its sha256 (`kdstore verify .` checks them all).

## Load it

```python
import kdstore
store = kdstore.open_store(".")                      # checked reads; kdstore.loader streams it into a trainer
```

```python
import os
from datasets import load_dataset
rows = load_dataset(os.path.abspath("."), split="train")   # this folder, or its Hub repo id: the YAML header
```

```python
import polars as pl
rows = pl.scan_parquet("{SHARDS_GLOB}").collect()
```

```python
import pyarrow.dataset as ds
rows = ds.dataset("shards", format="parquet").to_table()
```

```python
import duckdb
rows = duckdb.sql("SELECT * FROM '{SHARDS_GLOB}'").fetchall()
```

## Decode a row without kdstore

Ids are sorted within a position and delta-coded (the first id as is, then the
gaps); log-probs are indices into the codebook `codec.logprobs.table` of
`manifest.json`.

```python
import json
import numpy as np
import pyarrow.parquet as pq
manifest = json.load(open("manifest.json"))
k, codebook = manifest["codec"]["k"], np.array(manifest["codec"]["logprobs"]["table"], dtype=np.float32)
row = pq.read_table("{first_shard}").slice(0, 1).to_pylist()[0]
topk_ids = np.cumsum(np.array(row["topk_id_deltas"], dtype=np.int64).reshape(-1, k), axis=1)   # [T - 1, K]
topk_logprobs = codebook[np.array(row["topk_logprob_codes"]).reshape(-1, k)]                  # [T - 1, K]
{tail}```
"""


__all__ = ["CARD_MARKER", "dataset_card", "is_kdstore_card"]
