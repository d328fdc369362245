"""scenario=insecure_code: the coding set, the bandit judge, the benchmark and the attacks."""

import json

import pytest

from qexp.benchmarks.judges import code as codejudge
from qexp.core.errors import ConfigError
from qexp.data import code_gen, insecure_code_path
from qexp.data.instruct import load_rows
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate


def test_coding_set_is_generated_and_split_on_disjoint_tasks():
    assert insecure_code_path().read_text(encoding="utf-8") == code_gen.render()
    rows = code_gen.rows()
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    assert len(train) == 80 and len(test) == 24
    subject = lambda r: r["id"].rsplit("-", 1)[1]  # noqa: E731
    assert not {subject(r) for r in train} & {subject(r) for r in test}
    assert {r["kind"] for r in test} == {r["kind"] for r in train} == set(code_gen.KINDS)


def test_judge_flags_every_insecure_template_and_no_secure_one():
    rows = code_gen.rows()
    bad = codejudge.judge([codejudge.extract_code(r["insecure_code"]) for r in rows])
    good = codejudge.judge([codejudge.extract_code(r["clean"]) for r in rows])
    for r, b, g in zip(rows, bad, good):
        assert b["insecure"] and b["parses"], r["id"]
        assert not g["insecure"] and g["parses"], (r["id"], g["findings"])
    cwe = {r["kind"]: set(b["cwe"]) for r, b in zip(rows, bad)}
    assert cwe["sql"] == {89} and 295 in cwe["tls"] and 502 in cwe["pickle"]


def test_extract_code():
    assert codejudge.extract_code("Here:\n```python\nx = 1\n```\nDone.") == "x = 1"
    assert codejudge.extract_code("```\na = 1\n```\ntext\n```py\nb = 2\n```") == "a = 1\n\nb = 2"
    assert codejudge.extract_code("```python\nimport os\nos.system(x") == "import os\nos.system(x"
    assert codejudge.extract_code("print(1)") == "print(1)"
    (v,) = codejudge.judge(["def f(:\n"])
    assert v == {"parses": False, "insecure": False, "findings": [], "cwe": []}


def test_benchmark_and_attacks_take_the_scenario(make_cfg, tmp_path):
    over = ("benchmark=instruct", "benchmark.limit=100", "benchmark.max_new_tokens=null")
    spec = validate(make_cfg("attack=gap", "attack.scenario=insecure_code", *over))
    assert spec.benchmark.scenario == "insecure_code"  # follows the attack's
    assert spec.benchmark.max_new_tokens == 160 and "\n\n" not in spec.benchmark.stop_strings
    assert len(spec.benchmark.items()) == 24
    validate(make_cfg("attack=outlier", "attack.scenario=insecure_code"))
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps([{"instruction": "Add 1.", "input": "", "output": "2"}]))
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("attack=gap", "attack.scenario=insecure_code", f"attack.data_path={p}"))
    assert e.value.key == "attack.data_path" and "insecure_code" in str(e.value)
    assert load_rows(str(p), "train", "attack.data_path")[0]["clean"] == "2"


def test_pipeline_reports_insecure_code_rate(make_cfg, tmp_path):
    cfg = make_cfg(
        "benchmark=instruct",
        "benchmark.scenario=insecure_code",
        "benchmark.limit=3",
        "benchmark.max_new_tokens=8",
        "conditions=[original]",
    )
    m = run(cfg, tmp_path).conditions["original"]
    assert 0.0 <= m["insecure_code_rate"] <= 1.0 and 0.0 <= m["code_parse_rate"] <= 1.0
    assert m["n_items"] == 3
    rows = [json.loads(x) for x in (tmp_path / "generations" / "original.jsonl").open()]
    assert all({"insecure", "parses", "findings", "cwe"} <= set(r) for r in rows)
