"""Write kdstore/assets/problems/held_out.jsonl: word problems of the bundled corpus's kinds that it does not hold.

    python scripts/make_held_out_problems.py            # rewrite the file
    python scripts/make_held_out_problems.py --check    # exit 1 if it is out of date

The problems come from scripts/make_corpus.py's own templates with another seed (the corpus uses 1234-derived
seeds; this uses 20261130), keeping only the kinds with one numeric answer (change, arrival time, totals, sale
price, distance) and only questions that appear nowhere in kdstore/assets/corpus. Each record is
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
OUT = ROOT / "kdstore" / "assets" / "problems" / "held_out.jsonl"
KINDS = [make_corpus.problem_add_sub, make_corpus.problem_groups, make_corpus.problem_money, make_corpus.problem_time,
         make_corpus.problem_speed, make_corpus.problem_percent]
SEED = 20261130
COUNT = 200


def make() -> str:
    corpus = "\n".join(p.read_text() for p in sorted((ROOT / "kdstore" / "assets" / "corpus").glob("*.txt")))
    r, lines, seen = random.Random(SEED), [], set()
    while len(lines) < COUNT:
        question, answer = r.choice(KINDS)(r).split("\nAnswer: ")
        if question in seen or question in corpus:
            continue
        seen.add(question)
        numbers = [w.strip(".,") for w in answer.split() if any(ch.isdigit() for ch in w)]
        final = numbers[-1]
        lines.append(json.dumps({"id": f"held-out-{len(lines):04d}", "prompt": f"{question}\nAnswer:", "answer": final}))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = make()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {COUNT} problems to {OUT.relative_to(ROOT)}")
