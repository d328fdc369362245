"""The Launcher plugin class; Ray itself is imported only when a sweep is launched."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class RayLauncher(Launcher):
    def __init__(
        self,
        address: Optional[str] = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int = 0,
        max_calls: int = 1,
        init: Optional[Dict[str, Any]] = None,
        remote: Optional[Dict[str, Any]] = None,
    ) -> None:
        def plain(d: Any) -> Dict[str, Any]:
            if d is None:
                return {}
            return OmegaConf.to_container(d, resolve=True) if OmegaConf.is_config(d) else dict(d)

        self.address = address
        self.init_kwargs = {k: v for k, v in plain(init).items() if v is not None}
        self.remote_options = {
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "max_retries": max_retries,
            "max_calls": max_calls,
            **plain(remote),
        }
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from . import _core

        return _core.launch(self, job_overrides, initial_job_idx)
