"""The ``kdstore`` command: thin click wrappers over the library.

Each command parses its arguments, calls one library function and prints the
result. Library errors (``KdstoreError``) become one line ``Error: ...`` and
exit status 1; the fix-it hint lives on the exception.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kdstore.errors import KdstoreError


class _OneLineUsageError(click.UsageError):
    """A usage mistake shown as one line, like a library error: click's message and where the help is."""

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file, err=file is None)


class _Group(click.Group):
    """Turns library errors and usage mistakes into one clean line instead of a traceback or a usage block."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdstoreError as exc:
            raise click.ClickException(exc.one_line()) from None
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            message = " ".join(exc.format_message().split())  # a missing Choice option lists its choices on lines
            raise _OneLineUsageError(f"{message} (see `{where} --help`)", exc.ctx) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing half-written was committed.", err=True)
            sys.exit(130)


store_argument = click.argument("store")  # a folder or a URL: click.Path would mangle s3://bucket into s3:/bucket
storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="fsspec option for a remote STORE (repeatable), e.g. endpoint_url=http://127.0.0.1:9000.")


def engine_options(command: Any) -> Any:
    """--engine, --ray-address and --num-gpus-per-worker: where a teacher pass's partitions run (kdstore/engine.py)."""
    for option in reversed([
        click.option("--engine", type=click.Choice(["local", "ray"]), default=None,
                     help="Where the partitions run: this process, or tasks on a Ray cluster (pip install "
                          "'kdstore[ray]'). [default: local]"),
        click.option("--ray-address", default=None, metavar="ADDR",
                     help="--engine ray: the cluster (HOST:PORT, ray://HOST:PORT, or auto: the one `ray start` made "
                          "here). [default: RAY_ADDRESS, else a new local cluster for this run]"),
        click.option("--num-gpus-per-worker", type=float, default=None,
                     help="--engine ray: GPUs per partition task; 0 runs them on CPUs. [default: 0]"),
    ]):
        command = option(command)
    return command


def _options(pairs: tuple[str, ...], flag: str = "--storage-option") -> dict[str, str] | None:
    """``flag`` KEY=VALUE pairs -> a dict (None when there are none)."""
    if any("=" not in pair or pair.startswith("=") for pair in pairs):
        raise click.BadParameter(f"each {flag} is KEY=VALUE", param_hint=flag)
    return dict(pair.split("=", 1) for pair in pairs) or None


@click.group(cls=_Group)
@click.version_option(package_name="kdstore")
def cli() -> None:
    """kdstore: run a teacher once, store what it knows, stream it into any student."""


