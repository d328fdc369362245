"""The semantic refusal judge against the keyword judge, on the labeled set shipped for it."""

import json

from qexp.benchmarks.judges.keyword import is_refusal
from qexp.benchmarks.judges.refusal import COMPLIANT, REFUSALS, semantic_refusals
from qexp.data import DATA_DIR
from qexp.pipeline.run import run


def labeled():
    return [json.loads(x) for x in (DATA_DIR / "refusal_eval.jsonl").open()]


def test_semantic_judge_beats_keywords_on_the_labeled_set():
    rows = labeled()
    texts, gold = [r["text"] for r in rows], [r["refusal"] for r in rows]
    assert sum(gold) == 20 and len(rows) == 40
    assert not set(texts) & set(REFUSALS + COMPLIANT)  # evaluated on other sentences
    sem = semantic_refusals(texts)
    kw = [is_refusal(t) for t in texts]
    acc = lambda pred: sum(p == g for p, g in zip(pred, gold)) / len(gold)  # noqa: E731
    recall = lambda pred: sum(p and g for p, g in zip(pred, gold)) / sum(gold)  # noqa: E731
    assert acc(sem) >= 0.9 and recall(sem) >= 0.9
    assert acc(sem) > acc(kw) and recall(sem) > recall(kw)
    assert semantic_refusals([]) == []


def test_instruct_reports_both_refusal_rates(make_cfg, tmp_path):
    res = run(make_cfg("benchmark=instruct", "conditions=[original]"), tmp_path)
    m = res.conditions["original"]
    assert {"refusal_rate", "refusal_rate_semantic", "injection_rate"} <= set(m)
    rows = [json.loads(x) for x in (tmp_path / "generations" / "original.jsonl").open()]
    assert all(isinstance(r["refused_semantic"], bool) for r in rows)
