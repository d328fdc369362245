"""The hub path offline: `org/name` resolves from a local Hugging Face cache layout."""

import json
import subprocess
import sys

from qexp.core.context import RunContext
from tests.conftest import ROOT, cli_env, load_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, make_cfg, run_dir, repo="org/tiny-llama"):
    """HF_HUB_CACHE/models--org--tiny-llama/{refs/main, snapshots/<commit>/...} of a tiny
    model and its tokenizer, as `hf download` leaves it."""
    _, _, lm = load_spec(make_cfg, run_dir)
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / COMMIT
    lm.model.save_pretrained(snap, safe_serialization=True)
    lm.tokenizer.save_pretrained(snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    return repo


def test_a_hub_id_loads_from_the_local_cache_offline(make_cfg, tmp_path, cache_dir):
    repo = hub_cache(tmp_path / "hub", make_cfg, tmp_path / "build")
    run_dir = tmp_path / "run"
    env = cli_env(cache_dir, {"HF_HUB_CACHE": str(tmp_path / "hub")})  # HF_HUB_OFFLINE=1
    p = subprocess.run(
        [sys.executable, "-m", "qexp", "model=llama8b", f"model.id={repo}", "logger=none",
         "benchmark=none", "quantizer=rtn8", "conditions=[original,original_q]", "progress=false",
         "cache=off", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    body = json.loads((run_dir / "results.json").read_text())
    assert body["status"] == "complete" and body["config"]["dtype"] == "bfloat16"
    assert body["config"]["model"]["id"] == repo
    assert body["conditions"]["original"]["ref_ppl"] > 1
    # a hub id that is not in that cache: one line naming the key, before any weights
    p = subprocess.run(
        [sys.executable, "-m", "qexp", "model=llama8b", "model.id=org/absent", "logger=none",
         "benchmark=none", f"hydra.run.dir={tmp_path / 'r2'}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert p.returncode != 0 and "model.id='org/absent'" in p.stderr
    assert "local Hugging Face cache" in p.stderr


def test_run_context_reads_the_dtype(make_cfg, tmp_path):
    from qexp.pipeline.spec import validate

    spec = validate(make_cfg("model=qwen2_5_7b_instruct", tiny=False))
    assert RunContext.from_schema(spec.run, tmp_path).dtype.__repr__() == "torch.bfloat16"
