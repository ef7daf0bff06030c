"""kdstore stats: every figure against the same figure computed by hand from the rows that were written.

The oracle never reads through kdstore.store: it regenerates the rows with conftest.synthetic_rows (the exact rows
write_store wrote), decodes them with kdstore.codec.decode_positions and computes each figure position by position
in plain numpy; byte counts come from pyarrow's own reading of the shard footers. Histograms are compared count for
count, the perplexity to 1e-6 relative.

Run: .venv/bin/python -m pytest tests/unit/test_stats.py
"""

from __future__ import annotations

import base64
import bisect
import json
import math
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import make_manifest, synthetic_rows, teacher_outputs, write_store
from kdstore.cli.main import cli
from kdstore.codec import CodecConfig, decode_positions
from kdstore.errors import EmptyStoreError, StatsError
from kdstore.format import logits_schema, rows_to_table
from kdstore.plots import FIGURE_PIXELS
from kdstore.stats import measure_store, store_stats
from kdstore.writer import ShardWriter

NUM_SEQUENCES, SEQ_LEN = 12, 17
# a 16-id vocabulary with K = 6: random next tokens land in the top-K often enough (~40 %) to fill every rank
CODEC = CodecConfig(k=6, vocab_size=16)
STORE_ARGS = {"num_sequences": NUM_SEQUENCES, "seq_len": SEQ_LEN, "shard_bytes": 2000, "row_group_bytes": 700}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("stats") / "store", CODEC, **STORE_ARGS)


@pytest.fixture(scope="module")
def figures(small_store) -> dict:
    return store_stats(small_store)


def by_hand(codec: CodecConfig, num_sequences: int = NUM_SEQUENCES, seq_len: int = SEQ_LEN) -> list[dict]:
    """The written rows, decoded, with each position's next token and index in its sequence."""
    rows = []
    for row in synthetic_rows(codec, num_sequences, seq_len):
        decoded = decode_positions(codec, row)
        decoded["next_tokens"] = np.asarray(row["input_ids"])[1:]
        decoded["input_ids"] = np.asarray(row["input_ids"])
        rows.append(decoded)
    return rows


def bin_of(value: float, edges: list[float]) -> int:
    """The histogram bin of one value: [edges[i], edges[i+1]), the last bin closed; outside values go to the end bins."""
    return min(max(bisect.bisect_right(edges, value) - 1, 0), len(edges) - 2)


