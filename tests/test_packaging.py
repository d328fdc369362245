"""What a user who pip-installs qexp gets: configs inside the wheel, console scripts, and
every third-party module qexp imports declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from qexp.core.registry import GROUPS
from tests.conftest import CONF, ROOT

SOURCES = [ROOT / "qexp", ROOT / "launchers"]


def imported_modules() -> set[str]:
    """Top-level names of every module imported anywhere in qexp/ and launchers/."""
    names = set()
    for root in SOURCES:
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def declared() -> set[str]:
    """Distribution names in pyproject.toml's dependencies and extras (normalized)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {norm(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in reqs}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# installed by `make setup` with --no-deps, pinned in constraints.txt: its declared
# dependencies (torchaudio, gemlite) would pull a CUDA build of torch
NO_DEPS = {"sinq"}


def test_every_third_party_import_is_declared():
    dists = importlib.metadata.packages_distributions()
    own = {"qexp", "hydra_plugins", "__future__", *NO_DEPS}
    missing = {}
    for mod in sorted(imported_modules() - set(sys.stdlib_module_names) - own):
        providers = {norm(d) for d in dists.get(mod, [])}
        assert providers, f"{mod} is imported but no installed distribution provides it"
        if not providers & declared():
            missing[mod] = sorted(providers)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    pins = (ROOT / "constraints.txt").read_text()
    for name in NO_DEPS:
        assert re.search(rf"^{name}==", pins, re.M), name
        assert f"--no-deps -c constraints.txt {name}" in (ROOT / "Makefile").read_text(), name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (whl,) = out.glob("qexp-*.whl")
    return whl


def test_the_wheel_carries_every_config_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    confs = {f"qexp/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert confs and confs <= names, sorted(confs - names)
    assert {"qexp/data/instruct.jsonl", "qexp/data/reference.txt"} <= names
    # launchers/hydra_plugins is mapped into the namespace Hydra searches; the license ships
    assert "hydra_plugins/qexp_ray_launcher/ray_launcher.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)[-8:]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for script in ("qexp", "qexp-audit", "qexp-encrypt", "qexp-report", "qexp-build-ggml"):
        assert re.search(rf"^{script} = ", scripts, re.M), script


@pytest.mark.slow
def test_the_installed_wheel_composes_every_group_and_runs_from_another_dir(wheel, tmp_path):
    """Installed without the clone (pip --target, run from an empty dir): every option of
    every group composes, and a tiny job runs."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
        + [str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "QEXP_CACHE_DIR": str(tmp_path / "cache")}

    def qexp(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(site / "bin" / "qexp"), *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    compose_all = (
        "import qexp, pathlib\n"
        "from hydra import compose, initialize_config_dir\n"
        "from qexp.core.registry import GROUPS, options\n"
        "from qexp.pipeline.spec import validate\n"
        "conf = pathlib.Path(qexp.__file__).parent / 'conf'\n"
        "n = 0\n"
        "for group in GROUPS:\n"
        "    for name in options(group):\n"
        "        extra = {('model', 'hf'): ['model.id=org/name'],\n"
        "                 ('benchmark', 'humaneval'): ['benchmark.allow_code_execution=true'],\n"
        "                 ('attack', 'prune_gap'): ['prune=wanda'],\n"
        "                 }.get((group, name), [])\n"
        "        with initialize_config_dir(str(conf), version_base='1.3'):\n"
        "            spec = validate(compose('config', [f'{group}={name}', *extra]))\n"
        "        if (group, name) == ('quantizer', 'gptq4'):\n"
        "            assert type(spec.quantizer).__name__ == 'GPTQModelQuant'\n"
        "        n += 1\n"
        "print(n, conf)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", compose_all],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    count, conf = p.stdout.split()
    expected = sum(len(list((CONF / g).glob("*.yaml"))) for g in GROUPS)
    assert int(count) == expected and conf.startswith(str(site))
    p = qexp(
        "model=tiny_llama",
        "logger=none",
        "benchmark.limit=1",
        "benchmark.max_new_tokens=2",
        "progress=false",
        "similarity.enabled=false",
        "conditions=[original,original_q]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "complete"
    # every other console script of the wheel's entry points answers --help (one interpreter)
    helps = (
        "import contextlib, importlib.metadata as md, io, sys\n"
        "for ep in md.distribution('qexp').entry_points:\n"
        "    if ep.group == 'console_scripts' and ep.name != 'qexp':\n"
        "        sys.argv = [ep.name, '--help']\n"
        "        try:\n"
        "            with contextlib.redirect_stdout(io.StringIO()):\n"
        "                ep.load()()\n"
        "        except SystemExit as e:\n"
        "            print(ep.name, e.code)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", helps], cwd=work, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr[-2000:]
    codes = dict(line.split() for line in p.stdout.splitlines())
    scripts = ("qexp-audit", "qexp-encrypt", "qexp-canonicalize", "qexp-report", "qexp-build-ggml")
    assert codes == {s: "0" for s in scripts}


def test_the_streaming_tools_start_without_transformers_models():
    """qexp-encrypt, qexp-canonicalize and qexp-audit never build a model: importing them
    must not import transformers' modeling code (seconds of start-up and ~300 MB of RSS)."""
    code = (
        "import sys, qexp.tools.encrypt, qexp.tools.canonicalize, qexp.audit.cli; "
        "print([m for m in ('transformers.modeling_utils', 'transformers.models.auto."
        "modeling_auto') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout
