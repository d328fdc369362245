"""Driver side: start/join Ray, submit one task per job, gather the JobReturns."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from .ray_launcher import RayLauncher

log = logging.getLogger(__name__)


def execute_job(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    task_function: TaskFunction,
    singleton_state: Dict[Any, Any],
) -> JobReturn:
    """Worker side: one Hydra job, as the basic and joblib launchers run it."""
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    # run where the sweep was launched (hydra.job.chdir=false semantics), where that path
    # exists on this node; relative paths in the job config then mean what they mean locally
    cwd = sweep_config.hydra.runtime.cwd
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def launch(
    launcher: RayLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    import ray

    setup_globals()
    assert launcher.config is not None
    assert launcher.hydra_context is not None
    assert launcher.task_function is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    # absolute, so that workers (other cwd, other nodes) write where the driver looks
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)

    started = not ray.is_initialized()
    if started:
        # address null: a new local instance ("local" also ignores RAY_ADDRESS)
        kwargs = {**launcher.init_kwargs, "address": launcher.address or "local"}
        log.info(f"Ray launcher: ray.init({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
        ray.init(**kwargs)
    try:
        remote_job = ray.remote(**launcher.remote_options)(execute_job)
        log.info(
            f"Ray launcher is launching {len(job_overrides)} jobs "
            f"({launcher.remote_options}), sweep output dir: {sweep_dir}"
        )
        configs: List[DictConfig] = []
        refs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = launcher.hydra_context.config_loader.load_sweep_config(
                launcher.config, list(overrides)
            )
            with open_dict(sweep_config):
                sweep_config.hydra.sweep.dir = str(sweep_dir)
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
            refs.append(
                remote_job.remote(
                    launcher.hydra_context,
                    sweep_config,
                    launcher.task_function,
                    Singleton.get_state(),
                )
            )
        returns: List[JobReturn] = []
        for overrides, sweep_config, ref in zip(job_overrides, configs, refs):
            try:
                returns.append(ray.get(ref))
            except ray.exceptions.RayError as e:  # worker died, task cancelled, ...
                log.error(f"Ray launcher: job {' '.join(overrides)} did not return: {e}")
                returns.append(
                    JobReturn(
                        overrides=list(overrides),
                        cfg=sweep_config,
                        hydra_cfg=sweep_config,
                        task_name=sweep_config.hydra.job.name,
                        status=JobStatus.FAILED,
                        _return_value=e,
                    )
                )
        return returns
    finally:
        if started:
            ray.shutdown()
