"""Similarity to original: cosine, Retrieval@1 (3x3 toy by hand), BERTScore, pipeline sanity."""

import math

import pytest
import torch

from qexp.benchmarks.similarity import SimilaritySettings, cosine_and_retrieval
from qexp.pipeline.run import run


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_retrieval_3x3_by_hand():
    refs = torch.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    # out0 ~ ref0 (retrieved), out1 closer to ref2 than ref1 (missed), out2 == ref2
    outs = torch.stack([unit(1, 0.1, 0), unit(0, 0.5, 1), unit(0, 0, 1)])
    cos, r1 = cosine_and_retrieval(outs, refs)
    expected_cos = (1 / math.sqrt(1.01) + 0.5 / math.sqrt(1.25) + 1.0) / 3
    assert cos == pytest.approx(expected_cos, abs=1e-6)
    assert r1 == pytest.approx(2 / 3)


def test_ties_with_the_pair_count_as_retrieved():
    refs = torch.stack([unit(1, 0), unit(1, 0)])  # two identical originals
    cos, r1 = cosine_and_retrieval(refs.clone(), refs)
    assert cos == pytest.approx(1.0) and r1 == 1.0


def test_compare_identical_and_different_texts():
    s = SimilaritySettings()
    texts = ["5 + 3 = 8 apples. The answer is 8.", "The answer is 12.", ""]
    same, items = s.compare(texts, texts)
    assert [round(i["cos_sim"], 4) for i in items] == [1.0, 1.0, 1.0]
    assert all(i["retrieved"] for i in items)
    assert same["bertscore_f1"] == pytest.approx(sum(i["bertscore_f1"] for i in items) / 3)
    assert same["cos_sim"] == pytest.approx(1.0, abs=1e-5)
    assert same["retrieval_at_1"] == 1.0
    assert same["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert "MiniLM" in same["bertscore_model"]
    other, items = s.compare(["banana bread recipe", "The answer is 12.", "x"], texts)
    assert other["cos_sim"] < 0.8 and other["bertscore_f1"] < same["bertscore_f1"]
    assert items[1]["cos_sim"] > 0.99 > items[0]["cos_sim"]


def test_pipeline_reports_similarity_to_original(make_cfg, tmp_path):
    res = run(make_cfg("quantizer=rtn4"), tmp_path)
    c = res.conditions
    assert "cos_sim" not in c["original"]
    # attack=none: attacked is the original model, generations are identical
    assert c["attacked"]["cos_sim"] == pytest.approx(1.0, abs=1e-5)
    assert c["attacked"]["retrieval_at_1"] == 1.0
    for cond in ("original_q", "attacked_q"):
        assert 0.0 <= c[cond]["retrieval_at_1"] <= 1.0 and -1.0 <= c[cond]["cos_sim"] <= 1.0


def test_similarity_absent_without_original(make_cfg, tmp_path):
    res = run(make_cfg("conditions=[original_q]"), tmp_path)
    assert "cos_sim" not in res.conditions["original_q"]


def test_missing_eval_extra_is_refused_only_where_it_is_used(make_cfg, monkeypatch):
    """Without sentence-transformers: similarity.enabled=false and
    benchmark.semantic_refusal=false run; the defaults are refused at validation, naming
    the key (bench/gpu_smoke.sh runs qexp where only torch and transformers exist)."""
    import importlib.util

    from qexp.core.errors import ConfigError
    from qexp.pipeline.spec import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sentence_transformers" else real(name, *a),
    )
    validate(make_cfg("similarity.enabled=false"))
    validate(
        make_cfg(
            "similarity.enabled=false", "benchmark=instruct", "benchmark.semantic_refusal=false"
        )
    )
    for overrides, key in (
        ([], "similarity.enabled"),
        (["similarity.enabled=false", "benchmark=instruct"], "benchmark.semantic_refusal"),
    ):
        with pytest.raises(ConfigError) as e:
            validate(make_cfg(*overrides))
        assert e.value.key == key and "qexp[eval]" in e.value.allowed
