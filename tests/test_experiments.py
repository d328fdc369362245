"""Every conf/experiment/*.yaml runs as a sweep (`python -m qexp -m experiment=<name>`) on a
tiny model, with the stage cache on, and every job of it completes."""

import json

import pytest
import yaml

from tests.conftest import CONF, FIXTURES, qexp_batch

pytestmark = pytest.mark.slow
TINY = [
    "model=tiny_llama",
    "logger=none",
    "progress=false",
    "benchmark.limit=2",
    "benchmark.max_new_tokens=4",
    "similarity.bertscore=false",
]
ENCRYPT = ["attack.kappa_one_layers=0"]
# what a 2-layer random model needs beyond TINY (GPTQModel: as many kv heads as heads)
EXTRA = {
    "encrypt_ablation": ENCRYPT,
    "encrypt_eps": ENCRYPT,
    "encrypt_gamma": ENCRYPT,
    "encrypt_kappa": ENCRYPT,
    "noise_grid": [],
    "paper_svamp": [*ENCRYPT, "model.num_kv_heads=4", "quantizer.group_size=32"],
    "paper_aime": [
        *ENCRYPT,
        f"benchmark.path={FIXTURES / 'aime_small.jsonl'}",
        "benchmark.source=file",
        "benchmark.chat_template=false",
    ],
}
# experiment=matrix has its own tests (tests/test_matrix.py: smoke size, n/a cells)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "matrix")


def sweep_size(name: str, overrides: list[str]) -> int:
    """Jobs in the experiment's sweep, minus parameters fixed on the command line."""
    params = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())["hydra"]
    fixed = {o.split("=")[0] for o in overrides}
    n = 1
    for key, values in params["sweeper"]["params"].items():
        if key not in fixed:
            n *= len(str(values).replace("],[", "]|[").split("|" if "[" in str(values) else ","))
    return n


def test_every_experiment_is_tested():
    assert set(EXPERIMENTS) == set(EXTRA)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, cache_dir):
    """Every experiment's sweep, run by qexp's entry point in one interpreter."""
    root = tmp_path_factory.mktemp("experiments")
    cases = [
        ["-m", f"experiment={name}", *TINY, *EXTRA[name], f"hydra.sweep.dir={root / name}"]
        + ["cache=on"]
        for name in EXPERIMENTS
    ]
    return root, dict(zip(EXPERIMENTS, qexp_batch(cases, root, cache_dir, timeout=1800)))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweep_runs(name, sweeps):
    root, runs = sweeps
    p = runs[name]
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(f.parent for f in (root / name).rglob("results.json"))
    assert all(d.parent == root / name for d in jobs)  # one dir per job, not nested by paths
    assert len(jobs) == sweep_size(name, [*TINY, *EXTRA[name]])
    for d in jobs:
        body = json.loads((d / "results.json").read_text())
        assert body["status"] == "complete", (d.name, body.get("error"))
        assert set(body["conditions"]) == set(body["config"]["conditions"])
        assert body["config"]["model"]["name"] == "tiny_llama"
        if name.startswith("encrypt_"):  # a reparameterization: the function is kept
            assert body["config"]["attack"]["name"] == "encrypt"
            assert body["function_preservation"]["max_abs_logit_diff_fp32"] < 1e-3
