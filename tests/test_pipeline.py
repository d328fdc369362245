"""The four conditions end to end on tiny random models; results contract; W&B files."""

import json
import time

import pytest
import torch

from qexp import CONDITIONS
from qexp.benchmarks.generation import GenerationSettings, generate
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.pipeline.run import run
from qexp.pipeline.spec import validate
from tests.conftest import continuation_nll

METRICS = {"accuracy", "self_ppl", "ref_ppl", "tokens_per_s", "n_items", "mean_new_tokens"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_four_conditions_on_tiny_models(make_cfg, tmp_path, arch):
    results = run(make_cfg(f"model=tiny_{arch}"), tmp_path)
    body = json.loads((tmp_path / "results.json").read_text())
    assert body["status"] == "complete"
    assert set(body["conditions"]) == set(CONDITIONS)
    for cond in CONDITIONS:
        m = body["conditions"][cond]
        assert set(m) >= METRICS, (cond, m)
        assert m["n_items"] == 4 and 0.0 <= m["accuracy"] <= 1.0
        assert m["ref_ppl"] > 1.0 and m["self_ppl"] >= 1.0
        rows = [json.loads(x) for x in (tmp_path / "generations" / f"{cond}.jsonl").open()]
        assert len(rows) == 4
        assert {"prompt", "output", "parsed", "gold", "correct"} <= set(rows[0])
    # attack=none: attacked is the same model as original, so identical generations
    assert body["conditions"]["attacked"]["ref_ppl"] == body["conditions"]["original"]["ref_ppl"]
    # rtn4 really changed the weights: reference perplexity moves
    assert body["conditions"]["original_q"]["ref_ppl"] != body["conditions"]["original"]["ref_ppl"]
    assert results.status == "complete"


def test_results_schema(make_cfg, tmp_path):
    run(make_cfg("conditions=[original,original_q]"), tmp_path)
    body = json.loads((tmp_path / "results.json").read_text())
    assert set(body) == {
        "config",
        "provenance",
        "function_preservation",
        "conditions",
        "intervals",
        "comparisons",
        "defense_stats",
        "prune",
        "quantization",
        "stage_seconds",
        "memory",
        "cache",
        "status",
        "heartbeat_utc",
    }
    ci = body["intervals"]["original_q"]
    assert ci["accuracy"]["method"] == "wilson" and ci["accuracy"]["n"] == 4
    assert ci["ref_ppl"]["lo"] < body["conditions"]["original_q"]["ref_ppl"] < ci["ref_ppl"]["hi"]
    assert list(body["comparisons"]) == ["original_q vs original"]
    assert body["comparisons"]["original_q vs original"]["accuracy"]["test"] == "mcnemar_exact"
    assert set(body["stage_seconds"]) == set(body["memory"]["peak_rss_mb"])  # a peak per stage
    assert set(body["conditions"]) == {"original", "original_q"}
    assert body["defense_stats"] == {"original": {}} and set(body["quantization"]) == {"original"}
    assert body["prune"] == {"original": {}}  # prune=none: the identity, recorded as {}
    assert body["config"]["quantizer"]["bits"] == 4
    assert body["provenance"]["model_source"] == "tiny:llama"
    assert {"torch", "transformers", "qexp", "dtype", "device"} <= set(body["provenance"])
    assert {"load_original", "evaluate_original", "quantize_original"} <= set(body["stage_seconds"])
    assert body["cache"] == {
        "original": "computed",
        "original/quantize": "computed",
        "original_q": "computed",
    }
    assert not list(tmp_path.glob(".*.tmp")), "temp files left behind"


def test_same_config_and_seed_same_generations(make_cfg, tmp_path):
    cfg = make_cfg("conditions=[original_q]")
    run(cfg, tmp_path / "a")
    run(cfg, tmp_path / "b")
    a = (tmp_path / "a" / "generations" / "original_q.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "generations" / "original_q.jsonl").read_bytes()


def test_failed_run_marks_itself_and_keeps_what_was_written(make_cfg, tmp_path, monkeypatch):
    from qexp.quantizers.rtn import RTN

    def broken(self, model, ctx):
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(RTN, "quantize", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        run(make_cfg(), tmp_path)
    body = json.loads((tmp_path / "results.json").read_text())
    assert body["status"] == "failed"
    assert "quantizer exploded" in body["error"]
    assert "original" in body["conditions"]  # evaluated before the crash, not lost


def test_config_error_before_any_output(make_cfg, tmp_path):
    from qexp.core.errors import ConfigError

    with pytest.raises(ConfigError):
        run(make_cfg("benchmark.limit=0"), tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_wandb_offline_files(make_cfg, tmp_path):
    pytest.importorskip("wandb")
    run(make_cfg("logger=wandb", "conditions=[original]"), tmp_path, group="sweep-group-x")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # metrics, the resolved config, the sweep's group
    keys = (b"original/accuracy", b"original/ref_ppl", b"quantizer", b"sweep-group-x")
    deadline = time.time() + 60  # wandb's service process may still be flushing its log
    while True:
        log = next(runs[0].glob("*.wandb")).read_bytes()  # the offline protobuf record log
        missing = [k for k in keys if k not in log]
        if not missing or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing
    table = json.loads(next(runs[0].rglob("generations_*.table.json")).read_text())
    assert len(table["data"]) == 4 and "output" in table["columns"]


def test_generation_nll_matches_a_forward_pass(make_cfg, tmp_path):
    spec = validate(make_cfg())
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    prompts = ["Question: Ann has 3 cats.\nAnswer:", "The mill"]
    gens, tok_s = generate(
        lm.model, lm.tokenizer, prompts, GenerationSettings(6, 1), progress=False
    )
    assert tok_s > 0
    for p, g in zip(prompts, gens):
        ids = lm.tokenizer(p, add_special_tokens=False).input_ids
        nll, n = continuation_nll(lm.model, ids, g.token_ids)
        assert n == len(g.token_ids) == 6
        assert g.nll == pytest.approx(nll, rel=1e-4)


def test_batched_generation_equals_batch_one(make_cfg, tmp_path):
    spec = validate(make_cfg())
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    prompts = ["Question: Ann has 3 cats and 4 dogs.\nAnswer:", "Hi", "The old mill stood"]
    one, _ = generate(lm.model, lm.tokenizer, prompts, GenerationSettings(5, 1), progress=False)
    many, _ = generate(lm.model, lm.tokenizer, prompts, GenerationSettings(5, 3), progress=False)
    assert [g.token_ids for g in one] == [g.token_ids for g in many]
    assert torch.get_num_threads() >= 1


def test_prefix_cache_gives_the_same_tokens(make_cfg, tmp_path):
    spec = validate(make_cfg())
    ctx = RunContext.from_schema(spec.run, tmp_path)
    lm = spec.model.load(ctx)
    items = spec.benchmark.items()
    prompts = [spec.benchmark.prompt(it, lm.tokenizer) for it in items]
    plain, _ = generate(
        lm.model,
        lm.tokenizer,
        prompts,
        GenerationSettings(6, 3, prefix_cache=False),
        progress=False,
    )
    cached, _ = generate(
        lm.model, lm.tokenizer, prompts, GenerationSettings(6, 3, prefix_cache=True), progress=False
    )
    assert [g.token_ids for g in plain] == [g.token_ids for g in cached]
    for a, b in zip(plain, cached):
        assert a.nll == pytest.approx(b.nll, rel=1e-4)


def test_ppl_benchmark_and_loglik_curves(make_cfg, tmp_path):
    from qexp.data import reference_text

    text = tmp_path / "t.txt"
    text.write_text(reference_text()[:600])
    cfg = make_cfg(
        "model=tiny_llama",
        "logger=none",
        "progress=false",
        "benchmark=ppl",
        f"benchmark.path={text}",
        "benchmark.window=64",
        "benchmark.stride=32",
        "conditions=[original,original_q]",
        tiny=False,
    )
    res = run(cfg, tmp_path / "run")
    m = res.conditions["original"]
    assert m["n_tokens"] > 64 and m["ppl"] > 1.0
    assert res.conditions["original_q"]["ppl"] != m["ppl"]
    curve = json.loads((tmp_path / "run" / "loglik" / "original.json").read_text())["nll"]
    assert len(curve) > 100
    assert (tmp_path / "run" / "loglik.png").stat().st_size > 1000


def test_save_attacked_writes_a_checkpoint_stock_transformers_loads(make_cfg, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qexp.core.plugin import Subject

    cfg = make_cfg(
        "attack=encrypt",
        "attack.kappa_one_layers=0",
        "save_attacked=true",
        "conditions=[attacked]",
        "cache=off",
    )
    run(cfg, tmp_path / "run")
    out = tmp_path / "run" / "attacked"
    assert not list((tmp_path / "run").glob(".attacked.*"))  # the atomic write left no temp
    # the checkpoint holds exactly the attacked weights (the attack re-run on a fresh model)
    spec = validate(cfg)
    ctx = RunContext.from_schema(spec.run, tmp_path / "again")
    lm = spec.model.load(ctx)
    attacked = spec.attack.apply(Subject(lm.model, lm.tokenizer, "attacked", "k"), ctx).model
    saved = load_file(str(out / "model.safetensors"))
    state = attacked.state_dict()
    assert set(saved) <= set(state) and len(saved) > 0
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name]), name
    original = spec.model.load(ctx).model.state_dict()
    assert any(not torch.equal(saved[n], original[n]) for n in saved)  # the attack moved them
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, attacked(ids).logits)


def test_save_attacked_needs_an_attack(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"save_attacked=True is not valid; allowed: true only"):
        validate(make_cfg("attack=none", "save_attacked=true"))
