"""Hydra launcher that runs each job of a sweep as a Ray task (no submitit, no autoscaler).

Select with `hydra/launcher=ray` (conf/hydra/launcher/ray.yaml); see docs/launchers.md.
"""

__version__ = "0.1.0"
