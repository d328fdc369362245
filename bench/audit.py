"""Detection table for qexp.audit: run the CLI on labelled checkpoints, one at a time.

    python bench/audit.py --reference CLEAN_DIR --out DIR LABEL=CHECKPOINT_DIR ...

Per checkpoint: the static audit (`python -m qexp.audit CKPT`, default targets, its real exit
code, wall time and peak RSS of that process), then, with --reference, a reference-only run
(`--checks none --reference CLEAN`). Writes DIR/table.md and DIR/table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qexp.core.io import atomic_write_json, atomic_write_text


def run(cmd: list[str]) -> tuple[int, float, float]:
    """Exit code, wall seconds and peak RSS (MiB) of one child process."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - t0, usage.ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+", help="LABEL=CHECKPOINT_DIR")
    p.add_argument("--reference", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--extra", default="", help="extra CLI arguments (space-separated)")
    a = p.parse_args()
    rows = []
    for item in a.models:
        label, _, ckpt = item.partition("=")
        out = a.out / label
        cmd = [sys.executable, "-m", "qexp.audit", ckpt, "--out", str(out), "--no-progress"]
        rc, wall, rss = run(cmd + a.extra.split())
        rep = json.loads((out / "audit.json").read_text())
        c = rep["checks"]
        r, g = c["reparam"], c["gap"]
        row = {
            "label": label,
            "exit_code": rc,
            "wall_s": round(wall, 1),
            "peak_rss_mib": round(rss),
            "reparam_verdict": r["verdict"],
            "reparam_flagged": r["score"]["n_flagged"],
            "vo_cond_max": r["features"]["vo_cond"]["max"],
            "qk_scale_max_z": r["features"]["qk_scale"]["max_z"],
            "vo_scale_max_z": r["features"]["vo_scale"]["max_z"],
            "gap_verdict": g["verdict"],
            "gap_max_spike": g["score"]["max_spike"],
            "gap_at": g["score"]["at"],
            "gap_p": g["score"]["p"],
            "gap_flagged": f"{g['score']['n_flagged']}/{g['score']['n_tests']}",
        }
        if "differential" in c:
            row["differential"] = {
                k: round(v["ratio"], 2) for k, v in c["differential"]["per_target"].items()
            }
            row["differential_verdict"] = c["differential"]["verdict"]
        if a.reference is not None:
            rout = a.out / f"{label}-reference"
            ref_cmd = [*cmd[:3], ckpt, "--out", str(rout), "--no-progress", "--no-plots"]
            rrc, rwall, _ = run(ref_cmd + ["--checks", "none", "--reference", str(a.reference)])
            d = json.loads((rout / "audit.json").read_text())["checks"]["reference"]
            row.update(
                {
                    "reference_verdict": d["verdict"],
                    "reference_changed": f"{d['score']['n_changed']}/{d['score']['n_compared']}",
                    "reference_layers": ",".join(k for k in d["changed_by_layer"]) or "-",
                    "reference_wall_s": round(rwall, 1),
                }
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = (
        "| checkpoint | reparam: flagged heads/layers, max log10 cond(A), max z qk / vo | "
        "reparam | gap: max spike S (tensor / target), p | gap flagged | gap | reference diff "
        "| exit code | wall s | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        ref = (
            f"{r['reference_verdict']}: {r['reference_changed']} tensors (layers "
            f"{r['reference_layers']})"
            if "reference_verdict" in r
            else "-"
        )
        body += (
            f"| {r['label']} | {r['reparam_flagged']}, {r['vo_cond_max']:.2f}, "
            f"{r['qk_scale_max_z']:.1f} / {r['vo_scale_max_z']:.1f} | {r['reparam_verdict']} | "
            f"{r['gap_max_spike']:.1f} ({r['gap_at']}), {r['gap_p']:.2g} | {r['gap_flagged']} | "
            f"{r['gap_verdict']} | {ref} | {r['exit_code']} | {r['wall_s']} | "
            f"{r['peak_rss_mib']} |\n"
        )
    atomic_write_text(a.out / "table.md", head + body)
    atomic_write_json(a.out / "table.json", rows)
    print(head + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
