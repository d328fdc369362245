"""AIME24: boxed-answer parsing, file loader, pipeline on a tiny model."""

import pytest

from qexp.benchmarks.aime import AIME24, last_boxed, parse_aime
from qexp.core.errors import ConfigError
from tests.conftest import FIXTURES


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{204}.", 204.0),
        ("\\boxed{12} then corrected: \\boxed{13}", 13.0),
        ("\\boxed{\\frac{1}{2}}", None),  # not an integer
        ("\\boxed{1000}", None),  # outside AIME's 0..999
        ("\\boxed{ 0 }", 0.0),
        ("\\boxed{1,000}", None),
        ("The answer is 42", None),  # no box, no answer
        ("\\boxed{42", None),  # unbalanced
    ],
)
def test_parse_aime(text, expected):
    assert parse_aime(text) == expected


def test_last_boxed_nested():
    assert last_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"


def test_file_loader_and_prompt():
    b = AIME24(path=str(FIXTURES / "aime_small.jsonl"), chat_template=False)
    items = b.items()
    assert [i["answer"] for i in items] == [7.0, 900.0]
    p = b.prompt(items[0], tok=None)
    assert "What is 3 + 4?" in p and "\\boxed{}" in p and p.endswith("Solution:")


def test_hub_source_needs_no_path_but_file_does():
    with pytest.raises(ConfigError, match="benchmark.source=file"):
        AIME24(source="file")


def test_aime_in_the_pipeline(make_cfg, tmp_path):
    from qexp.pipeline.run import run

    cfg = make_cfg(
        "model=tiny_llama",
        "logger=none",
        "progress=false",
        "benchmark=aime24",
        f"benchmark.path={FIXTURES / 'aime_small.jsonl'}",
        "benchmark.chat_template=false",
        "benchmark.max_new_tokens=6",
        "conditions=[original]",
        "similarity.bertscore=false",
        tiny=False,
    )
    res = run(cfg, tmp_path)
    m = res.conditions["original"]
    assert m["n_items"] == 2 and m["accuracy"] == 0.0  # a random tiny model boxes nothing
