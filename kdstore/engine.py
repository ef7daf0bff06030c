"""Where a teacher pass runs: in this process (``engine = "local"``) or as tasks on a Ray cluster (``"ray"``).

    build(BuildConfig(corpus=("data/",), out="/shared/store", engine="ray", ray_address="head:6379",
                      num_gpus_per_worker=1))          # or: kdstore build data/ --out ... --engine ray
    generate(GenerateConfig(prompts="p.jsonl", out="/shared/gens", engine="ray"))   # kdstore generate ... --engine ray
    score_store(ScoreConfig(store="/shared/store", reference="small", engine="ray"))  # kdstore score ... --engine ray

Every teacher pass (build, generate, score) is a set of independent partitions: each does the work whose key
hashes to it (kdstore/build.py: work units; kdstore/generate.py: prompts; kdstore/score.py: shards) and writes
its own files, resumably; the last one to finish writes the manifest. A ``TeacherPass`` (below) says how to
run one partition in this process and how to merge the partitions' results. On Ray each partition is one task
running that local pass, e.g. ``build(replace(config, partition=p))``, into the same output (a path every node
sees, or, for build, an object-store URL):

* tasks, not actors: a partition is the unit of retry. When a worker dies (killed, out of memory, a lost
  node) Ray reruns its task (``max_retries``), and the rerun resumes from the partition's committed shards
  (kdstore/writer.py; score: its finished score files), so the store is byte for byte the one an uninterrupted
  run writes. An actor would keep the teacher loaded between partitions, but a restarted actor reruns its
  constructor, not the half-done partition; the retry bookkeeping would be ours to write.
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
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from kdstore.errors import EngineError, KdstoreError, first_line
from kdstore.format import PARTITION_DIR, SHARD_DIR
from kdstore.records import check_output_folder, read_record
from kdstore.store import is_url
from kdstore.writer import read_shard_essentials

if TYPE_CHECKING:
    from kdstore.build import ProgressCallback  # (items done, items of the partition, tokens): every pass takes one

RAY_EXTRA = "pip install 'kdstore[ray]'"
# Ray reruns a partition whose worker died this many times; each rerun resumes from the committed shards
MAX_RETRIES = 3
POLL_SECONDS = 0.5  # how often the driver asks the tracker for progress
MAX_BARS = 8  # more partitions than this: only the total bar
CONNECT_SECONDS = 5.0  # the TCP check of --ray-address; ray.init itself would retry for a minute


class PartitionedConfig(Protocol):
    """The fields of a teacher pass's frozen config dataclass that the engine reads and sets (with ``replace``)."""

    num_partitions: int
    partition: int  # 0 with --engine ray: the engine sets it per task
    engine: str  # "local" or "ray"
    ray_address: str  # "": RAY_ADDRESS, else a new local cluster; "auto": the one `ray start` made here
    num_gpus_per_worker: float  # GPUs per partition task; 0 runs it on one CPU
    device: str
    progress: bool


class PassResult(Protocol):
    """A partition's (and the merged) result: ``notes`` come last in ``summary_lines``."""

    notes: list[str]

    def summary_lines(self) -> list[str]: ...


C = TypeVar("C", bound=PartitionedConfig)
R = TypeVar("R", bound=PassResult)


@dataclass(frozen=True)
class TeacherPass(Generic[C, R]):
    """How the engine runs one kind of teacher pass (kdstore/passes.py has build, generate and score)."""

    name: str  # "build": the command, in messages
    unit: str  # what a partition's progress counts: "unit", "prompt", "shard"
    error: type[KdstoreError]  # the pass's error class, for a task that failed with another exception
    # one partition in this process: (config with engine "local", storage options, progress callback) -> result
    run: Callable[[C, dict[str, Any] | None, ProgressCallback], R]
    # the whole pass's result from every partition's (by partition), given the wall time of the whole run
    merge: Callable[[C, dict[int, R], float], R]
    # refuses what a local run would refuse before any model loads (a foreign --out folder, ...), before the
    # cluster starts
    check: Callable[[C, dict[str, Any] | None], None]
    # the number of partitions a started run was split into (a rerun resumes it), or None: any number will do
    started_num_partitions: Callable[[C], int | None]


@dataclass
class PartitionProgress:
    """What the driver knows of one partition; ``pids`` has one entry per attempt (a rerun adds one)."""

    partition: int
    pids: list[int] = field(default_factory=list)
    node: str = ""
    num_units_done: int = 0  # items of the pass's ``unit``: work units, prompts or shards
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


def run_partitions(config: Any, storage_options: dict[str, Any] | None = None,
                   on_progress: ProgressListener | None = None) -> Any:
    """Run every partition of ``config`` (a BuildConfig, GenerateConfig or ScoreConfig) as a Ray task; the
    result of the whole pass (BuildResult, GenerateResult, ScoreResult).

    ``on_progress`` gets the progress of every started partition about every POLL_SECONDS."""
    from kdstore.passes import pass_of

    teacher_pass = pass_of(config)
    started = time.perf_counter()
    _check_settings(config)
    ray = import_ray()
    teacher_pass.check(config, storage_options)  # refused before a cluster starts or a teacher loads
    connected_here = _connect(ray, config.ray_address)
    try:
        num_partitions = config.num_partitions if config.num_partitions > 1 else (
            teacher_pass.started_num_partitions(config) or _worker_slots(ray, config))
        _check_gpus(ray, config)
        results, progress = _run_tasks(ray, teacher_pass, config, num_partitions, storage_options, on_progress)
    finally:
        if connected_here:
            ray.shutdown()
    merged = teacher_pass.merge(config, results, time.perf_counter() - started)
    nodes = {state.node for state in progress.values() if state.node}
    merged.notes.append(f"ran {len(results)} partitions as Ray tasks on {len(nodes)} node(s)")
    merged.notes += [f"partition {p} was rerun {len(state.pids) - 1} time(s) after its worker died; it resumed from "
                     "what it had committed" for p, state in sorted(progress.items()) if len(state.pids) > 1]
    return merged


def _check_settings(config: PartitionedConfig) -> None:
    if config.partition != 0:
        raise EngineError(f"--partition {config.partition} with --engine ray: Ray runs every partition",
                          hint="drop --partition (--num-partitions sets how many there are)")
    if config.num_gpus_per_worker == 0 and config.device.startswith("cuda"):
        raise EngineError(f"--device {config.device} with --num-gpus-per-worker 0: Ray gives the tasks no GPU",
                          hint="pass --num-gpus-per-worker 1 (or more), or --device cpu")


def check_out(out: str, storage_options: dict[str, Any] | None) -> None:
    """A local run's check of its output: a folder (new, empty or a store of ours) or an unused URL prefix."""
    if is_url(out):
        from kdstore.mirror import RemoteMirror

        RemoteMirror(out, storage_options).check_target(None)
    else:
        check_output_folder(Path(out))


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
        raise EngineError(f"cannot attach to the Ray cluster at {address or 'a new local instance'}: {first_line(exc)}",
                          hint="start one with `ray start --head`, then pass the address it prints as --ray-address "
                               "HOST:PORT; or omit --ray-address to start a local one for this run") from None
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


def started_num_partitions(out: str) -> int | None:
    """The number of partitions of the store being written in the local folder ``out`` (None if none yet): a
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


def _worker_slots(ray: Any, config: PartitionedConfig) -> int:
    """How many partition tasks the cluster runs at once: its CPUs, or its GPUs over --num-gpus-per-worker."""
    gpus = config.num_gpus_per_worker
    return max(1, sum(int(node.get("GPU", 0) // gpus) if gpus else int(node.get("CPU", 0)) for node in _nodes(ray)))


def _check_gpus(ray: Any, config: PartitionedConfig) -> None:
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


def _partition_task(teacher_pass: TeacherPass, config: Any, storage_options: dict[str, Any] | None, cwd: str,
                    tracker: Any) -> Any:
    """One partition, in a Ray worker: the local pass, from the driver's working directory (relative paths
    mean there what they meant on the driver, and the manifest records them as a local run does)."""
    import ray

    pid, node = os.getpid(), ray.get_runtime_context().get_node_id()
    sent: list[Any] = []

    def report(done: int, total: int, tokens: int) -> None:
        sent[:] = [tracker.update.remote(config.partition, pid, node, done, total, tokens)]

    if not os.path.isdir(cwd):
        raise EngineError(f"the driver's working directory {cwd} does not exist on Ray node {node}",
                          hint="give the output, the inputs and the models as absolute paths every node sees, or a URL")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        result = teacher_pass.run(config, storage_options, report)
    finally:
        os.chdir(before)  # Ray reuses worker processes
    ray.get(sent)  # an actor runs one caller's calls in order: every report has landed before the result
    return result


def _run_tasks(ray: Any, teacher_pass: TeacherPass, config: Any, num_partitions: int,
               storage_options: dict[str, Any] | None,
               on_progress: ProgressListener | None) -> tuple[dict[int, Any], dict[int, PartitionProgress]]:
    gpus = config.num_gpus_per_worker
    device = "cpu" if not gpus and config.device == "auto" else config.device
    task = ray.remote(_partition_task).options(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES)
    tracker = ray.remote(num_cpus=0)(_Tracker).remote()
    refs = {task.remote(teacher_pass, replace(config, engine="local", partition=p, num_partitions=num_partitions,
                                              progress=False, device=device), storage_options, os.getcwd(), tracker): p
            for p in range(num_partitions)}
    pending, results = list(refs), {}
    bars = _Bars(num_partitions, config.progress, teacher_pass.unit)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_SECONDS)
            for ref in ready:
                results[refs[ref]] = _result(ray, teacher_pass, ref, refs[ref])
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


def _result(ray: Any, teacher_pass: TeacherPass, ref: Any, partition: int) -> Any:
    """The task's result; its KdstoreError as itself; a worker that died too often as an EngineError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, KdstoreError):
            raise exc.cause from None
        raise teacher_pass.error(f"partition {partition} failed on the Ray cluster: {type(exc.cause).__name__}: "
                                 f"{first_line(exc.cause)}") from None
    except ray.exceptions.RayError as exc:
        raise EngineError(f"partition {partition}: its Ray worker was lost {MAX_RETRIES + 1} times "
                          f"({type(exc).__name__})",
                          hint="the node's Ray logs (/tmp/ray/session_latest/logs) say why (out of memory?); rerun "
                               f"the same `kdstore {teacher_pass.name}` to resume: what was committed is kept") from None


class _Bars:
    """tqdm bars on the driver: the total, and one per partition when there are at most MAX_BARS."""

    def __init__(self, num_partitions: int, enabled: bool, unit: str) -> None:
        from tqdm import tqdm

        self.total = tqdm(desc="total", unit=unit, disable=not enabled, position=0)
        count = num_partitions if num_partitions <= MAX_BARS else 0
        self.parts = [tqdm(desc=f"partition {p}", unit=unit, disable=not enabled, position=p + 1, leave=False)
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


__all__ = ["MAX_RETRIES", "PartitionProgress", "TeacherPass", "check_out", "import_ray", "run_partitions",
           "started_num_partitions"]
