"""Answers: pull an answer out of a completion, compare it with the reference, and find the majority.

    extract = answer_extractor(AnswerConfig(extractor="numeric"))
    extract("6 + 25 = 31. Vic has 31 buttons.")            # "31"
    answers_match("31.0", "31")                           # True (math-verify)
    majority(["31", "30", "31", None])                    # ("31", 0.5)

Extractors (``AnswerConfig.extractor``):
* ``numeric``: the last number in the text (``-1,234.5`` -> ``-1234.5``; a time such as ``11:15`` stays whole);
* ``boxed``: the content of the last ``\\boxed{...}`` (nested braces followed), else what follows the last
  "the answer is" up to the end of its sentence;
* ``regex``: the first capture group (else the whole match) of the last match of ``AnswerConfig.pattern``.
A completion without an answer gets None: counted and flagged (``correct`` is false), never dropped.

Comparison: equal after normalisation (spaces, a trailing full stop, ``$``, case), else equal as mathematics
by the math-verify library (``31`` = ``31.0`` = ``\\frac{62}{2}``), which is tried only when both sides
look like mathematics (digits, operators, LaTeX; no ``:``): it reads ``11:15`` as 11.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from kdstore.errors import GenerateError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?::\d\d)?|-?\.\d+")
_ANSWER_IS = re.compile(r"the (?:final )?answer is[:\s]*", re.IGNORECASE)
_DECIMAL = re.compile(r"^-?\d+(?:\.\d+)?$")
_MATHS = re.compile(r"^[\s\d.,+\-*/^()\[\]{}=\\a-zA-Z%$]*\d[\s\d.,+\-*/^()\[\]{}=\\a-zA-Z%$]*$")


@dataclass(frozen=True)
class AnswerConfig:
    extractor: Literal["numeric", "boxed", "regex", "none"] = "numeric"
    pattern: str | None = None  # for "regex"; its first group is the answer


def answer_extractor(config: AnswerConfig) -> Callable[[str], str | None]:
    """The function text -> answer (or None) that ``config`` names; GenerateError for a bad pattern."""
    if config.extractor == "regex":
        if not config.pattern:
            raise GenerateError("--answer-extractor regex needs --answer-pattern", hint="e.g. --answer-pattern 'is (\\d+)'")
        try:
            compiled = re.compile(config.pattern)
        except re.error as exc:
            raise GenerateError(f"--answer-pattern {config.pattern!r} is not a regular expression: {exc}") from None
        return lambda text: _regex_answer(compiled, text)
    if config.pattern:
        raise GenerateError(f"--answer-pattern is only read by --answer-extractor regex, not {config.extractor}",
                            hint="add --answer-extractor regex, or drop --answer-pattern")
    return {"numeric": numeric_answer, "boxed": boxed_answer, "none": lambda text: None}[config.extractor]


def numeric_answer(text: str) -> str | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number[:-1] if number.endswith(".") else number


def boxed_answer(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, begin = 0, start + len("\\boxed{")
        for index in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth < 0:
                return text[begin:index].strip()
        return None  # an unclosed box: no answer
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    answer = re.split(r"\.(?!\d)|\n", rest, maxsplit=1)[0].strip()
    return answer or None


def _regex_answer(pattern: re.Pattern[str], text: str) -> str | None:
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if pattern.groups else last.group(0)).strip() or None


def normalise(answer: str) -> str:
    return " ".join(answer.strip().strip("$").rstrip(".").split()).lower()


def answers_match(answer: str | None, reference: str | None) -> bool:
    """Whether ``answer`` matches ``reference`` (module docstring); False when either is None."""
    if answer is None or reference is None:
        return False
    return _match(answer.strip(), reference.strip())


@functools.lru_cache(maxsize=65536)  # n samples of a prompt share a reference and often an answer
def _match(answer: str, reference: str) -> bool:
    plain_answer, plain_reference = normalise(answer), normalise(reference)
    if plain_answer == plain_reference:
        return True
    if _DECIMAL.match(plain_answer) and _DECIMAL.match(plain_reference):  # plain numbers: no parser needed
        return Decimal(plain_answer) == Decimal(plain_reference)
    if not (_MATHS.match(answer) and _MATHS.match(reference)) or ":" in answer + reference:
        return False
    from math_verify import verify

    # no timeouts: math-verify's use signal.alarm, which only the main thread may set
    gold, target = _parsed(reference), _parsed(answer)
    return bool(gold and target and verify(gold, target, timeout_seconds=None))


@functools.lru_cache(maxsize=65536)
def _parsed(text: str) -> list:
    from math_verify import parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that timeouts are off
    return parse(text if "$" in text else f"${text}$", parsing_timeout=None)


def majority(answers: Sequence[str | None]) -> tuple[str | None, float | None]:
    """The most frequent answer (normalised; ties go to the one seen first) and its share of all answers given
    (None counted in the denominator). (None, None) when no completion had an answer."""
    keys = [normalise(a) if a is not None else None for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None, None
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    first = answers[keys.index(winner)]
    return first, best / len(answers)
