"""The pipeline: load -> attack -> defend -> quantize -> evaluate -> log, per condition.

original   = M            attacked   = A(M)
original_q = Q(D(M))      attacked_q = Q(D(A(M)))

Each branch's model is built lazily through the stage cache (qexp/pipeline/stages.py): a stage whose
output is cached for the same inputs is loaded instead of run, and an evaluation that is
cached needs no model at all. The quantized condition of a branch is made in place from the
full-precision model of the same branch after that one is evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qexp.attacks.base import Attack
from qexp.core.cache import VERSION, digest, library_versions
from qexp.pipeline.spec import Spec, validate
from qexp.core.context import RunContext
from qexp.data import reference_text
from qexp.defenses.base import Defense
from qexp.core.errors import ConfigError
from qexp.core.io import atomic_dir, atomic_write_json
from qexp.core.memory import check_fits
from qexp.benchmarks.metrics import token_nll
from qexp.core.geometry import max_positions
from qexp.core.plots import plot_loglik
from qexp.core.plugin import StageResult, Subject
from qexp.pipeline.preservation import PreservationError, compare, probe_ids, probe_logits
from qexp.pipeline.results import Results, complete_config, format_table, provenance
from qexp.pipeline.stages import Chain, Step

log = logging.getLogger(__name__)
BRANCHES = (("original", "original_q"), ("attacked", "attacked_q"))
MANIFEST = "attack_manifest.json"


def measure(spec: Spec, ctx: RunContext, results: Results, condition: str, chain: Chain) -> dict:
    """Benchmark and reference perplexity of the branch's model (built now if needed)."""
    loaded = chain.model()
    with results.stage(f"evaluate_{condition}"):
        ctx.seed_everything()
        bench = spec.benchmark.evaluate(loaded.model, loaded.tokenizer, ctx, condition)
        window = min(1024, max_positions(loaded.model.config) or 1024)  # fewer: its windows
        nll = token_nll(loaded.model, loaded.tokenizer, reference_text(), window, window // 2)
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
    condition: str,
    chain: Chain,
    originals: list[dict],
) -> None:
    """Benchmark, reference perplexity and similarity to `original` of one condition; the
    first two come from the stage cache when this model state was evaluated before."""
    cache = ctx.stages
    key = digest(
        "evaluate", chain.key, results.config["benchmark"], spec.benchmark.fingerprint(), ctx.seed
    )
    with cache.lock("evaluate", key):
        entry = cache.get("evaluate", key)
        if entry is not None and chain.restore():
            meta, results.cache[condition] = entry.meta["info"], "hit"
        else:
            meta = measure(spec, ctx, results, condition, chain)
            cache.put("evaluate", key, {"info": meta})
            results.cache[condition] = cache.status
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


def measured(
    plugin: Attack | Defense, subject: Subject, apply: Callable[[Subject], StageResult]
) -> tuple[StageResult, dict]:
    """`apply(subject)`, and for a plugin that declares a preservation tolerance the drift of
    its output against its input on the probe batch ({} otherwise)."""
    tolerance = plugin.preservation_tolerance()
    if tolerance is None:
        return apply(subject), {}
    ids = probe_ids(subject.tokenizer)
    before = probe_logits(subject.model, ids)
    out = apply(subject)
    report = {**compare(before, probe_logits(out.model, ids)), "tolerance": tolerance}
    if plugin.preservation_tolerance_bf16() is not None:
        report["tolerance_bf16"] = plugin.preservation_tolerance_bf16()
    return out, report


def check_drift(group: str, plugin: Attack | Defense, report: dict) -> None:
    """Stop when a function-preserving stage drifted beyond its tolerance."""
    if not report:
        return
    drift = report["max_abs_logit_diff_fp32"]
    if not drift <= report["tolerance"]:
        raise PreservationError(
            f"{group}={plugin.name} changed the function: max |Δlogit| fp32 = {drift:.3g} > "
            f"{group}.tolerance = {report['tolerance']:g} (report in results.json)"
        )
    drift16 = report["max_abs_logit_diff_bf16"]
    if "tolerance_bf16" in report and not drift16 <= report["tolerance_bf16"]:
        raise PreservationError(
            f"{group}={plugin.name} is not exact in bf16: max |Δlogit| bf16 = {drift16:.3g} > "
            f"{report['tolerance_bf16']:g} (report in results.json)"
        )


def attack_step(spec: Spec, ctx: RunContext, results: Results) -> Step:
    """A(M) as a cached stage: the manifest goes to attack_manifest.json, the drift report
    of a function-preserving attack to results.json `function_preservation`."""

    def run(subject: Subject) -> StageResult:
        out, report = measured(spec.attack, subject, lambda s: spec.attack.apply(s, ctx))
        results.function_preservation = report
        results.save()
        check_drift("attack", spec.attack, report)
        files = list(out.files)
        if out.info:
            atomic_write_json(ctx.run_dir / MANIFEST, out.info)
            files.append(MANIFEST)
        return StageResult(out.model, {"function_preservation": report}, files)

    return Step(
        "attack",
        [results.config["attack"], spec.attack.fingerprint()],
        run,
        record=lambda info: setattr(
            results, "function_preservation", info["function_preservation"]
        ),
    )


