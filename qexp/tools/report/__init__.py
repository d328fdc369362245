"""`qexp-report <multirun dir>` (`python -m qexp.tools.report`): tables and plots of a Hydra sweep.

Reads every job's `results.json` (and `.hydra/overrides.yaml`) at depth <= 2 under the
directory and writes into it:

- `report.csv`: one row per (job, condition): the swept parameters, condition, quantizer
  and the metrics (full precision);
- `report.md`: the same table (4 significant digits), the fixed overrides, the jobs that
  did not complete (with their error) and, with `--select`, the validation-selected job;
- `report_plots/<metric>_vs_<param>.png`: each metric against each swept parameter, one
  line per condition (a grouped bar chart for a non-numeric parameter).

Swept parameters are the overrides whose value differs across jobs (from each job's
`.hydra/overrides.yaml`; without them, the leaves of the resolved configs that differ).

Selection on a separate split (`--val VAL_DIR --select original_q.accuracy:max`): the best
job of the validation sweep by that metric is matched to the test sweep (the positional
directory) by the validation sweep's swept values, and the matched test job's numbers are
reported. Selecting on the test sweep itself is refused (the validation and test jobs must
differ in their resolved `benchmark` config), and shared item ids between the two are
reported as a warning. A validation split today: `benchmark.path=<your val .jsonl>`, or
`benchmark.source=hub benchmark.split=train` for SVAMP from the hub; `benchmark.limit`
only takes a prefix, so it cannot give a disjoint subset of the same items.
"""

from qexp.tools.report.cli import main

__all__ = ["main"]
