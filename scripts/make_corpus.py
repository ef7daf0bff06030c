"""Generate the template-based part of the sample corpus (kdstore/assets/corpus/generated_*.txt).

Most of the corpus is hand-written prose; this script adds a deterministic,
smaller amount of templated text -- arithmetic word problems with worked
answers, and simple number, time and calendar facts -- so that the bundled
teacher sees some text whose continuation is exactly predictable next to the
open-ended prose. The output depends only on the seed: rerunning it rewrites
the same bytes.

Run from the repository root::

    .venv/bin/python scripts/make_corpus.py            # writes the two files
    .venv/bin/python scripts/make_corpus.py --check    # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "kdstore/assets/corpus"

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Ella", "Femi", "Gus", "Hana", "Ivo", "Jade", "Kofi", "Lina", "Max",
         "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tess", "Uma", "Vic", "Wen", "Yara", "Zak"]
ITEMS = [("apple", "apples"), ("marble", "marbles"), ("book", "books"), ("stamp", "stamps"), ("shell", "shells"),
         ("pencil", "pencils"), ("card", "cards"), ("biscuit", "biscuits"), ("sticker", "stickers"), ("egg", "eggs"),
         ("plum", "plums"), ("button", "buttons"), ("coin", "coins"), ("seed", "seeds"), ("bead", "beads")]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("tray", "trays"),
              ("crate", "crates"), ("tin", "tins"), ("packet", "packets")]
PLACES = ["the library", "the park", "the market", "school", "the station", "the beach", "the farm", "the museum"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    """English words for 0 <= n < 10000."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + words(rest))
    rest = n % 1000
    head = words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + words(rest)


def plural(n: int, pair: tuple[str, str]) -> str:
    return f"{n} {pair[0] if n == 1 else pair[1]}"


def clock(minutes: int) -> str:
    minutes %= 24 * 60
    return f"{minutes // 60}:{minutes % 60:02d}"


def duration(minutes: int) -> str:
    h, m = divmod(minutes, 60)
    parts = []
    if h:
        parts.append(f"{h} hour" + ("s" if h != 1 else ""))
    if m:
        parts.append(f"{m} minute" + ("s" if m != 1 else ""))
    return " and ".join(parts) or "0 minutes"


# ----------------------------------------------------------------------------- word problems

def problem_add_sub(r: random.Random) -> str:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(5, 60), r.randint(1, 20), r.randint(1, 30)
    b = min(b, a)
    other = r.choice([n for n in NAMES if n != name])
    return (f"Question: {name} has {plural(a, item)}. {name} gives {b} to {other} and then finds {c} more. "
            f"How many {item[1]} does {name} have now?\n"
            f"Answer: {a} - {b} = {a - b}, and {a - b} + {c} = {a - b + c}. {name} has {plural(a - b + c, item)}.")


def problem_groups(r: random.Random) -> str:
    name, item, box = r.choice(NAMES), r.choice(ITEMS), r.choice(CONTAINERS)
    n, k = r.randint(2, 12), r.randint(2, 12)
    return (f"Question: {name} has {plural(n, box)} with {plural(k, item)} in each. How many {item[1]} is that?\n"
            f"Answer: {n} x {k} = {n * k}. That is {plural(n * k, item)}.")


def problem_share(r: random.Random) -> str:
    item = r.choice(ITEMS)
    people, each = r.randint(2, 9), r.randint(2, 12)
    left = r.randint(0, people - 1)
    total = people * each + left
    ans = f"{total} / {people} = {each}"
    if left:
        ans += f" remainder {left}. Each child gets {plural(each, item)}, with {left} left over"
    else:
        ans += f". Each child gets {plural(each, item)}"
    return (f"Question: {plural(total, item).capitalize()} are shared equally among {words(people)} children. "
            f"How many does each child get?\nAnswer: {ans}.")


