"""The stage cache (qexp/core/cache.py, qexp/pipeline/stages.py): hits, misses, modes,
concurrency."""

import json
import os
import subprocess
import sys

import pytest

from qexp.attacks.encrypt import Encrypt
from qexp.core.cache import StageCache, digest
from qexp.defenses.noise import Noise
from qexp.models.tiny import TinyModel
from qexp.pipeline.run import run
from qexp.quantizers.rtn import RTN
from tests.conftest import ROOT

ENCRYPT = ["attack=encrypt", "attack.kappa_one_layers=0", "defense=noise", "cache=on"]


def body(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def untimed(conditions):
    """Metrics without the wall-clock ones (tokens_per_s differs between computations)."""
    return {c: {k: v for k, v in m.items() if k != "tokens_per_s"} for c, m in conditions.items()}


def forbid(monkeypatch, cls, method):
    """Make `cls.method` fail: the run must not need it."""

    def boom(*a, **k):
        raise AssertionError(f"{cls.__name__}.{method} ran despite the cache")

    monkeypatch.setattr(cls, method, boom)


def test_rerun_is_all_hits_with_identical_outputs(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(*ENCRYPT, f"cache_dir={tmp_path / 'c'}")
    run(cfg, tmp_path / "a")
    first = body(tmp_path / "a")
    assert set(first["cache"].values()) == {"stored"}
    assert "attacked/attack" in first["cache"] and "original/quantize" in first["cache"]
    for cls, method in [
        (TinyModel, "load"),
        (Encrypt, "apply"),
        (Noise, "apply"),
        (RTN, "quantize"),
    ]:
        forbid(monkeypatch, cls, method)
    run(cfg, tmp_path / "b")
    second = body(tmp_path / "b")
    assert set(second["cache"].values()) == {"hit"}
    assert second["conditions"] == first["conditions"]
    for key in ("function_preservation", "defense_stats", "quantization"):
        assert second[key] == first[key] and first[key]
    for f in ["attack_manifest.json", "generations/attacked_q.jsonl", "loglik/original_q.json"]:
        assert (tmp_path / "b" / f).read_bytes() == (tmp_path / "a" / f).read_bytes(), f


def test_sweep_point_reuses_upstream_stages(make_cfg, tmp_path, monkeypatch):
    cache = f"cache_dir={tmp_path / 'c'}"
    run(make_cfg(*ENCRYPT, cache, "defense.sigma=1e-3"), tmp_path / "a")
    forbid(monkeypatch, Encrypt, "apply")  # A(M) comes from the cache
    run(make_cfg(*ENCRYPT, cache, "defense.sigma=5e-2"), tmp_path / "b")
    b = body(tmp_path / "b")
    assert b["cache"]["original"] == b["cache"]["attacked"] == "hit"
    assert b["cache"]["attacked/attack"] == "hit"
    assert b["cache"]["attacked/defend"] == b["cache"]["attacked_q"] == "stored"
    a = body(tmp_path / "a")
    assert b["conditions"]["attacked_q"]["ref_ppl"] != a["conditions"]["attacked_q"]["ref_ppl"]


def test_cached_weights_equal_computed_ones(make_cfg, tmp_path, monkeypatch):
    """A new benchmark setting misses the evaluation but loads the quantized weights; the
    numbers equal a run with the cache off."""
    cache = f"cache_dir={tmp_path / 'c'}"
    run(make_cfg(*ENCRYPT, cache), tmp_path / "a")
    off = make_cfg(*ENCRYPT, cache, "benchmark.limit=3", "cache=off")
    run(off, tmp_path / "off")
    for cls, method in [(Encrypt, "apply"), (Noise, "apply"), (RTN, "quantize")]:
        forbid(monkeypatch, cls, method)
    run(make_cfg(*ENCRYPT, cache, "benchmark.limit=3"), tmp_path / "b")
    b, ref = body(tmp_path / "b"), body(tmp_path / "off")
    assert b["cache"]["attacked/quantize"] == "hit" and b["cache"]["attacked_q"] == "stored"
    for cond in ("original", "attacked", "original_q", "attacked_q"):
        for m in ("accuracy", "ref_ppl", "self_ppl"):
            assert b["conditions"][cond][m] == ref["conditions"][cond][m], (cond, m)


def test_off_writes_nothing_and_refresh_recomputes(make_cfg, tmp_path, monkeypatch):
    c = tmp_path / "c"
    run(make_cfg(*ENCRYPT, f"cache_dir={c}", "cache=off"), tmp_path / "off")
    assert not (c / "stages").exists()
    assert set(body(tmp_path / "off")["cache"].values()) == {"computed"}
    run(make_cfg(*ENCRYPT, f"cache_dir={c}"), tmp_path / "a")
    calls = []
    original = RTN.quantize

    def counted(self, subject, ctx):
        calls.append(subject.branch)
        return original(self, subject, ctx)

    monkeypatch.setattr(RTN, "quantize", counted)
    run(make_cfg(*ENCRYPT, f"cache_dir={c}", "cache=refresh"), tmp_path / "r")
    assert calls == ["original", "attacked"]
    assert set(body(tmp_path / "r")["cache"].values()) == {"stored"}
    assert untimed(body(tmp_path / "r")["conditions"]) == untimed(
        body(tmp_path / "a")["conditions"]
    )


def test_other_seed_or_model_config_misses(make_cfg, tmp_path):
    cache = f"cache_dir={tmp_path / 'c'}"
    run(make_cfg("cache=on", cache, "conditions=[original]"), tmp_path / "a")
    run(make_cfg("cache=on", cache, "conditions=[original]", "seed=1"), tmp_path / "b")
    run(
        make_cfg("cache=on", cache, "conditions=[original]", "model.hidden_size=96"), tmp_path / "c"
    )
    assert body(tmp_path / "b")["cache"] == {"original": "stored"}
    assert body(tmp_path / "c")["cache"] == {"original": "stored"}


def test_partial_entry_is_ignored_and_replaced(tmp_path):
    cache = StageCache(tmp_path)
    key = digest("x")
    (tmp_path / "evaluate" / key).mkdir(parents=True)  # a crashed writer's leftovers
    assert cache.get("evaluate", key) is None
    with cache.lock("evaluate", key):
        cache.put("evaluate", key, {"metrics": {"a": 1}})
    assert cache.get("evaluate", key).meta["metrics"] == {"a": 1}
    assert sorted(p.name for p in (tmp_path / "evaluate").iterdir()) == [key, f"{key}.lock"]


def test_cache_mode_errors(make_cfg):
    from qexp.core.errors import ConfigError
    from qexp.pipeline.spec import validate

    with pytest.raises(ConfigError, match="cache='sometimes'"):
        validate(make_cfg("cache=sometimes"))
    with pytest.raises(ConfigError, match="cache_weights='load'"):
        validate(make_cfg("cache_weights=[load]"))
    assert validate(make_cfg("cache=false")).run.cache == "off"


@pytest.mark.slow
def test_concurrent_jobs_compute_each_entry_once(tmp_path):
    """Two processes on the same config at once: every entry is computed by exactly one."""
    args = [
        sys.executable,
        "-m",
        "qexp",
        "model=tiny_llama",
        "logger=none",
        "progress=false",
        "benchmark.limit=4",
        "benchmark.max_new_tokens=8",
        *ENCRYPT,
        "similarity.enabled=false",
    ]
    env = {**os.environ, "QEXP_CACHE_DIR": str(tmp_path / "c")}
    procs = [
        subprocess.Popen(
            [*args, f"hydra.run.dir={tmp_path / str(i)}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    a, b = body(tmp_path / "0"), body(tmp_path / "1")
    assert untimed(a["conditions"]) == untimed(b["conditions"])
    for stage in a["cache"]:
        assert sorted([a["cache"][stage], b["cache"][stage]]) == ["hit", "stored"], stage
    leftovers = [p for p in (tmp_path / "c" / "stages").rglob(".*")]
    assert not leftovers, leftovers


def test_bitsandbytes_output_is_not_stored_but_its_evaluations_are(make_cfg, tmp_path):
    pytest.importorskip("bitsandbytes")
    one = [
        "cache=on",
        f"cache_dir={tmp_path / 'c'}",
        "quantizer=bnb_nf4",
        "conditions=[original_q]",
    ]
    run(make_cfg(*one), tmp_path / "a")
    (entry,) = (tmp_path / "c" / "stages" / "quantize").glob("*/meta.json")
    assert not (entry.parent / "model.safetensors").exists()  # a Linear4bit model
    run(make_cfg(*one), tmp_path / "b")
    assert body(tmp_path / "b")["cache"] == {"original/quantize": "hit", "original_q": "hit"}
    run(make_cfg(*one, "benchmark.limit=3"), tmp_path / "c3")
    assert body(tmp_path / "c3")["cache"] == {"original/quantize": "stored", "original_q": "stored"}


def _copy_package(dest):
    """qexp's package and configs, copied: a checkout the test may edit."""
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "qexp", dest / "qexp", ignore=ignore)
    shutil.copytree(ROOT / "conf", dest / "conf", ignore=ignore)
    return dest


def _qexp_in(root, cache, run_dir, *extra):
    """`python -m qexp` of the package in `root`: the rtn4 ppl example; its results.json."""
    args = ["model=tiny_llama", "quantizer=rtn4", "benchmark=ppl", "logger=none"]
    args += ["conditions=[original,original_q]", "progress=false", *extra]
    env = {**os.environ, "PYTHONPATH": str(root), "QEXP_CACHE_DIR": str(cache)}
    env["HF_HUB_OFFLINE"] = "1"
    p = subprocess.run(
        [sys.executable, "-m", "qexp", *args, f"hydra.run.dir={run_dir}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return body(run_dir)


@pytest.mark.slow
def test_keys_follow_the_code(tmp_path):
    """An edit of the code a stage runs recomputes it; an edit of the report tool (which no
    pipeline job can import) keeps every entry; cache_code=false is the knowing opt-out."""
    root, cache = _copy_package(tmp_path / "src"), tmp_path / "cache"
    first = _qexp_in(root, cache, tmp_path / "a")
    assert set(first["cache"].values()) == {"stored"}
    report = root / "qexp" / "tools" / "report" / "cli.py"
    report.write_text(report.read_text() + "\n# an edit no stage runs\n")
    assert set(_qexp_in(root, cache, tmp_path / "b")["cache"].values()) == {"hit"}
    rtn = root / "qexp" / "quantizers" / "rtn.py"
    src = rtn.read_text()
    assert "torch.round(x / s)" in src
    rtn.write_text(src.replace("torch.round(x / s)", "torch.trunc(x / s)"))  # other rounding
    edited = _qexp_in(root, cache, tmp_path / "c")
    assert set(edited["cache"].values()) == {"stored"}
    fresh = _qexp_in(root, cache, tmp_path / "d", "cache=off")
    q = "original_q"
    assert edited["conditions"][q]["ref_ppl"] == fresh["conditions"][q]["ref_ppl"]
    assert edited["conditions"][q]["ref_ppl"] != first["conditions"][q]["ref_ppl"]
    assert edited["conditions"]["original"] == first["conditions"]["original"]
    # opting out: the keys ignore the code, so the entries of the unedited code answer
    _qexp_in(root, cache, tmp_path / "e", "cache_code=false")  # stores code-less entries
    rtn.write_text(src)
    stale = _qexp_in(root, cache, tmp_path / "f", "cache_code=false")
    assert set(stale["cache"].values()) == {"hit"}
    assert stale["conditions"][q]["ref_ppl"] == edited["conditions"][q]["ref_ppl"]


def test_code_digest_covers_what_stages_run(tmp_path, monkeypatch):
    from qexp.core import cache as cache_mod

    pkg = tmp_path / "qexp"
    for rel in ["quantizers/rtn.py", "tools/report/cli.py", "data/x.jsonl", "app.py"]:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(rel)
    monkeypatch.setattr(cache_mod, "PACKAGE_DIR", pkg)

    def fresh() -> str:
        cache_mod.code_digest.cache_clear()
        return cache_mod.code_digest()

    base = fresh()
    (pkg / "tools/report/cli.py").write_text("edited")
    (pkg / "app.py").write_text("edited")
    assert fresh() == base
    (pkg / "data/x.jsonl").write_text("edited")
    after_data = fresh()
    assert after_data != base
    (pkg / "quantizers/rtn.py").write_text("edited")
    assert fresh() != after_data
    cache_mod.code_digest.cache_clear()


def test_a_flipped_bit_of_same_size_and_mtime_is_found(tmp_path):
    import torch

    cache = StageCache(tmp_path)
    key = digest("y")
    with cache.lock("quantize", key):
        cache.put("quantize", key, {"info": {}}, tensors={"w": torch.arange(4096.0)})
    blob = tmp_path / "quantize" / key / "tensors.safetensors"
    meta = json.loads((blob.parent / "meta.json").read_text())
    assert set(meta["blobs"]["tensors.safetensors"]) == {"size", "xxh3"}
    assert cache.get("quantize", key) is not None
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0x01  # bit rot inside a tensor: same size
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert cache.get("quantize", key) is None
    assert not (tmp_path / "quantize" / key).exists()
