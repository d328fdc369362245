"""Structured config of the Ray launcher, registered as hydra/launcher=qexp_ray."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.qexp_ray_launcher.ray_launcher.RayLauncher"
    # null: start a new local Ray instance for this sweep and stop it at the end;
    # "auto": RAY_ADDRESS or the cluster this machine is a node of (`ray start`);
    # "<head>:6379": that cluster's GCS; "ray://<head>:10001": Ray Client (ray[client])
    address: Optional[str] = None
    # resources Ray reserves for each job (scheduling only: set the job's `threads` to match)
    num_cpus: float = 1
    num_gpus: float = 0
    # restarts of a job whose worker process died (OOM, node lost); Python errors are not retried
    max_retries: int = 0
    # 1: every job in a fresh worker process (frees model and GPU memory between jobs)
    max_calls: int = 1
    # more ray.init() keyword arguments (null values are dropped): num_cpus, runtime_env, ...
    init: Dict[str, Any] = field(default_factory=dict)
    # more ray.remote() options per job: memory, resources, accelerator_type, ...
    remote: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/launcher", name="qexp_ray", node=RayLauncherConf, provider="qexp_ray_launcher"
)
