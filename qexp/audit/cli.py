"""The `qexp-audit` command line (also `python -m qexp.audit`)."""

from __future__ import annotations

import argparse
import resource
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from qexp.audit import gap, outlier, prune, refdiff, reparam
from qexp.audit.report import plots, summary
from qexp.audit.scan import Check, scan
from qexp.checkpoint.reader import Checkpoint
from qexp.checkpoint.safetensors_io import SafetensorsError
from qexp.core.console import console
from qexp.core.context import available_cores
from qexp.core.errors import ConfigError
from qexp.core.io import atomic_write_json, atomic_write_text
from qexp.core.memory import share_malloc_arena

CHECKS = ("reparam", "gap", "outlier", "prune")
USAGE = """Audit a checkpoint for quantization-conditioned tampering before quantizing it.

Static checks (streamed, no model instantiated): reparam (attack=encrypt signs), gap
(attack=gap signs, per target quantizer), outlier (attack=outlier: per-block max/second
max |w|), prune (attack=prune_gap against magnitude pruning: |w| density at the magnitude
cuts), and always finite (NaN or infinite weights); FP8 and int8 weights are read times
their scales; --reference DIR adds a diff against a trusted
checkpoint; --differential fake-quantizes with each target and compares logits (loads the
model). Writes audit.json, summary.txt and plots to --out. Exit code: 0 clean, 1 suspicious,
2 error.
"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="qexp-audit",
        description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (or .safetensors file)")
    p.add_argument("--reference", type=Path, help="a trusted checkpoint to diff against")
    p.add_argument(
        "--quantizer",
        default=None,
        help="comma-separated grid quantizers (conf/quantizer names) for the gap check "
        "(default: the grid quantizers that are one flag of a common loader away, "
        "`GridQuantizer.audit_default`: bnb_int8, bnb_nf4, bnb_fp4, gguf_q4_0 and rtn4 today)",
    )
    p.add_argument(
        "--checks",
        default=",".join(CHECKS),
        help=f"comma-separated static checks to run, from {','.join(CHECKS)} (default: all), "
        "or none (e.g. with --reference alone)",
    )
    p.add_argument("--differential", action="store_true", help="also run the differential check")
    p.add_argument(
        "--allow-symlinks",
        action="store_true",
        help="read shards that are symlinks leaving the checkpoint directory (refused by default)",
    )
    p.add_argument("--out", type=Path, help="report directory (default ./audit-<checkpoint name>)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="tensors checked in parallel, one torch thread each (default 0: every core this "
        "process may use)",
    )
    p.add_argument(
        "--gap-sample",
        type=int,
        default=gap.SAMPLE,
        help="weights the gap check scores per tensor: a larger tensor is scored on random "
        f"whole rows holding at least this many (default {gap.SAMPLE}; 0: every weight)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the gap check's row sample and dither (default: drawn at random and "
        "recorded in audit.json; give it to reproduce a report)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _list(value: str, key: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ConfigError(key, value, "a non-empty comma-separated list")
    for v in items:
        if allowed is not None and v not in allowed:
            raise ConfigError(key, v, "one of " + ", ".join(allowed))
    return items


def audit(args: argparse.Namespace) -> dict[str, Any]:
    """Run the requested checks; returns the report (verdicts and exit code included)."""
    from qexp.core.geometry import geometry

    t0 = time.time()
    progress = not args.no_progress
    checks = _list(args.checks, "--checks", (*CHECKS, "none"))
    targets = _list(args.quantizer, "--quantizer") if args.quantizer is not None else None
    ckpt = Checkpoint(args.checkpoint, "CHECKPOINT", args.allow_symlinks)
    if ckpt.config is None and ("reparam" in checks or args.differential):
        raise ConfigError("CHECKPOINT", str(args.checkpoint), "a checkpoint with config.json")
    geo = geometry(ckpt.config) if ckpt.config is not None else None
    ref = None
    if args.reference is not None:
        ref = Checkpoint(args.reference, "--reference", args.allow_symlinks)
    quantizers = []
    if "gap" in checks or args.differential:
        from qexp.quantizers.base import audit_targets, grid_quantizer

        targets = audit_targets() if targets is None else targets
        quantizers = [grid_quantizer(t, "--quantizer") for t in targets]
    report: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "reference": str(args.reference) if args.reference else None,
        "targets": targets,
        "architecture": ckpt.config.get("model_type") if ckpt.config else None,
        "tensors": len(ckpt.names),
        "bytes": ckpt.nbytes(),
        "checks": {},
    }
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    static: list[Check] = []
    if "reparam" in checks:
        static.append(reparam.ReparamCheck(geo))
    if "gap" in checks:
        static.append(gap.GapCheck(quantizers, args.gap_sample, seed))
    if "outlier" in checks:
        static.append(outlier.OutlierCheck())
    if "prune" in checks:
        static.append(prune.PruneCheck())
    report["seed"] = seed
    report["threads"] = args.threads
    with ckpt:
        report["checks"].update(scan(ckpt, static, args.threads, progress))
        if ref is not None:
            with ref:
                report["checks"]["reference"] = refdiff.run(ckpt, ref, progress)
    if args.differential:
        from qexp.audit import differential

        report["checks"]["differential"] = differential.run(ckpt.dir, quantizers, progress)
    bad = [k for k, c in report["checks"].items() if c["verdict"] != "clean"]
    report["verdict"] = "suspicious" if bad else "clean"
    report["suspicious_checks"] = bad
    report["exit_code"] = 1 if bad else 0
    report["runtime_s"] = round(time.time() - t0, 1)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 clean, 1 suspicious, 2 error (one line on stderr)."""
    args = parse(argv)
    con = console("qexp-audit")
    for flag, value in (("--threads", args.threads), ("--gap-sample", args.gap_sample)):
        if value < 0:
            con.error("qexp-audit: error: %s=%d is not valid; allowed: >= 0", flag, value)
            return 2
    args.threads = args.threads or available_cores()
    torch.set_num_threads(1)  # parallel over tensors instead
    share_malloc_arena()
    try:
        report = audit(args)
    except (ConfigError, SafetensorsError, FileNotFoundError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        con.error("qexp-audit: error: %s", msg)
        return 2
    out = args.out or Path(f"audit-{args.checkpoint.resolve().name}")
    out.mkdir(parents=True, exist_ok=True)
    text = summary(report)
    if not args.no_plots:
        report["plots"] = plots(report, out)
    atomic_write_json(out / "audit.json", report)
    atomic_write_text(out / "summary.txt", text)
    con.info("%s", text.rstrip("\n"))
    con.info("report: %s", out / "audit.json")
    return int(report["exit_code"])
