"""A writer process for the crash tests: writes a synthetic store, resuming from what is committed.

    python crash_writer.py STORE NUM_SEQUENCES SLEEP_SECONDS
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from conftest import make_manifest, synthetic_rows  # noqa: E402
from kdstore.codec import CodecConfig  # noqa: E402
from kdstore.format import logits_schema, rows_to_table  # noqa: E402
from kdstore.writer import ShardWriter  # noqa: E402


def main() -> None:
    path, num_sequences, sleep = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    codec = CodecConfig(k=16, vocab_size=2000)
    schema = logits_schema(codec)
    rows = synthetic_rows(codec, num_sequences, 33, seed=7)
    with ShardWriter(path, make_manifest(codec), schema, shard_bytes=12000, row_group_bytes=3000) as writer:
        print(f"committed {writer.num_committed_rows}", flush=True)
        for row in rows[writer.num_committed_rows:]:
            writer.write(rows_to_table(schema, [row]))
            time.sleep(sleep)


if __name__ == "__main__":
    main()