def count_bins(values: list[float], edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for value in values:
        counts[bin_of(value, edges)] += 1
    return counts


def positions_of(rows: list[dict]):
    """(row, t, topk_ids[t], topk_logprobs[t] as float64, next token) for every position of every row."""
    for row in rows:
        for t in range(len(row["next_tokens"])):
            yield row, t, row["topk_ids"][t], row["topk_logprobs"][t].astype(np.float64), int(row["next_tokens"][t])


# -- the figures of a logits store -------------------------------------------------------
def test_counts_and_perplexity_equal_the_rows_written(figures):
    rows = by_hand(CODEC)
    targets = np.concatenate([row["target_logprob"] for row in rows]).astype(np.float64)
    assert figures["num_sequences"] == NUM_SEQUENCES
    assert figures["num_tokens"] == NUM_SEQUENCES * SEQ_LEN
    assert figures["num_positions"] == len(targets) == NUM_SEQUENCES * (SEQ_LEN - 1)
    assert figures["perplexity"] == pytest.approx(math.exp(-targets.mean()), rel=1e-6)
    assert figures["mean_target_logprob"] == pytest.approx(targets.mean(), rel=1e-6)


def test_perplexity_is_the_teachers_own_within_the_codebooks_error_bound(figures):
    rng = np.random.default_rng(0)  # conftest.synthetic_rows' draws, unquantised
    exact = np.concatenate([teacher_outputs(rng, SEQ_LEN, CODEC.vocab_size, CODEC.k)[4] for _ in range(NUM_SEQUENCES)])
    # each stored log-prob is within max_abs_logprob_error (0.125 nats) of the teacher's; so is their mean
    assert abs(math.log(figures["perplexity"]) - (-exact.mean())) <= CODEC.codebook.log_step / 2


def test_entropy_bounds_and_their_histograms_equal_a_position_by_position_sum(figures):
    lower, upper = [], []
    for row, t, _, logprobs, _ in positions_of(by_hand(CODEC)):
        head = -sum(math.exp(v) * v for v in logprobs)
        tail = math.exp(float(row["tail_logmass"][t]))
        lower.append(head - tail * math.log(tail))  # all the tail on one token
        upper.append(head + tail * (math.log(CODEC.vocab_size - CODEC.k) - math.log(tail)))  # spread evenly
    entropy = figures["entropy"]
    assert entropy["mean_lower"] == pytest.approx(np.mean(lower), rel=1e-9)
    assert entropy["mean_upper"] == pytest.approx(np.mean(upper), rel=1e-9)
    assert entropy["mean_estimate"] == pytest.approx((np.mean(lower) + np.mean(upper)) / 2, rel=1e-9)
    assert entropy["edges"] == pytest.approx(np.linspace(0, math.log(CODEC.vocab_size), 41).tolist())
    assert entropy["lower_counts"] == count_bins(lower, entropy["edges"])
    assert entropy["upper_counts"] == count_bins(upper, entropy["edges"])
    assert all(lo <= up for lo, up in zip(lower, upper)) and max(upper) <= math.log(CODEC.vocab_size) + 1e-3


def test_topk_and_tail_mass_histograms_and_the_mean_by_position(figures):
    mass, tail, by_position = [], [], [[] for _ in range(SEQ_LEN - 1)]
    for row, t, _, logprobs, _ in positions_of(by_hand(CODEC)):
        mass.append(sum(math.exp(v) for v in logprobs))
        tail.append(math.log10(math.exp(float(row["tail_logmass"][t]))))
        by_position[t].append(mass[-1])
    assert figures["topk_mass"]["edges"] == pytest.approx([i / 20 for i in range(21)])
    assert figures["topk_mass"]["counts"] == count_bins(mass, figures["topk_mass"]["edges"])
    assert figures["topk_mass"]["mean"] == pytest.approx(np.mean(mass), rel=1e-9)
    assert figures["topk_mass"]["mean_by_position"] == pytest.approx([np.mean(m) for m in by_position], rel=1e-9)
    assert figures["tail_mass"]["log10_edges"] == pytest.approx([-8 + i / 2 for i in range(17)])
    assert figures["tail_mass"]["counts"] == count_bins(tail, figures["tail_mass"]["log10_edges"])
    assert figures["tail_mass"]["mean"] == pytest.approx(np.mean([10 ** v for v in tail]), rel=1e-9)
    assert sum(figures["tail_mass"]["counts"]) == figures["num_positions"]


def test_rank_histogram_counts_each_next_token_by_its_place_in_the_sorted_top_k(figures):
    counts, outside = [0] * CODEC.k, 0
    for _, _, ids, logprobs, token in positions_of(by_hand(CODEC)):
        if token not in ids:
            outside += 1
            continue
        ordered = sorted(logprobs, reverse=True)  # ties share the best place: the first equal value
        counts[ordered.index(logprobs[list(ids).index(token)])] += 1
    rank = figures["target_rank"]
    assert rank["counts"] == counts and rank["outside"] == outside
    assert sum(counts) > 3 * CODEC.k and outside > 0  # the fixture exercises every branch
    assert rank["fraction_outside"] == outside / figures["num_positions"]
    assert rank["fraction_top1"] == counts[0] / figures["num_positions"]


def test_bytes_per_column_are_the_sums_of_the_parquet_column_chunks(small_store, figures):
    manifest = json.loads((small_store / "manifest.json").read_text())
    compressed: dict[str, int] = {}
    for shard in manifest["shards"]:
        metadata = pq.ParquetFile(small_store / shard["path"]).metadata
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                name = chunk.path_in_schema.split(".")[0]
                compressed[name] = compressed.get(name, 0) + chunk.total_compressed_size
    size = figures["bytes"]
    assert {name: c["compressed"] for name, c in size["columns"].items()} == compressed
    assert list(size["columns"]) == manifest["columns"]
    num_tokens = NUM_SEQUENCES * SEQ_LEN
    assert all(c["per_token"] == c["compressed"] / num_tokens for c in size["columns"].values())
    on_disk = sum((small_store / shard["path"]).stat().st_size for shard in manifest["shards"])
    assert size["file_bytes"] == on_disk and size["other_bytes"] == on_disk - sum(compressed.values())
    assert size["per_token"] == on_disk / num_tokens


def test_rows_and_tokens_per_shard_are_counted_from_each_shard(small_store, figures):
    manifest = json.loads((small_store / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3  # several shards, each of several row groups
    expected = []
    for shard in manifest["shards"]:
        table = pq.read_table(small_store / shard["path"], columns=["input_ids"])
        expected.append({"path": shard["path"], "num_rows": table.num_rows,
                         "num_tokens": sum(len(ids) for ids in table.column("input_ids").to_pylist()),
                         "num_bytes": (small_store / shard["path"]).stat().st_size,
                         "num_row_groups": pq.ParquetFile(small_store / shard["path"]).num_row_groups})
    assert figures["shards"] == expected and figures["num_shards"] == len(expected)
    assert sum(s["num_row_groups"] for s in expected) > len(expected)


# -- other kinds of store ------------------------------------------------------------------
def test_a_sampled_store_reports_distinct_ids_and_draws_per_position(tmp_path):
    codec = CodecConfig(k=6, vocab_size=16, sampled_draws=8)
    figures = store_stats(write_store(tmp_path / "sampled", codec, **STORE_ARGS))
    unique, in_topk, draws = [0] * 9, 0, 0
    for row in by_hand(codec):
        offsets = row["sampled_offsets"]
        for t in range(len(offsets) - 1):
            ids = row["sampled_ids"][offsets[t]:offsets[t + 1]]
            counts = row["sampled_counts"][offsets[t]:offsets[t + 1]]
            unique[len(ids)] += 1
            draws += int(counts.sum())
            in_topk += sum(int(c) for i, c in zip(ids, counts) if i in row["topk_ids"][t])
    sampled = figures["sampled"]
    assert sampled["unique_ids_counts"] == unique and sum(unique) == figures["num_positions"]
    assert sampled["mean_unique_ids"] == pytest.approx(sum(n * c for n, c in enumerate(unique)) / sum(unique))
    assert sampled["draws_per_position"] == draws / figures["num_positions"] == 8
    assert sampled["fraction_draws_in_topk"] == in_topk / draws
    assert (sampled["draws"], sampled["mode"], sampled["scheme"]) == (8, "full", "iid")
    assert store_stats(write_store(tmp_path / "plain", CODEC, num_sequences=2))["sampled"] is None


def test_score_columns_are_summarised_with_nulls_counted(tmp_path):
    schema = logits_schema(CODEC, ("teacher_score",))
    scores = [-2.5, None, -0.75, -20.0, -3.25, None]  # -20 lies below the histogram: counted in its first bin
    manifest = make_manifest(CODEC)
    with ShardWriter(tmp_path / "scored", manifest, schema, row_group_bytes=1000) as writer:
        for row, score in zip(synthetic_rows(CODEC, len(scores), SEQ_LEN), scores):
            writer.write(rows_to_table(schema, [{**row, "teacher_score": score}]))
    score = store_stats(tmp_path / "scored")["scores"]["teacher_score"]
    present = [s for s in scores if s is not None]
    assert (score["count"], score["num_null"]) == (4, 2)
    assert score["mean"] == pytest.approx(np.mean(present)) and (score["min"], score["max"]) == (-20.0, -0.75)
    assert score["counts"] == count_bins(present, score["edges"]) and score["counts"][0] == 1
    measure_store(tmp_path / "scored", plot_dir=tmp_path / "plots")
    assert png_size((tmp_path / "plots" / "scores.png").read_bytes()) == FIGURE_PIXELS


def test_a_store_without_tail_or_target_uses_one_minus_the_topk_mass_and_has_no_perplexity(tmp_path):
    codec = CodecConfig(k=6, vocab_size=16, tail=False, target=False)
    figures = store_stats(write_store(tmp_path / "bare", codec, **STORE_ARGS))
    tails = [max(1 - sum(math.exp(v) for v in logprobs), 0.0) for _, _, _, logprobs, _ in positions_of(by_hand(codec))]
    assert figures["perplexity"] is None and figures["mean_target_logprob"] is None
    assert figures["tail_mass"]["source"] == "1 - topk_mass"
    assert figures["tail_mass"]["counts"] == count_bins([math.log10(max(t, 1e-300)) for t in tails],
                                                        figures["tail_mass"]["log10_edges"])
    assert sum(figures["target_rank"]["counts"]) > 0  # ranks need only the ids and the tokens


def test_a_store_at_a_memory_url_gives_the_same_json_as_the_local_folder(small_store, figures, tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"/stats-{tmp_path.name}"
    for path in small_store.rglob("*"):
        if path.is_file():
            fs.pipe(f"{root}/{path.relative_to(small_store).as_posix()}", path.read_bytes())
    try:
        remote = store_stats(f"memory://{root}")
    finally:
        fs.rm(root, recursive=True)
    assert json.dumps(remote) == json.dumps(figures)


def test_an_empty_store_is_refused_in_one_line(tmp_path):
    with pytest.raises(EmptyStoreError, match="no sequences") as caught:
        store_stats(write_store(tmp_path / "empty", CODEC, num_sequences=0))
    assert "\n" not in caught.value.one_line()


def stats_peak_memory(*stores: Path) -> list[int]:
    """Peak traced bytes of ``store_stats`` on each store, after a first run has imported and cached what it needs."""
    store_stats(stores[0])
    peaks = []
    for store in stores:
        tracemalloc.start()
        store_stats(store)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return peaks


def test_memory_stays_flat_when_the_store_grows_eightfold(tmp_path):
    """Peak traced memory (numpy and Python; pyarrow's pool reads one row group at a time by construction) of a
    store 8x the size stays within 1.5x: a reader that held every row group would need ~8x."""
    small = write_store(tmp_path / "small", CODEC, num_sequences=16, seq_len=129, row_group_bytes=20_000)
    large = write_store(tmp_path / "large", CODEC, num_sequences=128, seq_len=129, row_group_bytes=20_000)
    peaks = stats_peak_memory(small, large)
    assert pq.ParquetFile(next((large / "shards").glob("*.parquet"))).num_row_groups >= 8
    assert peaks[1] < 1.5 * peaks[0], peaks


# -- plots and the HTML report --------------------------------------------------------------
def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and every chunk's CRC up to IEND."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, kinds = 8, []
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind}"
        kinds.append(kind)
        offset += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds and offset == len(data)
    return struct.unpack(">II", data[16:24])


def test_plots_are_valid_pngs_of_the_stated_size_and_the_html_holds_each_inline(small_store, tmp_path):
    plots, report = tmp_path / "plots", tmp_path / "report.html"
    figures, written = measure_store(small_store, plot_dir=plots, html_path=report)
    pngs = sorted(plots.glob("*.png"))
    assert {p.stem for p in pngs} == {"target_rank", "topk_mass", "tail_mass", "mass_by_position", "entropy",
                                      "bytes_per_column", "shard_tokens"}
    assert set(written) == {*pngs, report}
    text = report.read_text()
    for png in pngs:
        assert png_size(png.read_bytes()) == FIGURE_PIXELS == (640, 400), png.name
        assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in text, png.name
    sources = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", text)
    assert len(sources) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in sources)
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", text).lower()  # base64 can spell "href"
    for reference in ("href", "<link", "<script", "url(", "@import", "http://", "https://", "<iframe", "<object"):
        assert reference not in outside_images, reference
    assert f"{figures['perplexity']:.4f}" in text and "shards/part-00000-000000.parquet" in text


def test_a_sampled_store_gets_its_own_plot(tmp_path):
    store = write_store(tmp_path / "sampled", CodecConfig(k=6, vocab_size=16, sampled_draws=8), num_sequences=3)
    measure_store(store, plot_dir=tmp_path / "plots")
    assert png_size((tmp_path / "plots" / "sampled_unique_ids.png").read_bytes()) == FIGURE_PIXELS
    assert not (tmp_path / "plots" / "scores.png").exists()


def test_output_paths_are_refused_before_the_store_is_read(small_store, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for plot_dir, html_path, message in ((notes, None, "is a file"), (notes / "plots", None, "which is a file"),
                                         (tmp_path / "a" / "b", None, "does not exist"),
                                         (None, tmp_path / "missing" / "r.html", "does not exist"),
                                         (None, tmp_path, "is a folder"), ("s3://bucket/plots", None, "not a URL")):
        with pytest.raises(StatsError, match=message):
            measure_store(tmp_path / "no-store-here", plot_dir=plot_dir, html_path=html_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_folder_that_is_not_writable_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("kdstore.stats.os.access", lambda path, mode: Path(path) != tmp_path)  # root writes anywhere
    with pytest.raises(StatsError, match="not writable"):
        measure_store(tmp_path / "no-store-here", plot_dir=tmp_path / "plots")
    with pytest.raises(StatsError, match="not writable"):
        measure_store(tmp_path / "no-store-here", html_path=tmp_path / "report.html")


# -- the command ----------------------------------------------------------------------------
def test_stats_command_prints_the_table_and_the_same_json(small_store, figures):
    table = CliRunner().invoke(cli, ["stats", str(small_store)])
    assert table.exit_code == 0, table.output
    assert f"teacher perplexity    {figures['perplexity']:.4f}" in table.output
    as_json = CliRunner().invoke(cli, ["stats", str(small_store), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output) == json.loads(json.dumps(figures))


# -- a training run (kdstore train's metrics.jsonl) -----------------------------------------
RUN_ROWS = [  # the line format of docs/train.md; step 30 validates without logging
    {"step": 10, "loss": 4.0, "kd": 3.0, "ce": 7.0, "lr": 0.001, "tokens_per_s": 1000.0, "epoch": 0, "time": 1.7e9},
    {"step": 20, "loss": 3.0, "kd": 2.5, "ce": 6.0, "lr": 0.0008, "tokens_per_s": 3000.0, "val_loss": 6.5, "epoch": 0,
     "time": 1.7e9 + 1},
    {"step": 30, "val_loss": 6.25, "epoch": 1, "time": 1.7e9 + 2},
    {"step": 40, "loss": 3.5, "kd": 2.75, "ce": 5.5, "lr": 0.0002, "tokens_per_s": 2000.0, "epoch": 1, "time": 1.7e9 + 3},
]


def write_run(folder: Path, rows: list[dict] = RUN_ROWS, tail: str = "") -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return folder


def test_run_figures_equal_the_numbers_worked_out_by_hand(tmp_path):
    from kdstore.run_stats import run_stats

    run = write_run(tmp_path / "run", tail='{"step": 50, "lo')  # the run is still writing its last line
    f = run_stats(run)
    assert (f["num_steps"], f["num_logged"], f["num_validations"]) == (40, 3, 2)
    assert f["loss"] == {"first": 4.0, "last": 3.5, "min": 3.0, "min_step": 20}
    assert (f["last_val_loss"], f["last_val_step"]) == (6.25, 30)
    assert f["mean_tokens_per_s"] == (1000 + 3000 + 2000) / 3 and f["final_lr"] == 0.0002
    assert f["curves"] == {"step": [10, 20, 40], "loss": [4.0, 3.0, 3.5], "kd": [3.0, 2.5, 2.75], "ce": [7.0, 6.0, 5.5],
                           "lr": [0.001, 0.0008, 0.0002], "tokens_per_s": [1000.0, 3000.0, 2000.0],
                           "val_step": [20, 30], "val_loss": [6.5, 6.25]}


def test_stats_command_on_a_run_folder_prints_the_run_table_and_its_json(tmp_path):
    run = write_run(tmp_path / "run")
    table = CliRunner().invoke(cli, ["stats", str(run)])
    assert table.exit_code == 0, table.output
    assert "training loss         first 4.0000, last 3.5000, min 3.0000 (step 20)" in table.output
    assert "validation loss       6.2500 (step 30)" in table.output and "mean 2000 over" in table.output
    assert "final lr              0.0002" in table.output
    as_json = CliRunner().invoke(cli, ["stats", str(run), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["loss"]["min_step"] == 20


def test_run_curves_are_valid_pngs_of_the_stated_size_and_the_html_holds_each_inline(tmp_path):
    from kdstore.run_stats import measure_run

    run, plots, report = write_run(tmp_path / "run"), tmp_path / "plots", tmp_path / "report.html"
    figures, written = measure_run(run, plot_dir=plots, html_path=report)
    pngs = sorted(plots.glob("*.png"))
    assert {p.stem for p in pngs} == {"loss", "lr", "tokens_per_s"} and set(written) == {*pngs, report}
    text = report.read_text()
    for png in pngs:
        assert png_size(png.read_bytes()) == FIGURE_PIXELS, png.name
        assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in text, png.name
    sources = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", text)
    assert len(sources) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in sources)
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", text).lower()
    for reference in ("href", "<link", "<script", "url(", "@import", "http://", "https://", "<iframe", "<object"):
        assert reference not in outside_images, reference
    assert "first 4.0000, last 3.5000" in text


def test_an_empty_or_broken_metrics_file_and_a_folder_that_is_neither_are_refused_in_one_line(tmp_path):
    from kdstore.errors import TrainError
    from kdstore.run_stats import is_run_folder, measure_run

    empty = write_run(tmp_path / "empty", rows=[])
    with pytest.raises(StatsError, match="metrics.jsonl holds no logged step"):
        measure_run(empty, plot_dir=tmp_path / "plots")
    broken = write_run(tmp_path / "broken", tail="not json\n" + json.dumps(RUN_ROWS[0]) + "\n")
    with pytest.raises(TrainError, match=r"broken/metrics.jsonl line 5 is not a JSON object"):
        measure_run(broken, html_path=tmp_path / "report.html")
    (tmp_path / "neither").mkdir()
    with pytest.raises(StatsError, match="neither a store .no manifest.json. nor a training run folder .no metrics"):
        is_run_folder(tmp_path / "neither")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "neither"]
