"""A branch's model, built lazily through its cached stages (qexp/core/cache.py).

A branch is load -> [attack] -> [defend -> quantize]. Each step's output is keyed by its
config, the plugin's fingerprint, the upstream key and the seed. The model is only built
when something needs it: an evaluation whose result is cached needs nothing but the
recorded results (stats, files) of the steps before it, and a step whose weights are cached
is loaded instead of run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from qexp.core.cache import Entry, StageCache, digest
from qexp.core.context import RunContext
from qexp.models.base import LoadedModel
from qexp.core.plugin import StageResult, Subject
from qexp.pipeline.results import Results


@dataclass
class Step:
    """One model stage of a branch (attack, defend or quantize)."""

    name: str
    config: Any  # what, beside the upstream key and the seed, determines the output
    run: Callable[[Subject], StageResult]
    record: Callable[[dict], None]  # put a result's info into Results (computed or cached)
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
        """Append a step (its key chains from the current one)."""
        self.steps.append(step)
        self.keys.append(digest(step.name, self.key, step.config, self.ctx.seed))

    def _entry(self, i: int) -> Optional[Entry]:
        step = self.steps[i]
        return self.cache.get(step.name, self.keys[i + 1]) if step.cacheable else None

    def _mark(self, i: int, how: str) -> None:
        self.results.cache[f"{self.branch}/{self.steps[i].name}"] = how

    def restore(self) -> bool:
        """Restore the recorded results of the steps not applied yet from their cache
        entries; False (nothing restored) if any entry is missing."""
        entries = [self._entry(i) for i in range(self.done, len(self.steps))]
        if any(e is None for e in entries):
            return False
        for i, e in enumerate(entries, start=self.done):
            self._restore(i, e)
        return True

    def _restore(self, i: int, entry: Entry) -> None:
        self.steps[i].record(entry.meta["info"])
        entry.restore_files(self.ctx.run_dir)
        self._mark(i, "hit")

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
            entries = [self._entry(i) for i in range(self.done, j + 1)]
            if all(e is not None for e in entries) and entries[-1].has_model:
                with self.results.stage(f"{self.steps[j].name}_{self.branch}"):
                    entries[-1].load_into(self.loaded.model)
                for i, e in enumerate(entries, start=self.done):
                    self._restore(i, e)
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
                    self._restore(i, entry)
                else:
                    self.ctx.seed_everything()
                    subject = Subject(
                        self.loaded.model, self.loaded.tokenizer, self.branch, self.keys[i]
                    )
                    out = step.run(subject)
                    self.loaded.model = out.model
                    step.record(out.info)
                    store = step.plain_output and step.name in self.ctx.cache_weights
                    cache.put(
                        step.name,
                        key,
                        {"info": out.info, "files": sorted(set(out.files))},
                        self.loaded.model if store else None,
                        run_dir=self.ctx.run_dir,
                    )
                    self._mark(i, cache.status)
        self.done = i + 1
