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
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from qexp.benchmarks.metrics import token_nll
from qexp.core.cache import VERSION, code_digest, digest, library_versions
from qexp.core.context import RunContext
from qexp.core.errors import ConfigError
from qexp.core.geometry import max_positions
from qexp.core.io import atomic_dir, atomic_write_json
from qexp.core.memory import check_fits
from qexp.core.plots import plot_loglik
from qexp.core.plugin import StageResult, Subject
from qexp.data import reference_text
from qexp.pipeline import uncertainty
from qexp.pipeline.preservation import check_drift, measured
from qexp.pipeline.results import Results, complete_config, format_table, provenance
from qexp.pipeline.spec import Spec, validate
from qexp.pipeline.stages import Chain, Step
from qexp.pipeline.uncertainty import Evidence

log = logging.getLogger(__name__)
BRANCHES = (("original", "original_q"), ("attacked", "attacked_q"))
MANIFEST = "attack_manifest.json"


class Pipeline:
    """One job: the branches of the validated `spec`, their steps, and where what they
    produce goes (results.json through `results`, the logger, files in the run dir)."""

    def __init__(self, spec: Spec, ctx: RunContext, results: Results) -> None:
        self.spec, self.ctx, self.results = spec, ctx, results
        self.config = results.config
        self.originals: list[dict] = []  # original's generations, for similarity
        self.evidence: dict[str, Evidence] = {}  # per condition, for paired comparisons

    def run(self) -> None:
        """Every requested condition, two branches of (full precision, quantized)."""
        spec, c = self.spec, self.config
        root = digest(
            "load",
            VERSION,
            c["model"],
            spec.model.fingerprint(),
            c["dtype"],
            str(self.ctx.device),
            library_versions(),
            code_digest() if spec.run.cache_code else "code not in keys (cache_code=false)",
        )
        for base, quantized in BRANCHES:
            wanted = [x for x in (base, quantized) if x in spec.run.conditions]
            if not wanted:
                continue
            chain = Chain(lambda: spec.model.load(self.ctx), root, self.ctx, self.results, base)
            if base == "attacked" and not spec.attack.identity:
                chain.add(self.attack_step())
                if self.ctx.save_attacked:
                    self.save_attacked(chain)
            if base in wanted:
                self.evaluate(chain, base)
            if quantized in wanted:
                for step in ("defend", "prune", "quantize"):  # none: the identity, as {}
                    self.results.record_step(base, step, {})
                if not spec.defense.identity:
                    chain.add(self.defend_step())
                if not spec.prune.identity:
                    chain.add(self.prune_step())
                if not spec.quantizer.identity:
                    chain.add(self.quantize_step())
                self.evaluate(chain, quantized)
            del chain

    # ---- the steps ---------------------------------------------------------------------
    def attack_step(self) -> Step:
        """A(M): the manifest goes to attack_manifest.json, the drift report of a
        function-preserving attack to results.json `function_preservation`."""
        attack, ctx = self.spec.attack, self.ctx

        def run(subject: Subject) -> StageResult:
            out, report = measured(attack, subject, lambda s: attack.run(s, ctx))
            files = list(out.files)
            if out.info:
                atomic_write_json(ctx.run_dir / MANIFEST, out.info)
                files.append(MANIFEST)
            return StageResult(out.model, {"function_preservation": report}, files)

        check = lambda info: check_drift("attack", attack, info["function_preservation"])  # noqa: E731
        config = [self.config["attack"], attack.fingerprint()]
        return Step("attack", config, run, check, plain_output=attack.plain_output)

    def defend_step(self) -> Step:
        """D, keyed by the quantizer too (defenses read its grid)."""
        defense, quantizer, ctx = self.spec.defense, self.spec.quantizer, self.ctx

        def run(subject: Subject) -> StageResult:
            out, report = measured(defense, subject, lambda s: defense.apply(s, quantizer, ctx))
            info = {**out.info, **({"function_preservation": report} if report else {})}
            return StageResult(out.model, info, out.files)

        check = lambda info: check_drift("defense", defense, info.get("function_preservation"))  # noqa: E731
        config = [self.config["defense"], self.config["quantizer"], defense.fingerprint()]
        return Step("defend", config, run, check, plain_output=defense.plain_output)

    def prune_step(self) -> Step:
        """P: after the defense, before the quantizer."""
        prune, ctx = self.spec.prune, self.ctx
        config = [self.config["prune"], prune.fingerprint()]
        return Step("prune", config, lambda subject: prune.prune(subject, ctx))

    def quantize_step(self) -> Step:
        """Q; never cached when it must write the native artifact."""
        quantizer, ctx = self.spec.quantizer, self.ctx
        return Step(
            "quantize",
            [self.config["quantizer"], quantizer.fingerprint()],
            lambda subject: quantizer.quantize(subject, ctx),
            plain_output=quantizer.plain_output,
            cacheable=not ctx.save_quantized,
        )

    def evaluate_step(self, condition: str) -> Step:
        """Benchmark and reference perplexity of the model as it stands (`condition` only
        labels the progress bar: the result is keyed by the model state)."""
        spec, ctx = self.spec, self.ctx

        def run(subject: Subject) -> StageResult:
            model, tok = subject.model, subject.tokenizer
            bench = spec.benchmark.evaluate(model, tok, ctx, condition)
            window = min(1024, max_positions(model.config) or 1024)  # fewer: its windows
            nll = token_nll(model, tok, reference_text(), window, window // 2)
            info = {
                "metrics": {**bench.metrics, "ref_ppl": float(torch.exp(nll.mean()))},
                "records": bench.records,
                "nll": [round(float(x), 5) for x in nll],
                "bench_nll": bench.token_nll,
                "model_source": subject.source,
            }
            return StageResult(model, info)

        return Step("evaluate", [self.config["benchmark"], spec.benchmark.fingerprint()], run)

    # ---- evaluation --------------------------------------------------------------------
    def evaluate(self, chain: Chain, condition: str) -> None:
        """Benchmark, reference perplexity and similarity to `original` of one condition;
        the first two come from the stage cache when this model state was evaluated before."""
        meas = chain.evaluate(self.evaluate_step(condition), condition)
        metrics, records = dict(meas["metrics"]), meas["records"]
        atomic_write_json(
            self.ctx.run_dir / "loglik" / f"{condition}.json",
            {"text": "qexp/data/reference.txt", "nll": meas["nll"]},
        )
        if condition == "original":
            self.originals[:] = records
        elif self.originals and records:
            with self.results.stage(f"similarity_{condition}"):
                outputs = [r["output"] for r in records]
                originals = [r["output"] for r in self.originals]
                similar, per_item = self.spec.run.similarity.compare(outputs, originals)
                metrics.update(similar)
                if per_item:
                    records = [{**r, **s} for r, s in zip(records, per_item)]
        ev = Evidence(metrics, records, meas["nll"], meas["bench_nll"])
        self.results.add(
            condition, metrics, records, meas["model_source"], self.uncertainty(condition, ev)
        )
        self.spec.logger.log_condition(condition, metrics, records)

    def uncertainty(self, condition: str, ev: Evidence) -> dict:
        """The condition's intervals; its paired comparisons with the conditions evaluated
        before it go to results.json `comparisons`."""
        self.evidence[condition] = ev
        rates, seed = self.spec.benchmark.rates, self.ctx.seed
        for a, b in uncertainty.PAIRS:
            if condition in (a, b) and a in self.evidence and b in self.evidence:
                pair = uncertainty.compare(self.evidence[a], self.evidence[b], rates, seed)
                self.results.compare(uncertainty.pair_name(a, b), pair)
        return uncertainty.intervals(ev, rates, seed)

    def save_attacked(self, chain: Chain) -> None:
        """The attacked model and its tokenizer as a plain Hugging Face safetensors checkpoint
        in `attacked/` of the run dir (what an attacker would publish), written atomically."""
        loaded = chain.model()
        with atomic_dir(self.ctx.run_dir / "attacked") as tmp:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
        log.info("attacked model written to %s", self.ctx.run_dir / "attacked")


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
    results.record_plan(plan)
    spec.logger.start(config, run_dir, job_name, group)
    status, error = "failed", None
    try:
        with results.heartbeat():
            Pipeline(spec, ctx, results).run()
        plot_loglik(ctx.run_dir)
        status = "complete"
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        results.finish(status, error)
        spec.logger.finish(status, results.as_dict(), Path(run_dir))
    log.info(
        "results (%s)\n%s",
        run_dir / "results.json",
        format_table(results.conditions, results.intervals),
    )
    return results
