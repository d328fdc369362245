"""The floor plan (docs/design.md): packages by role, the import contracts CI enforces,
the cluster templates in launchers/, and a new back-end as one module plus one YAML."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from qexp.core import registry
from tests.conftest import CONF, ROOT, TINY, qexp_batch

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_the_package_root_holds_packages_the_app_and_the_api_only():
    modules = sorted(p.name for p in (ROOT / "qexp").glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "api.py", "app.py"]
    packages = sorted(p.name for p in (ROOT / "qexp").iterdir() if (p / "__init__.py").is_file())
    assert packages == [
        "attacks",
        "audit",
        "benchmarks",
        "checkpoint",
        "core",
        "data",
        "defenses",
        "loggers",
        "models",
        "pipeline",
        "pruners",
        "quantizers",
        "tools",
    ]
    assert (ROOT / "conf" / "config.yaml").is_file() and not (ROOT / "qexp" / "conf").exists()
    assert registry.CONF_DIR == ROOT / "conf"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_contracts_hold_and_catch_a_wrong_import(tmp_path):
    """lint-imports passes on the tree and fails on a copy where infrastructure imports the
    pipeline (a layer above it) and a defense imports a sibling defense."""
    ok = lint_imports(ROOT)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "0 broken" in ok.stdout
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "qexp", copy / "qexp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    with open(copy / "qexp" / "core" / "io.py", "a") as f:
        f.write("\nfrom qexp.pipeline import results  # noqa: E402,F401\n")
    with open(copy / "qexp" / "defenses" / "clip.py", "a") as f:
        f.write("\nfrom qexp.defenses import noise  # noqa: E402,F401\n")
    bad = lint_imports(copy)
    assert bad.returncode != 0
    assert "qexp.core is not allowed to import qexp.pipeline" in bad.stdout, bad.stdout[-3000:]
    assert "qexp.defenses.clip is not allowed to import qexp.defenses.noise" in bad.stdout


def test_the_launcher_templates_compose(tmp_path, cache_dir):
    """launchers/hydra/launcher/*.yaml extend the stock configs (picked with --config-dir);
    launchers/ray/cluster.yaml is a `ray up` definition."""
    show = ["--config-dir", str(ROOT / "launchers"), "--cfg", "hydra", "-p", "hydra.launcher"]
    slurm, ray = qexp_batch(
        [[*show, "hydra/launcher=my_slurm"], [*show, "hydra/launcher=my_ray"]], tmp_path, cache_dir
    )
    assert slurm.returncode == 0 and ray.returncode == 0, slurm.stderr + ray.stderr
    s = yaml.safe_load(slurm.stdout)
    assert s["_target_"].endswith("SlurmLauncher") and s["partition"] == "gpu"
    assert s["timeout_min"] == 240 and any("QEXP_CACHE_DIR" in x for x in s["setup"])
    r = yaml.safe_load(ray.stdout)
    assert r["_target_"] == "hydra_plugins.qexp_ray_launcher.ray_launcher.RayLauncher"
    assert r["address"] == "auto" and r["num_gpus"] == 1
    assert "QEXP_CACHE_DIR" in r["init"]["runtime_env"]["env_vars"]
    cluster = yaml.safe_load((ROOT / "launchers" / "ray" / "cluster.yaml").read_text())
    assert cluster["provider"]["type"] == "local"
    for key in ("cluster_name", "auth", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cluster, key
    assert len(cluster["provider"]["worker_ips"]) == cluster["min_workers"]


TOY_MODULE = '''
"""A toy library back-end and a toy grid quantizer, as a contributor would add them."""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qexp.quantizers.library.base import Library, ModuleQuantizer
from qexp.quantizers.rtn import RTN


class Rounded(nn.Module):
    """The "library's" module: weights rounded to a 1/16 lattice per group scale."""

    def __init__(self, lin: nn.Linear, group: int) -> None:
        super().__init__()
        w = lin.weight.detach().reshape(lin.out_features, -1, group)
        s = w.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
        self.register_buffer("w", (torch.round(w / s) * s).reshape(lin.weight.shape))
        self.bias = lin.bias

    def dequantize(self) -> torch.Tensor:
        return self.w

    def forward(self, x):
        return nn.functional.linear(x, self.w, self.bias)


@dataclass
class ToyQuant(ModuleQuantizer):
    library: ClassVar[Library] = Library("torch", "pip install torch", "toy")
    data_dependent: ClassVar[bool] = True  # pretend: the matrix plan prices it so

    name: str = "toy4"
    group_size: int = 32

    def library_module(self, name, lin, notes):
        notes["layers"] = notes.get("layers", 0) + 1
        return Rounded(lin, self.group_size)


@dataclass
class SymRTN(RTN):
    name: str = "rtn4_sym"
    symmetric: bool = True
'''


@pytest.fixture
def toy_conf(tmp_path, monkeypatch):
    """A copy of conf/ with the two new options, and their module on sys.path."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (tmp_path / "qexp_toy_backend.py").write_text(textwrap.dedent(TOY_MODULE))
    (conf / "quantizer" / "toy4.yaml").write_text(
        "_target_: qexp_toy_backend.ToyQuant\nname: toy4\nbits: 4\ngroup_size: 32\n"
    )
    (conf / "quantizer" / "rtn4_sym.yaml").write_text(
        "_target_: qexp_toy_backend.SymRTN\nname: rtn4_sym\nbits: 4\ngroup_size: 32\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "CONF_DIR", conf)
    registry._composed.cache_clear()
    yield conf
    registry._composed.cache_clear()


def test_a_new_backend_is_one_module_and_one_yaml(toy_conf, tmp_path, cache_dir):
    """Nothing else is edited: the options list, validation, the pipeline, the gap attack's
    targets, the matrix plan and the results read what the classes declare."""
    from qexp.pipeline.run import run
    from qexp.quantizers.base import grid_options, target_options

    assert {"toy4", "rtn4_sym"} <= set(registry.options("quantizer"))
    assert "rtn4_sym" in grid_options() and "rtn4_sym" in target_options()
    assert "toy4" not in target_options()  # a library back-end without boxes
    assert registry.option_class("quantizer", "toy4", "q").data_dependent

    def cfg(*overrides):
        with initialize_config_dir(config_dir=str(toy_conf), version_base="1.3"):
            return compose("config", [*TINY, f"cache_dir={cache_dir}", *overrides])

    res = run(cfg("quantizer=toy4", "conditions=[original_q]"), tmp_path / "toy")
    q = json.loads((tmp_path / "toy" / "results.json").read_text())["quantization"]["original"]
    assert q["library"].startswith("torch ") and q["layers"] == q["modules"] > 0
    assert q["kernel_vs_dequant_max_rel_err"] < 1e-5
    assert res.conditions["original_q"]["n_items"] == 4
    # the grid quantizer is a gap-attack target at once (its boxes come from RTN's geometry)
    from qexp.pipeline.spec import validate

    spec = validate(cfg("attack=gap", "quantizer=rtn4_sym"))
    assert [q.name for q in spec.attack.quantizers] == ["rtn4_sym"]
    assert spec.attack.quantizers[0].symmetric
