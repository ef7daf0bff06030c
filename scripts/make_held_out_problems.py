"""Write kdstore/assets/problems/{held_out,train}.jsonl: word problems of the bundled corpus's kinds it does not hold.

    python scripts/make_held_out_problems.py            # rewrite the files
    python scripts/make_held_out_problems.py --check    # exit 1 if they are out of date

The problems come from scripts/make_corpus.py's own templates with another seed (the corpus uses 1234-derived
seeds; this uses 20261130), keeping only the kinds with one numeric answer (change, arrival time, totals, sale
price, distance) and only questions that appear nowhere in kdstore/assets/corpus. train.jsonl (seed 20261131,
400 problems) holds none of held_out.jsonl's questions either: docs/generate.md trains students on the
teacher's completions of it and scores them on held_out.jsonl. Each record is
{"id", "prompt": "Question: ...\\nAnswer:", "answer"}: the prompt stops where the teacher's worked answer
begins, and the answer is the last number of the template's worked answer. Original text, CC0 like the corpus.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_corpus  # noqa: E402

ROOT = Path(__file__).parents[1]
FOLDER = ROOT / "kdstore" / "assets" / "problems"
KINDS = [make_corpus.problem_add_sub, make_corpus.problem_groups, make_corpus.problem_money, make_corpus.problem_time,
         make_corpus.problem_speed, make_corpus.problem_percent]
FILES = {"held_out.jsonl": (20261130, 200, "held-out"), "train.jsonl": (20261131, 400, "train")}


def make(seed: int, count: int, prefix: str, avoid: str) -> str:
    corpus = "\n".join(p.read_text() for p in sorted((ROOT / "kdstore" / "assets" / "corpus").glob("*.txt")))
    r, lines, seen = random.Random(seed), [], set()
    while len(lines) < count:
        question, answer = r.choice(KINDS)(r).split("\nAnswer: ")
        if question in seen or question in corpus or json.dumps(question + "\nAnswer:") in avoid:
            continue
        seen.add(question)
        numbers = [w.strip(".,") for w in answer.split() if any(ch.isdigit() for ch in w)]
        final = numbers[-1]
        lines.append(json.dumps({"id": f"{prefix}-{len(lines):04d}", "prompt": f"{question}\nAnswer:", "answer": final}))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    texts: dict[str, str] = {}
    for name, (seed, count, prefix) in FILES.items():
        texts[name] = make(seed, count, prefix, texts.get("held_out.jsonl", ""))
    if "--check" in sys.argv:
        sys.exit(0 if all((FOLDER / n).exists() and (FOLDER / n).read_text() == t for n, t in texts.items()) else 1)
    FOLDER.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (FOLDER / name).write_text(text)
        print(f"wrote {text.count(chr(10))} problems to {(FOLDER / name).relative_to(ROOT)}")
