"""The training examples run for real: the torchrun recipe on 2 CPU processes (gloo), resumed, and the HF Trainer recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_store
from kdstore.codec import CodecConfig

EXAMPLES = Path(__file__).parents[2] / "examples"
pytest.importorskip("torchdata", reason="the examples resume through torchdata's StatefulDataLoader")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("examples") / "store", CodecConfig(k=8, vocab_size=300),
                       num_sequences=24, seq_len=33, shard_bytes=8000, row_group_bytes=2000)


def run(args, cwd, timeout=240):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_torchrun_example_trains_on_two_processes_and_resumes_from_its_checkpoint(store, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(EXAMPLES / "train_ddp.py"), str(store), "--checkpoint", str(tmp_path / "ckpt.pt"), "--batch-size", "4"]
    # 24 sequences, 2 ranks x 4 per batch: 3 steps per epoch, so the first run stops on an epoch's last batch
    first = run(torchrun + ["--steps", "3"], tmp_path)
    assert "epoch 0 step 3 loss" in first and "done: 3 steps on 2 ranks" in first
    resumed = run(torchrun + ["--steps", "5"], tmp_path)  # goes on with epoch 1; it used to replay epoch 0
    assert "epoch 1 step 4 loss" in resumed and "step 1 loss" not in resumed and "done: 5 steps on 2 ranks" in resumed


def test_the_hf_trainer_example_trains_a_few_steps(store, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    out = run([sys.executable, str(EXAMPLES / "train_hf_trainer.py"), str(store), "--steps", "3",
               "--batch-size", "4", "--out", str(tmp_path / "run")], tmp_path)
    assert "done: 3 steps" in out
