"""Real writer processes killed with SIGKILL at random moments never leave a store that looks complete
but is not, and a rerun always ends with the same store as an uninterrupted run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from kdstore.store import open_store
from kdstore.verify import verify_store

SCRIPT = Path(__file__).with_name("crash_writer.py")
NUM_SEQUENCES = 40


def _run(path: Path, sleep: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(path), str(NUM_SEQUENCES), str(sleep)],
                            stdout=subprocess.PIPE, text=True)


def _content(path: Path) -> tuple[dict, dict[str, bytes]]:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("created_at")
    return manifest, {s["path"]: (path / s["path"]).read_bytes() for s in manifest["shards"]}


def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_store(tmp_path):
    reference = tmp_path / "reference"
    assert _run(reference).wait() == 0
    want = _content(reference)
    rng = random.Random(1234)
    crashed = tmp_path / "crashed"
    kills = 0
    while not (crashed / "manifest.json").exists() and kills < 12:
        process = _run(crashed, sleep=0.01)
        process.stdout.readline()  # the writer is open: its lock is held, recovery is done
        time.sleep(rng.uniform(0.0, 0.25))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if (crashed / "manifest.json").exists():
            assert verify_store(open_store(crashed)) == []  # finished just before the kill: must be whole
    assert kills >= 3, "the kills never landed mid-write; raise the sleep"
    assert _run(crashed).wait() == 0
    assert verify_store(open_store(crashed)) == []
    assert _content(crashed) == want
