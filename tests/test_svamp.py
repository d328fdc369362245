"""SVAMP loaders (JSON and JSONL), the embedded generated set, prompts."""

import json

import pytest

from qexp.benchmarks.svamp import SVAMP, load_svamp_file
from qexp.core.errors import ConfigError
from qexp.core.io import read_jsonl
from qexp.data import svamp_embedded_path
from qexp.data.svamp_gen import generate
from tests.conftest import FIXTURES


def test_json_list_in_original_release_format():
    items = load_svamp_file(FIXTURES / "svamp_small.json")
    assert [i["answer"] for i in items] == [51.0, 2.0]
    assert items[0]["id"] == "chal-1" and items[0]["question"].startswith("How much")


def test_jsonl_with_string_answers_and_blank_lines():
    items = load_svamp_file(FIXTURES / "svamp_small.jsonl")
    assert [i["answer"] for i in items] == [7.0, 12.0, 6.0]


def test_missing_field_is_a_clear_error():
    with pytest.raises(ConfigError, match="missing Question"):
        load_svamp_file(FIXTURES / "svamp_bad.jsonl")


def test_path_and_limit_through_the_config(make_cfg):
    from qexp.pipeline.spec import validate

    spec = validate(
        make_cfg(f"benchmark.path={FIXTURES / 'svamp_small.jsonl'}", "benchmark.limit=2")
    )
    assert spec.benchmark.source == "file"
    assert [i["answer"] for i in spec.benchmark.items()] == [7.0, 12.0]


def test_embedded_set_is_correct_by_construction():
    rows = read_jsonl(svamp_embedded_path())
    assert len(rows) == 300
    assert len({r["ID"] for r in rows}) == 300
    two_step = 0
    for r in rows:
        # SVAMP's Equation field evaluates to the Answer
        assert eval(r["Equation"], {"__builtins__": {}}) == pytest.approx(r["Answer"])
        assert r["Answer"] == int(r["Answer"]) and r["Answer"] >= 0
        two_step += r["Equation"].count("(") == 2
    assert 50 <= two_step <= 150  # one- and two-operation problems both present


def test_embedded_set_regenerates_byte_identical(tmp_path):
    rows = generate(300, seed=0)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    assert text == svamp_embedded_path().read_text()
    assert generate(300, seed=1) != rows


def test_prompt_few_shot_and_chat_template_error():
    b = SVAMP(few_shot=2)
    item = {"body": "Ann has 3 cats.", "question": "How many cats?"}
    p = b.prompt(item, tok=None)
    assert p.count("Question:") == 3 and p.endswith("Ann has 3 cats. How many cats?\nAnswer:")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="chat_template"):
        SVAMP(chat_template=True).prompt(item, NoTemplate())


def test_hub_source_without_datasets_names_the_extra(monkeypatch):
    import sys

    from qexp.core.hub import hub_dataset

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"benchmark.hub_id='ChilleD/SVAMP'.*qexp\[hub\]"):
        hub_dataset("benchmark.hub_id", "ChilleD/SVAMP", "test")


def test_offset_gives_disjoint_splits(make_cfg):
    from qexp.pipeline.spec import validate

    val = validate(make_cfg("benchmark.limit=5", tiny=False)).benchmark.items()
    test = validate(make_cfg("benchmark.offset=5", "benchmark.limit=5", tiny=False)).benchmark
    everything = validate(make_cfg("benchmark.limit=10", tiny=False)).benchmark.items()
    assert [i["id"] for i in val + test.items()] == [i["id"] for i in everything]
    with pytest.raises(ConfigError, match="benchmark.offset=-1"):
        validate(make_cfg("benchmark.offset=-1"))
