"""The pipeline: load -> attack -> defend -> quantize -> evaluate -> log, per condition.

original   = M            attacked   = A(M)
original_q = Q(D(M))      attacked_q = Q(D(A(M)))

Each branch's model is built lazily through the stage cache (qexp/stages.py): a stage whose
output is cached for the same inputs is loaded instead of run, and an evaluation that is
cached needs no model at all. The quantized condition of a branch is made in place from the
full-precision model of the same branch after that one is evaluated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qexp.attacks.preservation import PreservationError, compare, probe_ids, probe_logits
from qexp.cache import VERSION, StageCache, digest, library_versions
from qexp.config import Spec, validate
from qexp.context import RunContext
from qexp.data import reference_text
from qexp.io import atomic_write_json
from qexp.metrics import token_nll
from qexp.plots import plot_loglik
from qexp.results import Results, format_table, provenance
from qexp.stages import Chain, Step

BRANCHES = (("original", "original_q"), ("attacked", "attacked_q"))


def measure(spec: Spec, ctx: RunContext, results: Results, condition: str, chain: Chain) -> dict:
    """Benchmark and reference perplexity of the branch's model (built now if needed)."""
    loaded = chain.model()
    with results.stage(f"evaluate_{condition}"):
        ctx.seed_everything()
        bench = spec.benchmark.evaluate(loaded.model, loaded.tokenizer, ctx, condition)
        nll = token_nll(loaded.model, loaded.tokenizer, reference_text())
    return {
        "metrics": {**bench.metrics, "ref_ppl": float(torch.exp(nll.mean()))},
        "records": bench.records,
        "nll": [round(float(x), 5) for x in nll],
        "model_source": loaded.source,
    }


def evaluate(
    spec: Spec,
    ctx: RunContext,
    results: Results,
    cache: StageCache,
    condition: str,
    chain: Chain,
    originals: list[dict],
) -> None:
    """Benchmark, reference perplexity and similarity to `original` of one condition; the
    first two come from the stage cache when this model state was evaluated before."""
    key = digest("evaluate", chain.key, results.config["benchmark"], ctx.seed)
    with cache.lock("evaluate", key):
        entry = cache.get("evaluate", key)
        if entry is not None and chain.restore():
            meta, results.cache[condition] = entry.meta, "hit"
        else:
            meta = measure(spec, ctx, results, condition, chain)
            cache.put("evaluate", key, meta)
            results.cache[condition] = "computed" if cache.mode == "off" else "stored"
    metrics, records, source = dict(meta["metrics"]), meta["records"], meta["model_source"]
    results.provenance["model_source"] = source
    atomic_write_json(
        ctx.run_dir / "loglik" / f"{condition}.json",
        {"text": "qexp/data/reference.txt", "nll": meta["nll"]},
    )
    if condition == "original":
        originals[:] = records
    elif originals and records:
        with results.stage(f"similarity_{condition}"):
            metrics.update(
                spec.run.similarity.compare(
                    [r["output"] for r in records], [r["output"] for r in originals]
                )
            )
    results.add(condition, metrics, records)
    spec.logger.log_condition(condition, metrics, records)


def attack(spec: Spec, ctx: RunContext, results: Results, model):
    """A(M); for function-preserving attacks, measure the drift and stop beyond tolerance."""
    atk = spec.attack
    measure = getattr(atk, "preserves_function", False) and atk.check_preservation
    if measure:
        ids = probe_ids(ctx.tokenizer)
        before = probe_logits(model, ids)
    model = atk.apply(model, ctx)
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


def attack_step(spec: Spec, ctx: RunContext, results: Results) -> Step:
    """A as a cached stage; its side result is the function-preservation report."""
    return Step(
        "attack",
        results.config["attack"],
        apply=lambda m: attack(spec, ctx, results, m),
        side=lambda: {"function_preservation": results.function_preservation},
        restore=lambda d: setattr(results, "function_preservation", d["function_preservation"]),
    )


def defend_step(spec: Spec, ctx: RunContext, results: Results, branch: str) -> Step:
    """D as a cached stage (keyed by the quantizer too: defenses read its grid)."""

    def apply(model):
        model = spec.defense.apply(model, spec.quantizer, ctx)
        results.defense_stats[branch] = spec.defense.last_stats
        return model

    return Step(
        "defend",
        [results.config["defense"], results.config["quantizer"]],
        apply=apply,
        side=lambda: {"stats": results.defense_stats[branch]},
        restore=lambda d: results.defense_stats.__setitem__(branch, d["stats"]),
    )


def quantize_step(spec: Spec, ctx: RunContext, results: Results, branch: str) -> Step:
    """Q as a cached stage; never cached when it must write the native artifact."""

    def apply(model):
        model = spec.quantizer.quantize(model, ctx)
        results.quantization[branch] = spec.quantizer.last_info
        return model

    return Step(
        "quantize",
        results.config["quantizer"],
        apply=apply,
        side=lambda: {"info": results.quantization[branch]},
        restore=lambda d: results.quantization.__setitem__(branch, d["info"]),
        plain_output=spec.quantizer.plain_output,
        cacheable=not ctx.save_quantized,
    )


def run_pipeline(spec: Spec, ctx: RunContext, results: Results) -> None:
    """Run every requested condition, two branches of (full precision, quantized)."""
    cache = StageCache(ctx.cache_dir / "stages", ctx.cache)
    c = results.config
    root = digest(
        "load",
        VERSION,
        c["model"],
        spec.model.fingerprint(),
        c["dtype"],
        str(ctx.device),
        library_versions(),
    )
    originals: list[dict] = []
    for base, quantized in BRANCHES:
        wanted = [x for x in (base, quantized) if x in spec.run.conditions]
        if not wanted:
            continue
        ctx.branch = base
        chain = Chain(lambda: spec.model.load(ctx), root, ctx, results, cache, base)
        if base == "attacked" and spec.attack.name != "none":
            chain.add(attack_step(spec, ctx, results))
        if base in wanted:
            evaluate(spec, ctx, results, cache, base, chain, originals)
        if quantized in wanted:
            results.defense_stats[base], results.quantization[base] = {}, {}  # none: identity
            if spec.defense.name != "none":
                chain.add(defend_step(spec, ctx, results, base))
            if spec.quantizer.name != "none":
                chain.add(quantize_step(spec, ctx, results, base))
            evaluate(spec, ctx, results, cache, quantized, chain, originals)
        del chain


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
