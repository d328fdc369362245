"""A branch's model, built lazily through its cached stages (qexp/core/cache.py).

A branch is load -> [attack] -> [defend -> quantize], and an evaluation may follow any of
them. Each step's output is keyed by its config, the plugin's fingerprint, the upstream key
and the seed. The model is only built when something needs it: an evaluation whose result
is cached needs nothing but the recorded results (stats, files) of the steps before it, and
a step whose weights are cached is loaded instead of run. An evaluation is a step like the
others, except that it leaves the model as it was and only its result is stored.

Everything a step produces reaches results.json through one channel: `Results.record_step`
(the step's info), `Results.mark_cache` (computed, stored or hit) and `Results.stage`
(seconds and peak memory), called here and nowhere else for model steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from qexp.core.cache import Entry, StageCache, digest
from qexp.core.context import RunContext
from qexp.core.plugin import StageResult, Subject
from qexp.models.base import LoadedModel
from qexp.pipeline.results import Results


@dataclass
class Step:
    """One stage of a branch: attack, defend, quantize, or an evaluation (`evaluate_*`)."""

    name: str
    config: Any  # what, beside the upstream key and the seed, determines the output
    run: Callable[[Subject], StageResult]
    # a computed (never a cached) result is checked after it is recorded (preservation)
    check: Optional[Callable[[dict], None]] = None
    plain_output: bool = True  # the output has the loaded model's parameters (storable)
    cacheable: bool = True  # False: always run (e.g. it writes an artifact the user asked for)


class Chain:
    """The model of one branch: loaded on demand, then advanced through the steps."""

    def __init__(
        self,
        load: Callable[[], LoadedModel],
        root_key: str,
        ctx: RunContext,
        results: Results,
        branch: str,
    ) -> None:
        self.load, self.ctx, self.results, self.branch = load, ctx, results, branch
        self.cache: StageCache = ctx.stages
        self.steps: list[Step] = []
        self.keys = [root_key]
        self.loaded: Optional[LoadedModel] = None
        self.done = 0  # steps applied to self.loaded

    @property
    def key(self) -> str:
        """The key of the model state after every step added so far."""
        return self.keys[-1]

    def add(self, step: Step) -> None:
        """Append a model step (its key chains from the current one). A step after one whose
        output is not plain is not plain either (its model is not the checkpoint's
        parameter set: it cannot be stored and loaded into a freshly loaded model)."""
        if self.steps and not self.steps[-1].plain_output:
            step.plain_output = False
        self.steps.append(step)
        self.keys.append(digest(step.name, self.key, step.config, self.ctx.seed))

    def _entry(self, step: Step, key: str) -> Optional[Entry]:
        return self.cache.get(step.name, key) if step.cacheable else None

    def restore(self) -> bool:
        """Restore the recorded results of the steps not applied yet from their cache
        entries; False (nothing restored) if any entry is missing."""
        todo = range(self.done, len(self.steps))
        entries = [self._entry(self.steps[i], self.keys[i + 1]) for i in todo]
        if any(e is None for e in entries):
            return False
        for i, e in zip(todo, entries):
            self._restore(self.steps[i], e)
        return True

    def _restore(self, step: Step, entry: Entry) -> None:
        self._record(step, entry.meta["info"], "hit")
        entry.restore_files(self.ctx.run_dir)

    def _record(self, step: Step, info: dict, how: str) -> None:
        self.results.record_step(self.branch, step.name, info)
        self.results.mark_cache(f"{self.branch}/{step.name}", how)

    def model(self) -> LoadedModel:
        """The model after every step: cached weights where stored, computed otherwise."""
        if self.loaded is None:
            with self.results.stage(f"load_{self.branch}"):
                self.loaded = self.load()
            self.results.record_model(self.loaded.model)
        self._jump()
        for i in range(self.done, len(self.steps)):
            self._run(i)
        return self.loaded

    def _jump(self) -> None:
        """Load the furthest step whose weights are cached, restoring the steps before it."""
        for j in reversed(range(self.done, len(self.steps))):
            todo = range(self.done, j + 1)
            entries = [self._entry(self.steps[i], self.keys[i + 1]) for i in todo]
            if all(e is not None for e in entries) and entries[-1].has_model:
                with self.results.stage(f"{self.steps[j].name}_{self.branch}"):
                    entries[-1].load_into(self.loaded.model)
                for i, e in zip(todo, entries):
                    self._restore(self.steps[i], e)
                self.done = j + 1
                return

    def _run(self, i: int) -> None:
        step, key = self.steps[i], self.keys[i + 1]
        cache = self.cache if step.cacheable else StageCache(self.cache.root, "off")
        with cache.lock(step.name, key):
            entry = cache.get(step.name, key)  # another job may have just stored it
            with self.results.stage(f"{step.name}_{self.branch}"):
                if entry is not None and entry.has_model:
                    entry.load_into(self.loaded.model)
                    self._restore(step, entry)
                else:
                    out = self._compute(step, self.keys[i])
                    self.loaded.model = out.model
                    store = step.plain_output and step.name in self.ctx.cache_weights
                    cache.put(
                        step.name,
                        key,
                        {"info": out.info, "files": sorted(set(out.files))},
                        self.loaded.model if store else None,
                        run_dir=self.ctx.run_dir,
                    )
                    self.results.mark_cache(f"{self.branch}/{step.name}", cache.status)
        self.done = i + 1

    def _compute(self, step: Step, key: str) -> StageResult:
        """Run `step` on the current model; record its info, then run its check."""
        self.ctx.seed_everything()
        out = step.run(self._subject(self.loaded, key))
        self.results.record_step(self.branch, step.name, out.info)
        if step.check is not None:
            step.check(out.info)
        return out

    def _subject(self, loaded: LoadedModel, key: str) -> Subject:
        return Subject(loaded.model, loaded.tokenizer, self.branch, key, loaded.source)

    def evaluate(self, step: Step, condition: str) -> dict:
        """The result of evaluation `step` on the branch's model as it stands: from the stage
        cache (the model is then not even built) or measured now and stored."""
        key = digest(step.name, self.key, step.config, self.ctx.seed)
        with self.cache.lock(step.name, key):
            entry = self.cache.get(step.name, key)
            if entry is not None and self.restore():
                self.results.mark_cache(condition, "hit")
                return entry.meta["info"]
            loaded = self.model()
            with self.results.stage(f"{step.name}_{condition}"):
                self.ctx.seed_everything()
                info = step.run(self._subject(loaded, key)).info
            self.cache.put(step.name, key, {"info": info})
            self.results.mark_cache(condition, self.cache.status)
        return info
