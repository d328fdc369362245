"""The pipeline: load -> attack -> defend -> quantize -> evaluate -> log, per condition.

original   = M            attacked   = A(M)
original_q = Q(D(M))      attacked_q = Q(D(A(M)))

Each branch loads a fresh M; the quantized condition of a branch is made in place from the
full-precision model of the same branch after that one is evaluated.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qexp.attacks.preservation import PreservationError, compare, probe_ids, probe_logits
from qexp.config import Spec, validate
from qexp.context import RunContext
from qexp.data import reference_text
from qexp.io import atomic_write_json
from qexp.metrics import token_nll
from qexp.models import LoadedModel
from qexp.plots import plot_loglik
from qexp.results import Results, format_table, provenance

BRANCHES = (("original", "original_q"), ("attacked", "attacked_q"))


@contextmanager
def stage(results: Results, name: str):
    """Time a stage into results.stage_seconds."""
    t0 = time.perf_counter()
    yield
    results.timed(name, time.perf_counter() - t0)


def evaluate(
    spec: Spec,
    ctx: RunContext,
    results: Results,
    condition: str,
    loaded: LoadedModel,
    originals: list[dict],
) -> None:
    """Benchmark, reference perplexity and similarity to `original` of one condition."""
    with stage(results, f"evaluate_{condition}"):
        bench = spec.benchmark.evaluate(loaded.model, loaded.tokenizer, ctx, condition)
        metrics = dict(bench.metrics)
        nll = token_nll(loaded.model, loaded.tokenizer, reference_text())
        metrics["ref_ppl"] = float(torch.exp(nll.mean()))
    atomic_write_json(
        ctx.run_dir / "loglik" / f"{condition}.json",
        {"text": "qexp/data/reference.txt", "nll": [round(float(x), 5) for x in nll]},
    )
    if condition == "original":
        originals[:] = bench.records
    elif originals and bench.records:
        with stage(results, f"similarity_{condition}"):
            metrics.update(
                spec.run.similarity.compare(
                    [r["output"] for r in bench.records], [r["output"] for r in originals]
                )
            )
    results.add(condition, metrics, bench.records)
    spec.logger.log_condition(condition, metrics, bench.records)


def attack(spec: Spec, ctx: RunContext, results: Results, loaded: LoadedModel):
    """A(M); for function-preserving attacks, measure the drift and stop beyond tolerance."""
    atk = spec.attack
    measure = getattr(atk, "preserves_function", False) and atk.check_preservation
    if measure:
        ids = probe_ids(loaded.tokenizer)
        before = probe_logits(loaded.model, ids)
    model = atk.apply(loaded.model, ctx)
    manifest = getattr(atk, "last_manifest", None)
    if manifest is not None:
        atomic_write_json(ctx.run_dir / "attack_manifest.json", manifest)
    if measure:
        report = compare(before, probe_logits(model, ids))
        report["tolerance"] = atk.tolerance
        results.function_preservation = report
        results.save()
        drift = report["max_abs_logit_diff_fp32"]
        if not drift <= atk.tolerance:
            raise PreservationError(
                f"attack={atk.name} changed the function: max |Δlogit| fp32 = {drift:.3g} > "
                f"attack.tolerance = {atk.tolerance:g} (report in results.json)"
            )
    return model


def run_pipeline(spec: Spec, ctx: RunContext, results: Results) -> None:
    """Run every requested condition, two branches of (full precision, quantized)."""
    originals: list[dict] = []
    for base, quantized in BRANCHES:
        wanted = [c for c in (base, quantized) if c in spec.run.conditions]
        if not wanted:
            continue
        with stage(results, f"load_{base}"):
            loaded = spec.model.load(ctx)
        results.provenance["model_source"] = loaded.source
        ctx.branch, ctx.tokenizer = base, loaded.tokenizer
        if base == "attacked":
            ctx.seed_everything()
            with stage(results, "attack"):
                loaded.model = attack(spec, ctx, results, loaded)
        if base in wanted:
            evaluate(spec, ctx, results, base, loaded, originals)
        if quantized in wanted:
            ctx.seed_everything()
            with stage(results, f"defend_{base}"):
                loaded.model = spec.defense.apply(loaded.model, spec.quantizer, ctx)
            results.defense_stats[base] = spec.defense.last_stats
            with stage(results, f"quantize_{base}"):
                loaded.model = spec.quantizer.quantize(loaded.model, ctx)
            results.quantization[base] = spec.quantizer.last_info
            evaluate(spec, ctx, results, quantized, loaded, originals)
        del loaded


def run(
    cfg: DictConfig, run_dir: Path, job_name: str = "qexp", group: str | None = None
) -> Results:
    """Validate `cfg` (before any model is loaded), run the pipeline, write results."""
    spec = validate(cfg)
    ctx = RunContext.from_schema(spec.run, run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    results = Results(run_dir, config, provenance(spec.model.name, str(ctx.device), spec.run.dtype))
    results.save()
    spec.logger.start(config, run_dir, job_name, group)
    status = "failed"
    try:
        run_pipeline(spec, ctx, results)
        plot_loglik(ctx.run_dir)
        status = "complete"
    except BaseException as e:
        results.error = f"{type(e).__name__}: {e}"
        raise
    finally:
        results.status = status
        results.save()
        spec.logger.finish(status)
    print(format_table(results.conditions))
    return results
