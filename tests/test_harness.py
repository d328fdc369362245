"""lm-eval runs fully offline on a local task, and agrees with qexp's own SVAMP evaluation."""

import json

import pytest
import yaml

from qexp.benchmarks.harness import qexp_svamp_task, write_builtin_tasks
from qexp.benchmarks.svamp import SVAMP
from qexp.pipeline.run import run

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def test_task_prompt_is_qexps_prompt(tmp_path):
    task = qexp_svamp_task()
    from jinja2 import Template

    doc = {"Body": "Ann has 3 cats.", "Question": "How many cats?", "Answer": 3.0}
    rendered = Template(task["doc_to_text"]).render(**doc)
    qexp_prompt = SVAMP().prompt({"body": doc["Body"], "question": doc["Question"]}, tok=None)
    assert rendered == qexp_prompt
    d = write_builtin_tasks(tmp_path)
    assert yaml.safe_load((d / "qexp_svamp.yaml").read_text())["task"] == "qexp_svamp"


def test_lm_eval_offline_on_a_tiny_model(make_cfg, tmp_path):
    cfg = make_cfg(
        "model=tiny_llama",
        "logger=none",
        "progress=false",
        "benchmark=lm_eval",
        "benchmark.limit=3",
        "benchmark.batch_size=2",
        "conditions=[original,original_q]",
        "similarity.bertscore=false",
        tiny=False,
    )
    res = run(cfg, tmp_path)
    for cond in ("original", "original_q"):
        m = res.conditions[cond]
        assert 0.0 <= m["lm_eval/qexp_svamp/exact_match/last_number"] <= 1.0
        rows = [json.loads(x) for x in (tmp_path / "generations" / f"{cond}.jsonl").open()]
        assert len(rows) == 3 and rows[0]["prompt"].startswith("Question: Jake")
    assert "cos_sim" in res.conditions["original_q"]


@pytest.mark.slow
def test_lm_eval_agrees_with_qexp_on_the_embedded_model(make_cfg, tmp_path):
    common = [
        "logger=none",
        "progress=false",
        "conditions=[original]",
        "similarity.enabled=false",
        "benchmark.limit=4",
        "benchmark.batch_size=1",
    ]
    own = run(make_cfg(*common, "benchmark.prefix_cache=false", tiny=False), tmp_path / "a")
    harness = run(make_cfg(*common, "benchmark=lm_eval", tiny=False), tmp_path / "b")
    a = [json.loads(x) for x in (tmp_path / "a" / "generations" / "original.jsonl").open()]
    b = [json.loads(x) for x in (tmp_path / "b" / "generations" / "original.jsonl").open()]
    assert [r["output"] for r in a] == [r["output"].strip() for r in b]
    assert [r["correct"] for r in a] == [r["correct"] for r in b]
    assert own.conditions["original"]["accuracy"] == pytest.approx(
        harness.conditions["original"]["lm_eval/qexp_svamp/exact_match/last_number"]
    )
    assert sum(r["parsed"] is not None for r in a) >= 3  # a real model, real answers