def defend_step(spec: Spec, ctx: RunContext, results: Results, branch: str) -> Step:
    """D as a cached stage (keyed by the quantizer too: defenses read its grid)."""

    def run(subject: Subject) -> StageResult:
        apply = lambda s: spec.defense.apply(s, spec.quantizer, ctx)  # noqa: E731
        out, report = measured(spec.defense, subject, apply)
        info = {**out.info, **({"function_preservation": report} if report else {})}
        results.defense_stats[branch] = info
        if report:
            results.save()
        check_drift("defense", spec.defense, report)
        return StageResult(out.model, info, out.files)

    return Step(
        "defend",
        [results.config["defense"], results.config["quantizer"], spec.defense.fingerprint()],
        run,
        record=lambda info: results.defense_stats.__setitem__(branch, info),
    )


def quantize_step(spec: Spec, ctx: RunContext, results: Results, branch: str) -> Step:
    """Q as a cached stage; never cached when it must write the native artifact."""
    return Step(
        "quantize",
        [results.config["quantizer"], spec.quantizer.fingerprint()],
        lambda subject: spec.quantizer.quantize(subject, ctx),
        record=lambda info: results.quantization.__setitem__(branch, info),
        plain_output=spec.quantizer.plain_output,
        cacheable=not ctx.save_quantized,
    )


def save_attacked(chain: Chain, ctx: RunContext) -> None:
    """The attacked model and its tokenizer as a plain Hugging Face safetensors checkpoint
    in `attacked/` of the run dir (what an attacker would publish), written atomically."""
    loaded = chain.model()
    with atomic_dir(ctx.run_dir / "attacked") as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    log.info("attacked model written to %s", ctx.run_dir / "attacked")


def run_pipeline(spec: Spec, ctx: RunContext, results: Results) -> None:
    """Run every requested condition, two branches of (full precision, quantized)."""
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
        chain = Chain(lambda: spec.model.load(ctx), root, ctx, results, base)
        if base == "attacked" and not spec.attack.identity:
            chain.add(attack_step(spec, ctx, results))
            if ctx.save_attacked:
                save_attacked(chain, ctx)
        if base in wanted:
            evaluate(spec, ctx, results, base, chain, originals)
        if quantized in wanted:
            results.defense_stats[base], results.quantization[base] = {}, {}  # none: identity
            if not spec.defense.identity:
                chain.add(defend_step(spec, ctx, results, base))
            if not spec.quantizer.identity:
                chain.add(quantize_step(spec, ctx, results, base))
            evaluate(spec, ctx, results, quantized, chain, originals)
        del chain


class AlreadyComplete(Exception):
    """The run dir holds a complete results.json of this very config (nothing to do)."""


def check_run_dir(run_dir: Path, config: dict) -> None:
    """A complete result is never overwritten: the same config is not run again
    (AlreadyComplete), another config is refused (ConfigError)."""
    done = complete_config(run_dir)
    if done is None:
        return
    if done == config:
        raise AlreadyComplete(str(run_dir))
    raise ConfigError(
        "hydra.run.dir",
        str(run_dir),
        "a directory without a complete run of another config (it holds one: choose another "
        "hydra.run.dir, or delete it to run again)",
    )


def check_model(spec: Spec, ctx: RunContext) -> dict:
    """Every check that needs the model's config.json or the hub, before any weights load;
    returns the memory plan (a model that cannot fit the device stops here)."""
    spec.run.similarity.check_sources()
    config = spec.model.hf_config(ctx)
    for plugin in spec.plugins():
        plugin.check_model(config)
    return check_fits(config, ctx.dtype, ctx.device, "model", spec.model.name)


def run(
    cfg: DictConfig, run_dir: Path, job_name: str = "qexp", group: str | None = None
) -> Results:
    """Validate `cfg` and the model's config (before any weights load), run the pipeline,
    write results. Raises AlreadyComplete when `run_dir` already holds this run."""
    spec = validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    check_run_dir(Path(run_dir), config)
    ctx = RunContext.from_schema(spec.run, run_dir)
    plan = check_model(spec, ctx)
    results = Results(run_dir, config, provenance(spec.model.name, str(ctx.device), spec.run.dtype))
    results.memory["plan"] = plan
    results.save()
    spec.logger.start(config, run_dir, job_name, group)
    status = "failed"
    try:
        with results.heartbeat():
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
    log.info("results (%s)\n%s", run_dir / "results.json", format_table(results.conditions))
    return results
