"""`logger=wandb` in offline mode, read back from the run's own `.wandb` record log: the
summary of results.json, the plots as images, the results artifact, tags and group."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from qexp.core.errors import ConfigError
from qexp.loggers.wandb import WandbLogger, summary_of, tags_of
from tests.conftest import ROOT, without_module

CONFIG = {
    "conditions": ["original", "attacked"],
    "model": {"name": "tiny_llama"},
    "attack": {"name": "gap"},
    "defense": {"name": "none"},
    "quantizer": {"name": "rtn4"},
    "benchmark": {"name": "svamp"},
    "logger": {"name": "wandb"},
}

RESULTS = {
    "config": CONFIG,
    "provenance": {"qexp": "0.0", "model": "tiny_llama"},
    "function_preservation": {"kl_bf16": 0.01, "probe_tokens": 512, "note": "text"},
    "conditions": {"original": {"accuracy": 0.5, "ref_ppl": 12.0}, "attacked": {"accuracy": 0.25}},
    "intervals": {
        "original": {"accuracy": {"lo": 0.2, "hi": 0.8, "method": "wilson", "n": 4}},
        "attacked": {"accuracy": {"lo": 0.05, "hi": 0.7, "method": "wilson", "n": 4}},
    },
    "comparisons": {
        "attacked vs original": {
            "accuracy": {"diff": -0.25, "lo": None, "hi": None, "p": 0.5, "test": "mcnemar", "n": 4}
        }
    },
    "defense_stats": {},
    "quantization": {},
    "stage_seconds": {"load": 1.5, "evaluate_original": 2.25},
    "memory": {
        "baseline_rss_mb": 100.0,
        "peak_rss_mb": {"load": 200.0},
        "plan": {"need_bytes": 1000},
        "model_bytes": 4096,
        "peak_method": "VmHWM reset per stage",
    },
    "cache": {"load": "computed"},
    "status": "complete",
}

RECORDS = [{"id": 0, "prompt": "1+1?", "output": "2", "correct": True}]


# ---- reading an offline run back --------------------------------------------------------
def records(path: Path):
    """The protobuf records of a `.wandb` file (a LevelDB-style log: a 7-byte W&B header,
    then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record
        elif kind == 0:
            buf = b""


def read_offline(run_dir: Path) -> SimpleNamespace:
    """The run record, final summary (flat keys), artifacts and exit code of the one offline
    run under `run_dir/wandb/`."""
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    deadline = time.time() + 60  # wandb's service may still be writing the log's end
    while True:
        out = SimpleNamespace(run=None, summary={}, artifacts=[], exit_code=None, dir=runs[0])
        for r in records(next(runs[0].glob("*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out.run = r.run
            elif kind == "summary":
                for item in r.summary.update:
                    key = item.key or "/".join(item.nested_key)
                    out.summary[key] = json.loads(item.value_json)
            elif kind == "artifact":
                out.artifacts.append(r.artifact)
            elif kind == "exit":
                out.exit_code = r.exit.exit_code
        if out.exit_code is not None or time.time() > deadline:
            return out
        time.sleep(0.2)


def results_artifact(back: SimpleNamespace) -> dict[str, str]:
    """The results artifact's manifest: path in the artifact -> local file."""
    (art,) = [a for a in back.artifacts if a.type == "qexp-results"]
    assert art.name == f"results-{back.run.run_id}"
    return {entry.path: entry.local_path for entry in art.manifest.contents}


# ---- fixtures ---------------------------------------------------------------------------
@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """wandb's own dirs (staging, cache, settings) under tmp_path, never the user's."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return home


def job_dir(root: Path, attacked: bool = False) -> Path:
    """A finished job's dir: results.json, generations/, loglik.png, a nested plot."""
    from matplotlib.figure import Figure

    run_dir = root / "job"
    (run_dir / "generations").mkdir(parents=True)
    (run_dir / "plots").mkdir()
    fig = Figure(figsize=(1, 1), dpi=20)
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(run_dir / "loglik.png")
    fig.savefig(run_dir / "plots" / "gap.png")
    for cond in ("original", "attacked"):
        (run_dir / "generations" / f"{cond}.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    (run_dir / "results.json").write_text(json.dumps(RESULTS))
    if attacked:
        (run_dir / "attacked").mkdir()
        (run_dir / "attacked" / "config.json").write_text("{}")
        (run_dir / "attacked" / "model.safetensors").write_bytes(b"\0" * 16)
    return run_dir


# ---- the offline run ---------------------------------------------------------------------
def test_offline_run_carries_results(tmp_path, wandb_home):
    run_dir = job_dir(tmp_path, attacked=True)  # attacked/ exists, log_attacked is off
    logger = WandbLogger(tags=["paper", "model:tiny_llama"])
    logger.validate_environment()
    logger.start(CONFIG, run_dir, "job-0", group="sweep-x")
    for cond in ("original", "attacked"):
        logger.log_condition(cond, RESULTS["conditions"][cond], RECORDS)
    logger.finish("complete", RESULTS, run_dir)
    back = read_offline(run_dir)

    assert back.exit_code == 0
    assert back.run.run_group == "sweep-x" and back.run.display_name == "job-0"
    assert list(back.run.tags) == [
        "model:tiny_llama",
        "attack:gap",
        "defense:none",
        "quantizer:rtn4",
        "benchmark:svamp",
        "paper",
    ]
    s = back.summary
    expected = {
        "original/accuracy": 0.5,
        "original/ref_ppl": 12.0,
        "original/accuracy_lo": 0.2,
        "original/accuracy_hi": 0.8,
        "attacked/accuracy": 0.25,
        "attacked/accuracy_lo": 0.05,
        "attacked/accuracy_hi": 0.7,
        "compare/attacked_vs_original/accuracy/diff": -0.25,
        "compare/attacked_vs_original/accuracy/p": 0.5,
        "compare/attacked_vs_original/accuracy/n": 4,
        "stage_seconds/load": 1.5,
        "stage_seconds/evaluate_original": 2.25,
        "memory/baseline_rss_mb": 100.0,
        "memory/peak_rss_mb/load": 200.0,
        "memory/plan/need_bytes": 1000,
        "memory/model_bytes": 4096,
        "function_preservation/kl_bf16": 0.01,
        "function_preservation/probe_tokens": 512,
        "status": "complete",
    }
    assert {k: s.get(k) for k in expected} == expected
    # no strings or nulls among the numbers
    for absent in (
        "compare/attacked_vs_original/accuracy/lo",
        "compare/attacked_vs_original/accuracy/test",
        "memory/peak_method",
        "function_preservation/note",
    ):
        assert absent not in s
    # the plots as images, their files in the run's media
    for key in ("plots/loglik", "plots/plots/gap"):
        assert s[f"{key}/_type"] == "image-file"
        assert (back.dir / "files" / s[f"{key}/path"]).is_file()
    # the generation tables logged per condition
    assert s["original/generations/_type"] == "table-file"
    # the artifact: results.json and the generations, not the attacked checkpoint
    # (referenced in the run dir, not copied to wandb's staging dir)
    assert results_artifact(back) == {
        "results.json": str(run_dir / "results.json"),
        "generations/original.jsonl": str(run_dir / "generations" / "original.jsonl"),
        "generations/attacked.jsonl": str(run_dir / "generations" / "attacked.jsonl"),
    }


def test_failed_job_from_disk_with_attacked(tmp_path, wandb_home):
    run_dir = job_dir(tmp_path, attacked=True)
    logger = WandbLogger(log_attacked=True, group="mine")
    logger.start(CONFIG, run_dir, "job-1", group="sweep-x")
    logger.finish("failed", None, run_dir)  # results read from results.json
    back = read_offline(run_dir)

    assert back.exit_code == 1
    assert back.run.run_group == "mine"  # the user's group wins over the sweep's
    assert back.summary["status"] == "failed"
    assert back.summary["original/accuracy_lo"] == 0.2
    paths = set(results_artifact(back))
    assert {"attacked/config.json", "attacked/model.safetensors", "results.json"} <= paths


# ---- no run -----------------------------------------------------------------------------
def test_summary_tolerates_missing_sections():
    assert summary_of(None) == {} and summary_of({}) == {}
    partial = {
        "conditions": {"original": {"accuracy": 1, "refusal": None}},
        "intervals": {"original": {"accuracy": {"lo": None, "hi": 1.0}}, "x": None},
        "comparisons": {},
        "memory": None,
        "status": "failed",
        "error": "RuntimeError: boom",
    }
    assert summary_of(partial) == {
        "original/accuracy": 1,
        "original/accuracy_hi": 1.0,
        "status": "failed",
        "error": "RuntimeError: boom",
    }


def test_config_keys_and_tags(make_cfg):
    from qexp.pipeline.spec import validate

    cfg = make_cfg("logger=wandb", "logger.tags=[paper]")
    spec = validate(cfg)
    logger = spec.logger
    assert isinstance(logger, WandbLogger)
    assert (logger.mode, logger.log_attacked, logger.tags) == ("offline", False, ["paper"])
    config = OmegaConf.to_container(cfg, resolve=True)
    assert tags_of(config, logger.tags) == [
        "model:tiny_llama",
        "attack:none",
        "defense:none",
        "prune:none",
        "quantizer:rtn4",
        "benchmark:svamp",
        "paper",
    ]
    with pytest.raises(ConfigError, match="logger.log_attacked"):
        validate(make_cfg("logger=wandb", "logger.log_attacked=true"))
    WandbLogger(log_attacked=True).check_spec(
        SimpleNamespace(run=SimpleNamespace(save_attacked=True))
    )


def test_wandb_optional(monkeypatch):
    code = "import sys, qexp.loggers.wandb; assert 'wandb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    without_module(monkeypatch, "wandb")
    with pytest.raises(ConfigError, match=r"qexp\[wandb\]"):
        WandbLogger().validate_environment()
    WandbLogger().finish("complete")  # never started: nothing to close
