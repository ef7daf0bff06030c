"""Where a teacher pass runs: in this process (``engine = "local"``) or as tasks on a Ray cluster (``"ray"``).

    build(BuildConfig(corpus=("data/",), out="/shared/store", engine="ray", ray_address="head:6379",
                      num_gpus_per_worker=1))          # or: kdstore build data/ --out ... --engine ray

A build is a set of independent partitions (kdstore/build.py): each reads the corpus, keeps the work units
whose key hashes to it and writes its own shards; the last one to finish writes the manifest. On Ray each
partition is one task running the local build of that partition, ``build(replace(config, partition=p))``,
into the same ``out`` (a path every node sees, or an object-store URL):

* tasks, not actors: a partition is the unit of retry. When a worker dies (killed, out of memory, a lost
  node) Ray reruns its task (``max_retries``), and the rerun resumes from the partition's committed shards
  (kdstore/writer.py), so the store is byte for byte the one an uninterrupted run writes. An actor would keep
  the teacher loaded between partitions, but a restarted actor reruns its constructor, not the half-done
  partition; the retry bookkeeping would be ours to write.
* not Ray Data: ``map_batches`` over an actor pool streams the teacher outputs (K ids and K log-probs per
  token) through the object store into one writer, which makes that writer the bottleneck, and Ray Data
  retries blocks, not the writer's committed prefix: a killed build could no longer resume to the same
  bytes. Partitions already are the blocks, each with its own writer and its own resume.

Progress: each task reports (units done, units, tokens) to a small actor; the driver polls it and draws
one bar per partition (up to ``MAX_BARS``) and one in total.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdstore.build import BuildConfig, BuildResult, build
from kdstore.errors import BuildError, EngineError, KdstoreError
from kdstore.format import PARTITION_DIR, SHARD_DIR
from kdstore.records import check_output_folder, read_record
from kdstore.store import is_url
from kdstore.writer import read_shard_essentials

RAY_EXTRA = "pip install 'kdstore[ray]'"
# Ray reruns a partition whose worker died this many times; each rerun resumes from the committed shards
MAX_RETRIES = 3
POLL_SECONDS = 0.5  # how often the driver asks the tracker for progress
MAX_BARS = 8  # more partitions than this: only the total bar
CONNECT_SECONDS = 5.0  # the TCP check of --ray-address; ray.init itself would retry for a minute


@dataclass
class PartitionProgress:
    """What the driver knows of one partition; ``pids`` has one entry per attempt (a rerun adds one)."""

    partition: int
    pids: list[int] = field(default_factory=list)
    node: str = ""
    num_units_done: int = 0
    num_units: int = 0
    num_tokens: int = 0
    done: bool = False


ProgressListener = Callable[[dict[int, PartitionProgress]], None]


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EngineError("--engine ray needs Ray, which is not installed", hint=f"{RAY_EXTRA} (Ray 2.9 or later)") from None
    return ray


def run_partitions(config: BuildConfig, storage_options: dict[str, Any] | None = None,
                   on_progress: ProgressListener | None = None) -> BuildResult:
    """Run every partition of ``config`` as a Ray task; the BuildResult of the whole store.

    ``on_progress`` gets the progress of every started partition about every POLL_SECONDS."""
    started = time.perf_counter()
    _check_settings(config)
    ray = import_ray()
    _check_out(config, storage_options)  # refused before a cluster starts or a teacher loads
    connected_here = _connect(ray, config.ray_address)
    try:
        num_partitions = config.num_partitions if config.num_partitions > 1 else (
            _started_num_partitions(config.out) or _worker_slots(ray, config))
        _check_gpus(ray, config)
        results, progress = _run_tasks(ray, config, num_partitions, storage_options, on_progress)
    finally:
        if connected_here:
            ray.shutdown()
    return _merged(config, results, progress, time.perf_counter() - started)


def _check_settings(config: BuildConfig) -> None:
    if config.partition != 0:
        raise EngineError(f"--partition {config.partition} with --engine ray: Ray runs every partition",
                          hint="drop --partition (--num-partitions sets how many there are)")
    if config.num_gpus_per_worker == 0 and config.backend == "vllm":
        raise EngineError("--backend vllm with --engine ray and --num-gpus-per-worker 0: vLLM runs each partition's "
                          "engine on GPUs", hint="pass --num-gpus-per-worker 1 (or the GPUs of one vLLM engine)")
    if config.num_gpus_per_worker == 0 and config.device.startswith("cuda"):
        raise EngineError(f"--device {config.device} with --num-gpus-per-worker 0: Ray gives the tasks no GPU",
                          hint="pass --num-gpus-per-worker 1 (or more), or --device cpu")


def _check_out(config: BuildConfig, storage_options: dict[str, Any] | None) -> None:
    if is_url(config.out):
        from kdstore.mirror import RemoteMirror

        RemoteMirror(config.out, storage_options).check_target(None)
    else:
        check_output_folder(Path(config.out))


def _connect(ray: Any, address: str) -> bool:
    """Attach to the cluster at ``address`` ("": RAY_ADDRESS, else a new local instance for this build; "auto": the
    one `ray start` made on this machine); True when this call attached (and so must detach)."""
    if ray.is_initialized():  # a library user's own ray.init(): use that cluster
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address and address != "auto":
        _check_reachable(address)
    try:
        # "local", never None: ray.init() would attach to the last cluster `ray start` made here, and wait forever
        # when that cluster is gone
        ray.init(address=address or "local", logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        raise EngineError(f"cannot attach to the Ray cluster at {address or 'a new local instance'}: {_first_line(exc)}",
                          hint="start one with `ray start --head`, then pass the address it prints as --ray-address "
                               "HOST:PORT; or omit --ray-address to start a local one for this build") from None
    return True


def _check_reachable(address: str) -> None:
    """HOST:PORT or ray://HOST:PORT must accept a TCP connection, checked in seconds."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise EngineError(f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto",
                          hint="pass the address `ray start --head` printed, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise EngineError(f"no Ray cluster answers at --ray-address {address}: {exc.strerror or exc}",
                          hint="start it with `ray start --head --port PORT` on that machine, or check the address "
                               "`ray status` shows there; omit --ray-address to start a local cluster") from None


