"""Seeded generator of the embedded SVAMP-style set (one- and two-operation word problems).

Every answer is computed from the numbers placed in the text, so it is correct by
construction. Fields follow the original SVAMP: ID, Body, Question, Equation, Answer, Type.
Regenerate with `python -m qexp.data.svamp_gen` (byte-identical for the same seed).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

from qexp.core.io import atomic_write_jsonl

NAMES = [
    "Tom",
    "Mia",
    "Ravi",
    "Lena",
    "Omar",
    "Sofia",
    "Ken",
    "Ada",
    "Luis",
    "Nora",
    "Ivan",
    "Zoe",
    "Sam",
    "Priya",
    "Ben",
    "Hana",
    "Leo",
    "Eva",
    "Yusuf",
    "Clara",
]
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "pencils",
    "cookies",
    "stamps",
    "shells",
    "cards",
    "balloons",
    "oranges",
    "coins",
    "toy cars",
    "flowers",
    "candies",
]
PLACES = [
    ("box", "boxes"),
    ("bag", "bags"),
    ("basket", "baskets"),
    ("shelf", "shelves"),
    ("jar", "jars"),
    ("drawer", "drawers"),
]

Problem = tuple[str, str, str, float, str]  # body, question, equation, answer, type


def _add(r: random.Random, n: str, it: str) -> Problem:
    a, b = r.randint(2, 60), r.randint(2, 60)
    return (
        f"{n} has {a} {it}. {n} buys {b} more {it}.",
        f"How many {it} does {n} have now?",
        f"( {a}.0 + {b}.0 )",
        a + b,
        "Addition",
    )


def _sub(r: random.Random, n: str, it: str) -> Problem:
    a = r.randint(10, 90)
    b = r.randint(1, a - 1)
    return (
        f"{n} had {a} {it}. {n} gave {b} {it} to a friend.",
        f"How many {it} does {n} have left?",
        f"( {a}.0 - {b}.0 )",
        a - b,
        "Subtraction",
    )


def _mul(r: random.Random, n: str, it: str) -> Problem:
    a, b = r.randint(2, 12), r.randint(2, 12)
    p, ps = r.choice(PLACES)
    return (
        f"{n} has {a} {ps}. Each {p} holds {b} {it}.",
        f"How many {it} does {n} have in all?",
        f"( {a}.0 * {b}.0 )",
        a * b,
        "Multiplication",
    )


def _div(r: random.Random, n: str, it: str) -> Problem:
    b, q = r.randint(2, 9), r.randint(2, 12)
    a = b * q
    return (
        f"{n} has {a} {it} and shares them equally among {b} friends.",
        f"How many {it} does each friend get?",
        f"( {a}.0 / {b}.0 )",
        q,
        "Common-Division",
    )


def _diff(r: random.Random, n: str, it: str) -> Problem:
    m = r.choice([x for x in NAMES if x != n])
    a, b = r.randint(20, 80), r.randint(2, 19)
    return (
        f"{n} has {a} {it}. {m} has {b} {it}.",
        f"How many more {it} does {n} have than {m}?",
        f"( {a}.0 - {b}.0 )",
        a - b,
        "Subtraction",
    )


def _add_sub(r: random.Random, n: str, it: str) -> Problem:
    a, b = r.randint(5, 50), r.randint(2, 40)
    c = r.randint(1, a + b - 1)
    return (
        f"{n} had {a} {it}. {n} found {b} more and then lost {c}.",
        f"How many {it} does {n} have now?",
        f"( ( {a}.0 + {b}.0 ) - {c}.0 )",
        a + b - c,
        "Addition-Subtraction",
    )


def _mul_add(r: random.Random, n: str, it: str) -> Problem:
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(1, 20)
    p, ps = r.choice(PLACES)
    return (
        f"{n} has {a} {ps} with {b} {it} in each {p}, and {c} loose {it}.",
        f"How many {it} does {n} have altogether?",
        f"( ( {a}.0 * {b}.0 ) + {c}.0 )",
        a * b + c,
        "Multiplication-Addition",
    )


def _mul_sub(r: random.Random, n: str, it: str) -> Problem:
    a, b = r.randint(3, 10), r.randint(3, 10)
    c = r.randint(1, a * b - 1)
    p, ps = r.choice(PLACES)
    return (
        f"{n} filled {a} {ps} with {b} {it} each. Then {n} used {c} of the {it}.",
        f"How many {it} are left?",
        f"( ( {a}.0 * {b}.0 ) - {c}.0 )",
        a * b - c,
        "Multiplication-Subtraction",
    )


def _div_add(r: random.Random, n: str, it: str) -> Problem:
    b, q, c = r.randint(2, 6), r.randint(2, 10), r.randint(1, 15)
    a = b * q
    return (
        f"{n} split {a} {it} equally into {b} groups. Then {n} added {c} {it} to one group.",
        f"How many {it} are in that group now?",
        f"( ( {a}.0 / {b}.0 ) + {c}.0 )",
        q + c,
        "Common-Division-Addition",
    )


ONE_STEP: list[Callable[[random.Random, str, str], Problem]] = [_add, _sub, _mul, _div, _diff]
TWO_STEP: list[Callable[[random.Random, str, str], Problem]] = [
    _add_sub,
    _mul_add,
    _mul_sub,
    _div_add,
]


def generate(n: int = 300, seed: int = 0, two_step_fraction: float = 1 / 3) -> list[dict]:
    """`n` problems in SVAMP's fields; deterministic for a seed."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        kinds = TWO_STEP if r.random() < two_step_fraction else ONE_STEP
        body, question, equation, answer, typ = r.choice(kinds)(r, r.choice(NAMES), r.choice(ITEMS))
        rows.append(
            {
                "ID": f"qexp-{i:04d}",
                "Body": body,
                "Question": question,
                "Equation": equation,
                "Answer": float(answer),
                "Type": typ,
            }
        )
    return rows


def main() -> None:
    """Write the embedded set."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("svamp_embedded.jsonl"))
    p.add_argument("-n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    atomic_write_jsonl(a.out, generate(a.n, a.seed))


if __name__ == "__main__":
    main()