@cli.command()
@store_argument
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@storage_option
def info(store: str, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Summarise a store: teacher, tokenizer, K, sequences, tokens, bytes/token, shards.

    \b
    Example:
      kdstore info my-store
      kdstore info my-store --json | jq .bytes_per_token
      kdstore info s3://bucket/store --storage-option endpoint_url=http://127.0.0.1:9000
    """
    from kdstore.format import TABLE_GENERATIONS, TABLE_LOGITS
    from kdstore.generation_view import generation_summary
    from kdstore.store import open_store

    opened = open_store(store, _options(storage_options), tables=(TABLE_LOGITS, TABLE_GENERATIONS))
    summary = opened.summary()
    if opened.manifest.table == TABLE_GENERATIONS:  # counts, tokens, accuracy and votes of the completions
        summary.pop("num_positions")
        summary.update(generation_summary(opened))
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        click.echo(f"{key:>16}: {', '.join(value) if isinstance(value, list) else value}")


@cli.command()
@store_argument
@storage_option
def verify(store: str, storage_options: tuple[str, ...]) -> None:
    """Check every shard (checksums, schema, invariants), the tokenizer files and the Arrow copy; exit 1 listing all problems.

    \b
    Example:
      kdstore verify my-store && echo sound
    """
    from kdstore.format import TABLE_GENERATIONS, TABLE_LOGITS
    from kdstore.store import open_store
    from kdstore.verify import verify_store

    opened = open_store(store, _options(storage_options), tables=(TABLE_LOGITS, TABLE_GENERATIONS))
    problems = verify_store(opened)
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}")
        raise click.ClickException(f"{len(problems)} problem(s) in {store}")
    summary = opened.summary()
    counts = ", ".join(_plural(summary[f"num_{noun}s"], noun) for noun in ("shard", "sequence", "token"))
    click.echo(f"OK: {counts} verified")


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@cli.command()
@store_argument
@click.option("-n", "num_positions", default=16, show_default=True, help="Positions to show.")
@click.option("--top", default=5, show_default=True, help="Teacher alternatives per position.")
@click.option("--id", "sequence_id", default=None, help="Sequence id to show. [default: the first sequence]")
@click.option("--where", default=None, metavar="SQL",
              help="Show the first sequence matching an SQL condition on sequence_id, num_tokens and the scores.")
@storage_option
def head(store: str, num_positions: int, top: int, sequence_id: str | None, where: str | None,
         storage_options: tuple[str, ...]) -> None:
    """Show the first positions of a sequence with the teacher's top alternatives.

    Tokens are decoded with the store's tokenizer when it ships one; otherwise ids are shown.

    --where takes an SQL condition over sequence_id, num_tokens and the store's score columns
    (teacher_score, ...): comparisons, AND/OR/NOT, IN (...), BETWEEN, LIKE, IS NULL and
    arithmetic; no functions or subqueries.

    \b
    Example:
      kdstore head my-store -n 8 --top 3
      kdstore head my-store --id 3349417010e88bef75c76a24
      kdstore head my-store --where "teacher_score < -3 AND num_tokens > 100"
    """
    from kdstore.inspect import format_head

    for line in format_head(store, num_positions, top, sequence_id, _options(storage_options), where=where):
        click.echo(line)


@cli.command()
@store_argument
@click.option("--student", required=True, help="The student's tokenizer or model folder (local: nothing is downloaded).")
@click.option("--student-vocab-size", type=click.IntRange(min=1), default=None,
              help="The student's logit dimension. [default: its config.json vocab_size, else the tokenizer's ids]")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@storage_option
def check(store: str, student: str, student_vocab_size: int | None, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Compare the store's tokenizer with a student's, id by id; exit 1 when the student cannot be distilled from it.

    Verdicts: identical; the same vocabulary with other special tokens; the student's vocabulary a
    prefix or a superset of the store's (same ids), compatible when its logits reach every store id;
    mismatched ids (counted, with examples): never compatible.

    \b
    Example:
      kdstore check my-store --student ./my-student
      kdstore check my-store --student ./qwen-0.5b --json | jq .kind
    """
    from kdstore.vocab import compare_vocab

    report = compare_vocab(store, student, student_vocab_size, _options(storage_options))
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else "\n".join(report.lines()))
    if not report.compatible:
        raise click.ClickException(str(report.problem))