def _started_num_partitions(out: str) -> int | None:
    """The number of partitions of the store being built in the local folder ``out`` (None if none yet): a
    rerun resumes it on a cluster of any size."""
    if is_url(out):
        return None
    records = sorted(Path(out, PARTITION_DIR).glob("part-*.json"))
    if records:
        return int(read_record(records[0])["num_partitions"])
    shards = sorted(Path(out, SHARD_DIR).glob("part-*.parquet"))
    return int(read_shard_essentials(shards[0])["num_partitions"]) if shards else None


def _nodes(ray: Any) -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _worker_slots(ray: Any, config: BuildConfig) -> int:
    """How many partition tasks the cluster runs at once: its CPUs, or its GPUs over --num-gpus-per-worker."""
    gpus = config.num_gpus_per_worker
    return max(1, sum(int(node.get("GPU", 0) // gpus) if gpus else int(node.get("CPU", 0)) for node in _nodes(ray)))


def _check_gpus(ray: Any, config: BuildConfig) -> None:
    """A task needing G GPUs waits forever on a cluster whose every node has fewer: refuse it now."""
    if not config.num_gpus_per_worker:
        return
    per_node = [node.get("GPU", 0.0) for node in _nodes(ray)] or [0.0]
    if max(per_node) < config.num_gpus_per_worker:
        raise EngineError(f"--num-gpus-per-worker {config.num_gpus_per_worker:g}: the Ray cluster has {sum(per_node):g} "
                          f"GPU(s), at most {max(per_node):g} on one node",
                          hint="lower --num-gpus-per-worker, add GPU nodes to the cluster, or pass 0 to run on CPUs")


class _Tracker:
    """A Ray actor holding every partition's progress; tasks report to it, the driver reads it."""

    def __init__(self) -> None:
        self.partitions: dict[int, PartitionProgress] = {}

    def update(self, partition: int, pid: int, node: str, done: int, total: int, tokens: int) -> None:
        state = self.partitions.setdefault(partition, PartitionProgress(partition))
        if pid not in state.pids:
            state.pids.append(pid)
        state.node, state.num_units_done, state.num_units, state.num_tokens = node, done, total, tokens

    def snapshot(self) -> dict[int, PartitionProgress]:
        return self.partitions


def _partition_task(config: BuildConfig, storage_options: dict[str, Any] | None, cwd: str, tracker: Any) -> BuildResult:
    """One partition, in a Ray worker: the local build, from the driver's working directory (relative paths
    mean there what they meant on the driver, and the manifest records them as a local build does)."""
    import ray

    pid, node = os.getpid(), ray.get_runtime_context().get_node_id()
    sent: list[Any] = []

    def report(done: int, total: int, tokens: int) -> None:
        sent[:] = [tracker.update.remote(config.partition, pid, node, done, total, tokens)]

    if not os.path.isdir(cwd):
        raise EngineError(f"the driver's working directory {cwd} does not exist on Ray node {node}",
                          hint="give --out, the corpus and the teacher as absolute paths every node sees, or a URL")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        result = build(config, storage_options, on_progress=report)
    finally:
        os.chdir(before)  # Ray reuses worker processes
    ray.get(sent)  # an actor runs one caller's calls in order: every report has landed before the result
    return result


def _run_tasks(ray: Any, config: BuildConfig, num_partitions: int, storage_options: dict[str, Any] | None,
               on_progress: ProgressListener | None) -> tuple[dict[int, BuildResult], dict[int, PartitionProgress]]:
    gpus = config.num_gpus_per_worker
    device = "cpu" if not gpus and config.device == "auto" else config.device
    task = ray.remote(_partition_task).options(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES)
    tracker = ray.remote(num_cpus=0)(_Tracker).remote()
    refs = {task.remote(replace(config, engine="local", partition=p, num_partitions=num_partitions, progress=False,
                                device=device), storage_options, os.getcwd(), tracker): p
            for p in range(num_partitions)}
    pending, results = list(refs), {}
    bars = _Bars(num_partitions, config.progress)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_SECONDS)
            for ref in ready:
                results[refs[ref]] = _result(ray, ref, refs[ref])
            progress = ray.get(tracker.snapshot.remote())
            for partition in results:
                progress.setdefault(partition, PartitionProgress(partition)).done = True
            bars.show(progress)
            if on_progress is not None:
                on_progress(progress)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)  # a KeyboardInterrupt in the task: its writer discards the partial shard
        raise
    finally:
        bars.close()
    return results, progress


def _result(ray: Any, ref: Any, partition: int) -> BuildResult:
    """The task's BuildResult; its KdstoreError as itself; a worker that died too often as an EngineError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, KdstoreError):
            raise exc.cause from None
        raise BuildError(f"partition {partition} failed on the Ray cluster: {type(exc.cause).__name__}: "
                         f"{_first_line(exc.cause)}") from None
    except ray.exceptions.RayError as exc:
        raise EngineError(f"partition {partition}: its Ray worker was lost {MAX_RETRIES + 1} times "
                          f"({type(exc).__name__})",
                          hint="the node's Ray logs (/tmp/ray/session_latest/logs) say why (out of memory?); rerun "
                               "the same command to resume: committed shards are kept") from None


def _merged(config: BuildConfig, results: dict[int, BuildResult], progress: dict[int, PartitionProgress],
            seconds: float) -> BuildResult:
    merged = BuildResult(out=config.out, seconds=seconds, corpus=results[0].corpus)  # each partition read it all
    for result in results.values():
        merged.num_sequences += result.num_sequences
        merged.num_tokens += result.num_tokens
        merged.compute_seconds = max(merged.compute_seconds, result.compute_seconds)
        if result.finished:
            merged.finished, merged.total_bytes, merged.store_tokens = True, result.total_bytes, result.store_tokens
    nodes = {state.node for state in progress.values() if state.node}
    merged.notes.append(f"ran {len(results)} partitions as Ray tasks on {len(nodes)} node(s)")
    merged.notes += [f"partition {p} was rerun {len(state.pids) - 1} time(s) after its worker died; it resumed from "
                     "its committed shards" for p, state in sorted(progress.items()) if len(state.pids) > 1]
    return merged


class _Bars:
    """tqdm bars on the driver: the total, and one per partition when there are at most MAX_BARS."""

    def __init__(self, num_partitions: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.total = tqdm(desc="total", unit="unit", disable=not enabled, position=0)
        count = num_partitions if num_partitions <= MAX_BARS else 0
        self.parts = [tqdm(desc=f"partition {p}", unit="unit", disable=not enabled, position=p + 1, leave=False)
                      for p in range(count)]

    def show(self, progress: dict[int, PartitionProgress]) -> None:
        for bar, states in [(self.total, list(progress.values())),
                            *((bar, [progress[p]]) for p, bar in enumerate(self.parts) if p in progress)]:
            bar.total = sum(s.num_units for s in states)
            bar.n = sum(s.num_units_done for s in states)
            bar.set_postfix(tokens=f"{sum(s.num_tokens for s in states):,}",
                            attempts=max((len(s.pids) for s in states), default=0), refresh=False)
            bar.refresh()

    def close(self) -> None:
        for bar in [*self.parts, self.total]:
            bar.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


__all__ = ["MAX_RETRIES", "PartitionProgress", "import_ray", "run_partitions"]
