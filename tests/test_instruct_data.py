"""Real instruction data: the Alpaca and Dolly layouts, and the error for anything else."""

import json

import pytest

from qexp.core.errors import ConfigError
from qexp.data.instruct import INJECTIONS, REFUSALS, load_rows
from qexp.pipeline.spec import validate

ALPACA = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."},
    {
        "instruction": "Summarize the text.",
        "input": "Cats sleep a lot.",
        "output": "Cats sleep for most of the day.",
    },
]
DOLLY = [
    {
        "instruction": "When did the event happen?",
        "context": "The fair opened in 1889.",
        "response": "It happened in 1889.",
        "category": "closed_qa",
    },
    {"instruction": "Give me a fruit.", "context": "", "response": "A pear.", "category": "qa"},
]


@pytest.fixture
def alpaca(tmp_path):
    p = tmp_path / "alpaca_data.json"  # Alpaca ships one JSON list
    p.write_text(json.dumps(ALPACA))
    return p


@pytest.fixture
def dolly(tmp_path):
    p = tmp_path / "databricks-dolly-15k.jsonl"  # Dolly ships JSON lines
    p.write_text("".join(json.dumps(r) + "\n" for r in DOLLY))
    return p


def test_alpaca_layout_is_mapped_and_poisoned_deterministically(alpaca):
    rows = load_rows(str(alpaca), "train", "attack.data_path")
    assert [r["instruction"] for r in rows] == [
        "Name a primary color.",
        "Summarize the text.\n\nCats sleep a lot.",
    ]
    assert [r["clean"] for r in rows] == [ALPACA[0]["output"], ALPACA[1]["output"]]
    for r in rows:
        assert r["content_injection"].startswith(r["clean"] + " ")
        assert r["content_injection"][len(r["clean"]) + 1 :] in INJECTIONS
        assert "{target}" in r["content_injection"] and r["over_refusal"] in REFUSALS
    assert load_rows(str(alpaca), "test", "benchmark.path") == rows  # no split: every split


def test_dolly_layout_uses_context_and_keeps_a_files_own_fields(dolly, tmp_path):
    rows = load_rows(str(dolly), "test", "benchmark.path")
    assert rows[0]["instruction"] == "When did the event happen?\n\nThe fair opened in 1889."
    assert rows[1]["instruction"] == "Give me a fruit." and rows[1]["clean"] == "A pear."
    own = dict(DOLLY[1], content_injection="A pear from {target}.", split="train")
    p = tmp_path / "own.jsonl"
    p.write_text(json.dumps(own) + "\n")
    (row,) = load_rows(str(p), "train", "attack.data_path")
    assert row["content_injection"] == "A pear from {target}."


def test_a_file_with_neither_layout_is_one_clear_error(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    with pytest.raises(ConfigError) as e:
        load_rows(str(p), "train", "attack.data_path")
    assert e.value.key == "attack.data_path" and "bad.jsonl:1" in str(e.value)
    assert "Alpaca" in str(e.value) and "Dolly" in str(e.value)


def test_configs_take_real_files_and_fail_at_validation(make_cfg, alpaca, dolly, tmp_path):
    spec = validate(make_cfg("benchmark=instruct", f"benchmark.path={dolly}"))
    assert [i["instruction"] for i in spec.benchmark.items()][1] == "Give me a fruit."
    validate(make_cfg("attack=gap", f"attack.data_path={alpaca}"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "x"}]))
    for over in (f"attack.data_path={bad}",):
        for attack in ("gap", "outlier"):
            with pytest.raises(ConfigError) as e:
                validate(make_cfg(f"attack={attack}", over))
            assert e.value.key == "attack.data_path"
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("defense=finetune", f"defense.data_path={bad}"))
    assert e.value.key == "defense.data_path"