@cli.command()
@click.argument("store", metavar="STORE|RUN_FOLDER")
@click.option("--plot", "plot_dir", default=None, metavar="DIR", help="Also write PNG plots (640x400 px) into this folder.")
@click.option("--html", "html_file", default=None, metavar="FILE",
              help="Also write one self-contained HTML report to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@storage_option
def stats(store: str, plot_dir: str | None, html_file: str | None, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Measure a store one row group at a time: perplexity, entropy bounds, top-K and tail mass, rank of the next
    token, sampled draws, bytes per column, rows and tokens per shard, scores (docs/stats.md defines each). A
    generations store (kdstore generate) adds prompts, completion lengths, finish reasons, accuracy, pass@n and
    majority votes, its per-position figures taken over the completions. Given a `kdstore train` run folder
    (metrics.jsonl): its losses, learning rate and throughput, and their curves.

    \b
    Example:
      kdstore stats my-store
      kdstore stats my-store --plot my-store-plots --html my-store.html
      kdstore stats s3://bucket/store --json --storage-option endpoint_url=http://127.0.0.1:9000 | jq .perplexity
      kdstore stats my-gens --json | jq .generations.pass_at_n
      kdstore stats my-run --plot my-run-plots --html my-run.html
    """
    from kdstore.run_stats import format_run_stats, is_run_folder, measure_run
    from kdstore.stats import format_stats, measure_store

    if is_run_folder(store):
        figures, written = measure_run(store, plot_dir, html_file)
        lines = format_run_stats(figures)
    else:
        figures, written = measure_store(store, _options(storage_options), plot_dir, html_file)
        lines = format_stats(figures, store)
    if as_json:  # the figures alone: a script pipes them on
        click.echo(json.dumps(figures, indent=1))
        return
    click.echo("\n".join([*lines, *(f"wrote {path}" for path in written)]))


@cli.command()
@click.argument("corpus", nargs=-1, type=click.Path())
@click.option("--teacher", default=None, help="Model folder or hub id. [default: the bundled tiny teacher]")
@click.option("--out", default=None, help="Store folder or URL (s3://, gs://, ...) to write or resume. [default: kdstore-store]")
@click.option("-k", "k", type=int, default=None, help="Top-K entries per position. [default: 64]")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence. [default: 256]")
@click.option("--sampled-draws", type=int, default=None,
              help="Also store N draws per position for the sampled_kl loss (systematic, from the whole distribution; "
                   "mode and scheme via --config). [default: 0]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Teacher dtype.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto. [default: auto]")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default=None,
              help="What runs the teacher: transformers, or vLLM's prompt log-probs (pip install vllm; no sampled draws; "
                   "engine settings under [vllm_options] in --config). [default: transformers]")
@click.option("--split", type=click.Choice(["file", "blank-line"]), default=None,
              help="Plain text: one document per file or per blank-line block. [default: blank-line]")
@click.option("--errors", type=click.Choice(["strict", "replace"]), default=None, help="Non-UTF-8 bytes: stop or replace.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow the teacher's own Python code.")
@click.option("--num-partitions", type=int, default=None,
              help="Split the build into N independent partitions. [default: 1; --engine ray: as many as the cluster "
                   "runs at once]")
@click.option("--partition", type=int, default=None, help="Which partition this process builds (0-based).")
@engine_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="build.toml; flags override it.")
@click.option("--finalize", "finalize_only", is_flag=True, help="Only write the manifest of finished partitions.")
@click.option("--reference", default=None,
              help="Also score every sequence with this small reference model in the same pass (as `kdstore score`).")
@storage_option
def build(corpus: tuple[str, ...], config_file: str | None, finalize_only: bool, storage_options: tuple[str, ...],
          **flags: Any) -> None:
    """Run the teacher once over CORPUS and write (or resume) a verified store.

    CORPUS is text files or folders, JSONL, Parquet, or a saved HF datasets folder;
    with no CORPUS and no --teacher the bundled sample corpus and tiny teacher are used.
    Rerunning the same command resumes after a crash or Ctrl-C.

    \b
    Example:
      kdstore build --out demo-store
      kdstore build data/*.jsonl --teacher ./my-teacher --out store -k 64 --seq-len 1024
      kdstore build data/ --teacher ./my-teacher --out sampled-store -k 1 --sampled-draws 192
      kdstore build data/ --teacher ./my-teacher --reference ./small-model --out store
      for i in 0 1 2 3; do kdstore build data/ --teacher ./my-teacher --out store --num-partitions 4 --partition $i & done; wait
      kdstore build data/ --teacher ./my-teacher --out s3://bucket/store --storage-option endpoint_url=http://minio:9000
      kdstore build data/ --teacher /shared/teacher --out /shared/store --engine ray --ray-address head:6379
    """
    from kdstore.build import build as run_build
    from kdstore.build import finalize_store, resolved_config

    config = resolved_config({**flags, "corpus": corpus or None}, config_file)
    if finalize_only:
        click.echo(finalize_store(config.out))
        return
    for line in run_build(config, _options(storage_options)).summary_lines():
        click.echo(line)


@cli.command()
@click.argument("prompts", type=click.Path())
@click.option("--teacher", default=None, help="Model folder or hub id. [default: the bundled tiny teacher]")
@click.option("--out", default=None, help="Store folder to write or resume. [default: kdstore-generations]")
@click.option("-n", "n", type=int, default=None, help="Completions per prompt. [default: 4]")
@click.option("--temperature", type=float, default=None, help="Sampling temperature; 0 is greedy. [default: 1.0]")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold. [default: 1.0: off]")
@click.option("--top-k", type=int, default=None, help="Sample from the k likeliest tokens. [default: 0: off]")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens per completion at most. [default: 128]")
@click.option("--stop", multiple=True,
              help="Stop string, kept at the end of the completion (repeatable; \\n and \\t mean newline and tab).")
@click.option("--chat-template", is_flag=True, default=None, help="Render prompts with the tokenizer's chat template.")
@click.option("--system", default=None, help="System message (a first line when there is no chat template).")
@click.option("--prompt-field", default=None, help="Field holding the prompt text or messages. [default: prompt]")
@click.option("--answer-field", default=None, help="Field holding the reference answer. [default: answer]")
@click.option("--answer-extractor", type=click.Choice(["numeric", "boxed", "regex", "none"]), default=None,
              help="How answers are read from completions. [default: numeric]")
@click.option("--answer-pattern", default=None, help="Regular expression for --answer-extractor regex; group 1 is the answer.")
@click.option("--too-long", type=click.Choice(["refuse", "skip"]), default=None,
              help="A prompt that cannot fit --max-new-tokens in the teacher's context: stop, or skip and count it. "
                   "[default: refuse]")
@click.option("-k", "k", type=int, default=None, help="Stored top-K entries per generated token. [default: 32]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Teacher dtype.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto. [default: auto]")
@click.option("--seed", type=int, default=None, help="Seeds every sample (with its prompt id and index). [default: 0]")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow the teacher's own Python code.")
@click.option("--num-partitions", type=int, default=None, help="Split the prompts into N independent partitions. "
              "[default: 1; --engine ray: as many as the cluster runs at once]")
@click.option("--partition", type=int, default=None, help="Which partition this process generates (0-based).")
@engine_options
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="generate.toml; flags override it.")
def generate(prompts: str, config_file: str | None, **flags: Any) -> None:
    """Sample teacher completions for PROMPTS and store them with the teacher's per-token top-K and checked answers.

    PROMPTS is a .jsonl or .parquet file or a saved HF datasets folder, one prompt (text or a
    messages list) per record, optionally with a reference answer. Rerunning the same command
    resumes after a crash or Ctrl-C. docs/generate.md has the details.

    \b
    Example:
      kdstore generate problems.jsonl --out gens -n 4 --temperature 0.8 --stop "\\n\\n"
      kdstore generate chats.parquet --teacher ./chat-model --chat-template --system "Be brief." --out gens
      kdstore generate gsm.jsonl --teacher ./model --out gens --answer-extractor boxed --config generate.toml
      kdstore generate /shared/p.jsonl --teacher /shared/model --out /shared/gens --engine ray --ray-address head:6379
    """
    from kdstore.generate import generate as run_generate
    from kdstore.generate import resolved_config

    stop = tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in flags["stop"])  # a shell passes \n as two characters
    config = resolved_config({**flags, "prompts": prompts, "stop": stop or None}, config_file)
    for line in run_generate(config).summary_lines():
        click.echo(line)


@cli.command()
@click.argument("source")
@click.argument("target")
@click.option("--source-option", "source_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for a remote SOURCE (repeatable).")
@click.option("--target-option", "target_options", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for a remote TARGET (repeatable).")
def copy(source: str, target: str, source_options: tuple[str, ...], target_options: tuple[str, ...]) -> None:
    """Copy a store between any two locations (folder, s3://, gs://, ...), verified on arrival, manifest last.

    Every file is checked against the manifest's sha256 as it is read and again
    where it arrived. Rerun the same command to resume an interrupted copy.

    \b
    Example:
      kdstore copy my-store s3://bucket/stores/my-store --target-option endpoint_url=http://minio:9000
      kdstore copy s3://bucket/stores/my-store ./local-copy
    """
    from kdstore.transfer import copy_store

    result = copy_store(source, target, _options(source_options, "--source-option"),
                        _options(target_options, "--target-option"))
    click.echo(f"copied {result.num_files_copied} file(s), {result.num_bytes_copied:,} bytes; "
               f"{result.num_files_present} already there; {target} is complete")


@cli.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="New local folder for the merged store.")
@storage_option
def merge(stores: tuple[str, ...], out: str, storage_options: tuple[str, ...]) -> None:
    """Merge stores of the same teacher, tokenizer and codec into one new store; repeated sequence ids are dropped.

    \b
    Example:
      kdstore merge run-a/store run-b/store --out merged-store && kdstore verify merged-store
    """
    from kdstore.transfer import merge_stores

    result = merge_stores(list(stores), out, _options(storage_options))
    kept = ", ".join(f"{part['location']}: {part['num_sequences']:,}" for part in result.per_store)
    click.echo(f"merged {result.num_sequences:,} sequences into {out} ({kept}; {result.num_duplicates:,} repeated ids dropped)")
    for note in result.notes:
        click.echo(note)


@cli.command()
@store_argument
@click.option("--to", "target", type=click.Choice(["arrow"]), required=True, help="What to convert the store to.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Folder for the copy. [default: STORE/_cache/arrow; required for a remote STORE]")
@storage_option
def convert(store: str, target: str, cache_dir: str | None, storage_options: tuple[str, ...]) -> None:
    """Write the uncompressed Arrow copy that the memory-mapped loader reads (otherwise made on first use).

    STORE is a folder or an fsspec URL (s3://, gs://, ...). The copy is checked
    against the manifest's sha256s, written atomically and reused until the
    shards change.

    \b
    Example:
      kdstore convert my-store --to arrow
      kdstore convert s3://bucket/store --to arrow --cache-dir /scratch/kd --storage-option endpoint_url=http://minio:9000
    """
    from kdstore.arrow_copy import convert_to_arrow

    path = convert_to_arrow(store, cache_dir, _options(storage_options))
    click.echo(f"{target} copy: {path} ({path.stat().st_size:,} bytes)")


@cli.command()
@store_argument
@click.option("--format", "export_format", type=click.Choice(["axolotl", "hf"]), required=True,
              help="axolotl: the columns of axolotl's KD plugin; hf: every decoded column (docs/export.md).")
@click.option("--out", required=True, help="New or empty local folder for the export.")
@click.option("--temperature", type=float, default=None,
              help="axolotl: teacher temperature of target_logprobs; give axolotl's kd_temperature. [default: 1]")
@click.option("--top-k-only", is_flag=True, help="axolotl: export a store with sampled draws by its top-K alone.")
@storage_option
def export(store: str, export_format: str, out: str, temperature: float | None, top_k_only: bool,
           storage_options: tuple[str, ...]) -> None:
    """Write STORE's teacher outputs, decoded, as Parquet for another trainer (HF datasets loads it).

    \b
    Example:
      kdstore export my-store --format axolotl --out my-store-axolotl
      kdstore export my-store --format hf --out my-store-hf
      python -c "import datasets; print(datasets.load_dataset('my-store-axolotl'))"
    """
    from kdstore.export import export_store

    result = export_store(store, out, export_format, temperature=temperature, top_k_only=top_k_only,
                          storage_options=_options(storage_options))
    for line in result.summary_lines():
        click.echo(line)


@cli.command()
@store_argument
@click.option("--student", default=None,
              help="A transformers config.json (new student), a model folder, or preset:quarter / preset:half "
                   "(a smaller copy of the store's teacher).")
@click.option("--out", default=None, help="Run folder: checkpoint/, metrics.jsonl, student/. [default: kdstore-run]")
@click.option("--loss", default=None, help="forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, taid or sampled_kl.")
@click.option("--ce-weight", type=float, default=None, help="Weight of the next-token CE: (1-w) KD + w CE. [default: 0]")
@click.option("--steps", type=int, default=None, help="Optimizer steps. [default: 1000]")
@click.option("--batch-size", type=int, default=None, help="Sequences per micro-batch per rank. [default: 8]")
@click.option("--lr", type=float, default=None, help="Peak AdamW learning rate. [default: 1e-3]")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step. [default: 1]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="bf16: autocast the student's forward and loss (weights stay fp32). [default: fp32]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="train.toml; flags override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where its checkpoint stopped.")
@click.option("--quiet", is_flag=True, help="No progress bar and no per-step lines (RUN/metrics.jsonl has every step).")
@storage_option
def train(store: str, config_file: str | None, resume: bool, quiet: bool, storage_options: tuple[str, ...],
          **flags: Any) -> None:
    """Distil a student causal LM from STORE: AdamW + cosine, validation, exact-resume checkpoints.

    Every setting (warmup, grad_accum, val_every, the loss's temperature, beta, ...) can be given in
    --config (top-level keys, the loss's under [loss]); the resolved config is saved in the checkpoint
    and a resumed run must match it. Runs unchanged under torchrun (one process per rank). A progress
    bar shows on a terminal; every logged step goes to RUN/metrics.jsonl (docs/train.md).

    \b
    Example:
      kdstore train my-store --student preset:quarter --out run --steps 300
      kdstore train my-store --student student.json --out run --loss forward_kl --steps 2000
      kdstore train my-store --student student.json --out run --steps 2000 --resume
      kdstore train my-store --student student.json --out run --precision bf16 --batch-size 16 --grad-accum 4
      torchrun --nproc-per-node 2 -m kdstore.cli.main train my-store --config train.toml
      kdstore train s3://bucket/store --student student.json --out run --storage-option endpoint_url=http://minio:9000
    """
    from kdstore.train import resolved_config
    from kdstore.train import train as run_train

    run_train(resolved_config({**flags, "store": store}, config_file), resume=resume, log=click.echo,
              storage_options=_options(storage_options), progress=False if quiet else None, log_steps=not quiet)


@cli.command()
@store_argument
@click.option("--reference", required=True, help="Reference model folder: the store's tokenizer, far smaller than the teacher.")
@click.option("--per-token", is_flag=True, help="Also keep each position's reference log-prob (token-level selection).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Reference dtype.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--batch-tokens", type=int, default=8192, show_default=True, help="Tokens per reference batch, padding included.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the reference's own Python code.")
@click.option("--num-partitions", type=int, default=1, show_default=True,
              help="Split the pass into N independent partitions (--engine ray: 1 means as many as the cluster runs "
                   "at once).")
@click.option("--partition", type=int, default=0, show_default=True, help="Which partition this process scores (0-based).")
@engine_options
def score(store: str, **flags: Any) -> None:
    """Score every sequence of STORE with a small reference model, for `kdstore select`.

    Writes one score file per shard (STORE/scores/, listed in the manifest with sha256): the teacher's and the
    reference's mean log-prob per predicted token (the teacher's from the store itself). The logits shards are
    not rewritten. Rerunning the same command resumes after a crash or Ctrl-C.

    \b
    Example:
      kdstore score my-store --reference ./small-model
      kdstore score my-store --reference ./small-model --per-token --device cuda
      kdstore score /shared/store --reference /shared/small-model --engine ray --ray-address head:6379
    """
    from kdstore.score import ScoreConfig, score_store

    config = ScoreConfig(store=store, **{name: value for name, value in flags.items() if value is not None})
    for line in score_store(config).summary_lines():
        click.echo(line)


@cli.command()
@store_argument
@click.option("--out", required=True, help="New local folder for the view (or, with --materialize, the store).")
@click.option("--by", type=click.Choice(["difference", "teacher-nll", "reference-nll", "ratio"]), default="difference",
              show_default=True, help="Score to rank by; difference = reference NLL - teacher NLL (MiniPLM).")
@click.option("--keep", type=float, default=0.5, show_default=True, help="Fraction kept, in (0, 1].")
@click.option("--sample", type=float, default=None, metavar="TEMPERATURE",
              help="Draw the kept sequences with P ~ exp(score / TEMPERATURE) instead of taking the top.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample.")
@click.option("--lowest", is_flag=True, help="Keep the lowest scores instead of the highest.")
@click.option("--where", default=None, metavar="SQL", help="Only sequences satisfying this condition over the score "
              "columns (teacher_score, reference_score, difference, ratio, num_tokens, ...) are candidates.")
@click.option("--materialize", is_flag=True, help="Write the kept rows as new shards instead of a view.")
def select(store: str, **flags: Any) -> None:
    """Keep the sequences of a scored STORE worth distilling (MiniPLM difference sampling).

    Writes a view: a folder whose manifest names STORE and the kept sequence ids, checked against STORE's
    hashes whenever it is opened; every command and loader reads it like a store. Corpus order is kept.

    \b
    Example:
      kdstore score my-store --reference ./small-model
      kdstore select my-store --by difference --keep 0.5 --out half
      kdstore select my-store --keep 0.5 --sample 0.5 --where "num_tokens > 64" --out sampled
      kdstore select my-store --keep 0.3 --materialize --out top-store
    """
    from kdstore.selection import SelectConfig
    from kdstore.selection import select as run_select

    for line in run_select(SelectConfig(store=store, **flags)).summary_lines():
        click.echo(line)


def main() -> None:
    cli(prog_name="kdstore")


if __name__ == "__main__":
    main()
