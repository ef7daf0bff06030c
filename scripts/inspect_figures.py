"""Remake the pictures and figures of docs/inspect.md.

    python scripts/inspect_figures.py [--work DIR]

Builds three stores with the bundled tiny teacher and measures each with
`kdstore stats`:

- healthy: the README's first command (`kdstore build`, bundled corpus, K=64);
- wrong-corpus: the same teacher on the bundled corpus with every word spelled
  backwards, text it never saw (same tokenizer, same token counts per word);
- flat-k4: a flattened copy of the teacher (its final norm scaled by 0.25,
  so every logit is a quarter of the original: temperature 4) stored with K=4.

Writes the PNGs into docs/img/inspect/<store>/ and prints the table that
docs/inspect.md quotes. Takes about two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
PICTURES = ("target_rank.png", "topk_mass.png", "tail_mass.png", "mass_by_position.png")


def kdstore(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "kdstore.cli.main", *args], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"kdstore {' '.join(args)} failed:\n{run.stdout}{run.stderr}")
    return run.stdout


def reversed_corpus(out: Path) -> Path:
    from kdstore.build import DEFAULT_CORPUS

    out.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(DEFAULT_CORPUS).glob("*.txt")):
        text = source.read_text(encoding="utf-8")
        (out / source.name).write_text(re.sub(r"[A-Za-z]+", lambda m: m.group(0)[::-1], text), encoding="utf-8")
    return out


def flat_teacher(out: Path, scale: float = 0.25) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdstore.build import DEFAULT_TEACHER

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_TEACHER)
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)  # tied embeddings: every logit scales by `scale`
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(DEFAULT_TEACHER).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the stores (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kdstore-figures-"))
    from kdstore.build import DEFAULT_TEACHER

    stores = {
        "healthy": [],
        "wrong-corpus": [str(reversed_corpus(work / "reversed-corpus")), "--teacher", DEFAULT_TEACHER],
        "flat-k4": ["--teacher", str(flat_teacher(work / "flat-teacher")), "-k", "4"],
    }
    rows = []
    for name, build_args in stores.items():
        store = work / name
        kdstore("build", *build_args, "--out", str(store))
        plots = work / f"{name}-plots"
        figures = json.loads(kdstore("stats", str(store), "--json", "--plot", str(plots)))
        target = DOCS / "img" / "inspect" / name
        target.mkdir(parents=True, exist_ok=True)
        for picture in PICTURES:
            shutil.copyfile(plots / picture, target / picture)
        rows.append((name, figures))
    print_table(rows)


FIGURES = (  # label, how to read it from `kdstore stats --json`
    ("K", lambda f: f"{f['k']}"),
    ("teacher perplexity", lambda f: f"{f['perplexity']:.1f}"),
    ("next token at rank 1", lambda f: f"{f['target_rank']['fraction_top1']:.1%}"),
    ("next token outside the top-K", lambda f: f"{f['target_rank']['fraction_outside']:.1%}"),
    ("mean top-K mass", lambda f: f"{f['topk_mass']['mean']:.3f}"),
    ("positions with top-K mass below 0.5", lambda f: f"{below(f['topk_mass'], 0.5):.1%}"),
    ("entropy bounds, nats", lambda f: f"{f['entropy']['mean_lower']:.2f} .. {f['entropy']['mean_upper']:.2f}"),
    ("bytes per token", lambda f: f"{f['bytes']['per_token']:.1f}"),
)


def below(histogram: dict, edge: float) -> float:
    """Share of a fixed-edge histogram's counts in bins that end at or below ``edge``."""
    counts, edges = histogram["counts"], histogram["edges"]
    return sum(c for c, upper in zip(counts, edges[1:]) if upper <= edge + 1e-12) / max(1, sum(counts))


def print_table(rows: list[tuple[str, dict]]) -> None:
    print("| figure | " + " | ".join(name for name, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label, read in FIGURES:
        print(f"| {label} | " + " | ".join(read(figures) for _, figures in rows) + " |")

if __name__ == "__main__":
    main()