def problem_money(r: random.Random) -> str:
    name = r.choice(NAMES)
    price = r.randint(5, 95) * 5  # pence
    qty = r.randint(2, 6)
    cost = price * qty
    paid = (cost // 500 + 1) * 500
    def money(p: int) -> str:
        return f"{p // 100}.{p % 100:02d}"
    item = r.choice(ITEMS)
    return (f"Question: {name} buys {plural(qty, item)} at {money(price)} pounds each and pays with "
            f"{paid // 100} pounds. How much change does {name} get?\n"
            f"Answer: {qty} x {money(price)} = {money(cost)} pounds. The change is {money(paid)} - {money(cost)} = "
            f"{money(paid - cost)} pounds.")


def problem_time(r: random.Random) -> str:
    start = r.randint(6 * 60, 20 * 60) // 5 * 5
    length = r.randint(15, 200) // 5 * 5
    place = r.choice(PLACES)
    name = r.choice(NAMES)
    return (f"Question: {name} leaves for {place} at {clock(start)} and the trip takes {duration(length)}. "
            f"What time does {name} arrive?\n"
            f"Answer: {clock(start)} plus {duration(length)} is {clock(start + length)}.")


def problem_speed(r: random.Random) -> str:
    speed, hours = r.randint(3, 60), r.randint(2, 6)
    who = r.choice(["A cyclist", "A walker", "A boat", "A van", "A runner", "A bus"])
    return (f"Question: {who} travels at {speed} kilometres per hour for {hours} hours. How far does it go?\n"
            f"Answer: {speed} x {hours} = {speed * hours}. It goes {speed * hours} kilometres.")


def problem_ages(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    young, gap = r.randint(3, 30), r.randint(1, 12)
    total = 2 * young + gap
    return (f"Question: {a} is {gap} years older than {b}. Together their ages add up to {total}. "
            f"How old is each of them?\n"
            f"Answer: Without the {gap} extra years the ages add up to {total} - {gap} = {2 * young}, so {b} is "
            f"{2 * young} / 2 = {young} and {a} is {young} + {gap} = {young + gap}.")


def problem_rectangle(r: random.Random) -> str:
    w, h = r.randint(2, 20), r.randint(2, 20)
    thing = r.choice(["garden", "room", "table", "field", "rug", "playground"])
    return (f"Question: A {thing} is {w} metres long and {h} metres wide. What are its area and perimeter?\n"
            f"Answer: The area is {w} x {h} = {w * h} square metres. The perimeter is "
            f"{w} + {h} + {w} + {h} = {2 * (w + h)} metres.")


def problem_percent(r: random.Random) -> str:
    pct = r.choice([10, 20, 25, 50, 5, 30, 40, 75])
    price = r.randint(2, 40) * 20
    off = price * pct // 100
    thing = r.choice(["coat", "lamp", "chair", "bicycle", "kettle", "rucksack", "tent", "radio"])
    return (f"Question: A {thing} costs {price} pounds. In the sale the price is cut by {pct} percent. "
            f"What is the sale price?\n"
            f"Answer: {pct} percent of {price} is {off}. The sale price is {price} - {off} = {price - off} pounds.")


PROBLEMS = [problem_add_sub, problem_groups, problem_share, problem_money, problem_time, problem_speed,
            problem_ages, problem_rectangle, problem_percent]


def make_arithmetic(r: random.Random, count: int) -> str:
    return "\n\n".join(r.choice(PROBLEMS)(r) for _ in range(count)) + "\n"


# ----------------------------------------------------------------------------- facts

def fact_times_table(r: random.Random) -> str:
    n = r.randint(2, 12)
    rows = [f"{i} x {n} = {i * n}" for i in range(1, 13)]
    return f"The {words(n)} times table\n" + "\n".join(rows)


def fact_number_words(r: random.Random) -> str:
    nums = sorted(r.sample(range(1, 10000), 6))
    return "Numbers in words\n" + "\n".join(f"{n} is written {words(n)}." for n in nums)


def fact_sums_in_words(r: random.Random) -> str:
    lines = []
    for _ in range(5):
        a, b = r.randint(1, 99), r.randint(1, 99)
        if r.random() < 0.5:
            lines.append(f"{words(a).capitalize()} plus {words(b)} is {words(a + b)}.")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"{words(a).capitalize()} take away {words(b)} is {words(a - b)}.")
    return "Sums in words\n" + "\n".join(lines)


def fact_days(r: random.Random) -> str:
    i, k = r.randrange(7), r.randint(2, 20)
    d = DAYS[i]
    return (f"The day after {d} is {DAYS[(i + 1) % 7]}, and the day before {d} is {DAYS[(i - 1) % 7]}. "
            f"If today is {d}, then in {k} days it will be {DAYS[(i + k) % 7]}.")


def fact_months(r: random.Random) -> str:
    i = r.randrange(12)
    m = MONTHS[i]
    days = "28 days, or 29 in a leap year" if i == 1 else f"{MONTH_DAYS[i]} days"
    return (f"{m} is month number {i + 1} of the year. It has {days}. It comes after {MONTHS[(i - 1) % 12]} "
            f"and before {MONTHS[(i + 1) % 12]}.")


def fact_units(r: random.Random) -> str:
    kind = r.randrange(4)
    n = r.randint(2, 50)
    if kind == 0:
        return f"{n} kilometres is {n * 1000} metres, and {n} metres is {n * 100} centimetres."
    if kind == 1:
        return f"{n} kilograms is {n * 1000} grams. Half of {n} kilograms is {n * 500} grams."
    if kind == 2:
        return f"{n} hours is {n * 60} minutes, and {n} minutes is {n * 60} seconds."
    return f"{n} litres is {n * 1000} millilitres, which fills {n * 4} glasses of 250 millilitres."


def fact_sequence(r: random.Random) -> str:
    start, step = r.randint(1, 30), r.randint(2, 11)
    seq = [start + i * step for i in range(6)]
    return (f"In the pattern {', '.join(map(str, seq[:5]))}, each number is {step} more than the one before, "
            f"so the next number is {seq[5]}.")


def fact_compare(r: random.Random) -> str:
    a, b = r.sample(range(1, 1000), 2)
    big, small = max(a, b), min(a, b)
    return f"{a} and {b}: {big} is larger than {small}, and the difference between them is {big - small}."


def fact_even_odd(r: random.Random) -> str:
    n = r.randint(1, 500)
    if n % 2 == 0:
        return f"{n} is an even number, because it can be divided by two: {n} / 2 = {n // 2}."
    return f"{n} is an odd number. Dividing it by two leaves one over: {n} = 2 x {n // 2} + 1."


FACTS = [fact_number_words, fact_sums_in_words, fact_days, fact_months, fact_units, fact_sequence,
         fact_compare, fact_even_odd, fact_times_table]


def make_facts(r: random.Random, count: int) -> str:
    weights = [2, 2, 2, 2, 3, 3, 2, 2, 1]
    return "\n\n".join(r.choices(FACTS, weights)[0](r) for _ in range(count)) + "\n"


# ----------------------------------------------------------------------------- main

def outputs(seed: int) -> dict[Path, str]:
    return {
        OUT / "generated_arithmetic.txt": make_arithmetic(random.Random(seed), 170),
        OUT / "generated_facts.txt": make_facts(random.Random(seed + 1), 170),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = p.parse_args(argv)
    stale = []
    for path, text in outputs(args.seed).items():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(REPO)} ({len(text.encode()):,} bytes)")
    if stale:
        print("out of date: " + ", ".join(str(s.relative_to(REPO)) for s in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
