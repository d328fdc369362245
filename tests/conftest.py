"""Shared fixtures: compose the real Hydra configs with tiny-model overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from transformers import PreTrainedModel

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# A fast run on a tiny random model: 4 items, 8 new tokens, no W&B, no stage cache.
TINY = [
    "model=tiny_llama",
    "logger=none",
    "benchmark.limit=4",
    "benchmark.max_new_tokens=8",
    "benchmark.batch_size=2",
    "progress=false",
    "cache=off",  # tests stay independent; tests/test_cache.py turns it on
]


# The same for a `python -m qexp` subprocess (its cache comes from QEXP_CACHE_DIR).
CLI_TINY = [
    "model=tiny_llama",
    "logger=none",
    "benchmark.limit=2",
    "benchmark.max_new_tokens=4",
    "progress=false",
]

# `qexp`'s entry point (qexp.app.main) on each argv in turn, in one fresh interpreter: what a
# user's command does, without paying the interpreter's start-up (torch, transformers) per case.
_BATCH = """
import contextlib, io, json, sys, traceback
from hydra.core.global_hydra import GlobalHydra
from qexp.app import main
cases, dest, out = sys.argv[1], sys.argv[2], []
for argv in json.load(open(cases)):
    so, se, code = io.StringIO(), io.StringIO(), 0
    sys.argv = ["qexp", *argv]
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    GlobalHydra.instance().clear()
    out.append({"returncode": code, "stdout": so.getvalue(), "stderr": se.getvalue()})
json.dump(out, open(dest, "w"))
"""


def cli_env(cache_dir: Path, extra: dict | None = None) -> dict:
    """The environment of a qexp command in the tests: its cache, offline (never the hub)."""
    return {
        **os.environ,
        "QEXP_CACHE_DIR": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(extra or {}),
    }


def embedded_first_last(cache_dir: Path, run_dir: Path):
    """The embedded model (real weights and tokenizer) cut to its first and last decoder
    layers."""

    def make_cfg(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", [f"cache_dir={cache_dir}", "logger=none", *overrides])

    _, _, lm = load_spec(make_cfg, run_dir)
    layers = lm.model.model.layers
    lm.model.model.layers = torch.nn.ModuleList([layers[0], layers[-1]])
    lm.model.config.num_hidden_layers = 2
    if getattr(lm.model.config, "layer_types", None):
        lm.model.config.layer_types = lm.model.config.layer_types[:2]
    return lm


def qexp_batch(
    cases: list[list[str]], tmp: Path, cache_dir: Path, env=None, timeout: int = 600
) -> list:
    """Results (returncode, stdout, stderr) of `qexp <argv>` for every argv of `cases`."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    full = cli_env(cache_dir, env)
    p = subprocess.run(
        [sys.executable, "-c", _BATCH, str(tmp / "cases.json"), str(tmp / "out.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return [SimpleNamespace(**r) for r in json.loads((tmp / "out.json").read_text())]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session; under pytest-xdist the workers share its converted
    models (the conversion is locked and atomic), so the embedded model converts once."""
    path = tmp_path_factory.mktemp("qexp-cache")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "qexp-models"
        shared.mkdir(exist_ok=True)
        (path / "models").symlink_to(shared, target_is_directory=True)
    return path


@pytest.fixture
def make_cfg(cache_dir: Path):
    """compose('config', overrides) against the project's conf/ directory."""

    def _make(*overrides: str, tiny: bool = True) -> DictConfig:
        ovr = [*(TINY if tiny else []), f"cache_dir={cache_dir}", *overrides]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=ovr)

    return _make


@torch.no_grad()
def continuation_nll(  # reference: one plain forward pass
    model: PreTrainedModel, prefix_ids: Sequence[int], target_ids: Sequence[int]
) -> tuple[float, int]:
    """Sum of -log p(target | prefix) over target tokens, and their count."""
    if not target_ids:
        return 0.0, 0
    ids = torch.tensor([list(prefix_ids) + list(target_ids)], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prefix_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    tgt = ids[0, len(prefix_ids) :]
    return float(-logp.gather(1, tgt[:, None]).sum()), len(target_ids)


def load_spec(make_cfg, run_dir: Path, *overrides: str):
    """Validate a composed config, build its run context and load its model."""
    from qexp.core.context import RunContext
    from qexp.pipeline.spec import validate

    spec = validate(make_cfg(*overrides))
    ctx = RunContext.from_schema(spec.run, run_dir)
    return spec, ctx, spec.model.load(ctx)


def subject(model, tokenizer=None, branch: str = "original", key: str = "test"):
    """A stage's input for calling a plugin directly (tokenizer-free plugins take None)."""
    from qexp.core.plugin import Subject

    return Subject(model, tokenizer, branch, key)


def plain_ctx(tmp_path: Path, seed: int = 0, cache: str = "off"):
    """A CPU/fp32 run context without a config, its cache and run dir under `tmp_path`."""
    from qexp.core.cache import StageCache
    from qexp.core.context import RunContext

    return RunContext(
        seed=seed,
        device=torch.device("cpu"),
        dtype=torch.float32,
        cache_dir=tmp_path,
        run_dir=tmp_path,
        stages=StageCache(tmp_path / "stages", cache),
        progress=False,
    )


def levels_per_group(w: torch.Tensor, group: int) -> int:
    """Most distinct values in one row-group of a [out, in] weight."""
    g = w.reshape(w.shape[0], -1, group)
    return max(len(torch.unique(g[i, j])) for i in range(g.shape[0]) for j in range(g.shape[1]))


def without_module(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make `importlib.util.find_spec(module)` report the library as not installed."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a)
    )
