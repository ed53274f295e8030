"""nanogpt's Hydra launchers: Hydra's basic launcher and hydra-submitit-launcher's local and SLURM
launchers, with each job's config composed and checked at launch, finished jobs skipped, and one
snapshot per multi-task job (what and why: nanogpt/sweep.py). They live here because Hydra loads
launcher classes only from the hydra_plugins package; conf/launcher/*.yaml select them.
"""

# no `from __future__ import annotations`: Hydra imports plugin modules without registering them in
# sys.modules, where dataclasses look string annotations up
import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher as _HydraBasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    BaseSubmititLauncher, LocalLauncher as _SubmititLocal, SlurmLauncher as _SubmititSlurm,
)
from omegaconf import DictConfig, OmegaConf, open_dict

from nanogpt import runlock, startup, sweep
from nanogpt.config import ConfigError

log = logging.getLogger(__name__)


class BasicLauncher(_HydraBasicLauncher):
    """Hydra's basic launcher (the jobs one after the other, in this process)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra.core.utils import configure_log

        setup_globals()
        jobs = sweep.plan_jobs(self.hydra_context.config_loader, self.config, job_overrides, initial_job_idx)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {sum(not j.finished for j in jobs)} of {len(jobs)} jobs locally")
        returns = []
        for job in jobs:
            sweep.log_job(job)
            if job.finished:
                returns.append(sweep.skipped(job))
                continue
            with open_dict(job.config):
                job.config.hydra.job.id = job.num
            lock = runlock.acquire(job.run_dir)  # the job's dir has one live owner, as a single run's
            startup.clock.restart()  # each job's start-up is its own
            try:
                returns.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                       config=job.config, job_dir_key="hydra.sweep.dir",
                                       job_subdir_key="hydra.sweep.subdir"))
            finally:
                lock.release()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns


class _Submitit(BaseSubmititLauncher):
    """submitit's launchers, with each job's config composed at launch and passed to the job."""

    def executor(self):
        """The submitit executor with this launcher's parameters, as hydra-submitit-launcher makes it."""
        import submitit

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]} if "max_num_timeout" in self.params else {},
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            key if key in shared else f"{self._EXECUTOR}_{key}": value
            for key, value in self.params.items() if key not in init_keys
        })
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = sweep.plan_jobs(self.hydra_context.config_loader, self.config, job_overrides, initial_job_idx)
        self._check_resources(jobs)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        todo = [job for job in jobs if not job.finished]
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir: {sweep_dir} ({len(todo)} of {len(jobs)} jobs to run)")
        for job in jobs:
            sweep.log_job(job)
        if not todo:
            return sweep.in_job_order(jobs, [])
        state = Singleton.get_state()
        params = [(job.overrides, "hydra.sweep.dir", job.num, f"job_id_for_{job.num}", state, job.config) for job in todo]
        submitted = self.executor().map_array(self, *zip(*params))
        for job in submitted:  # all of them, even after one failed: the jobs of a sweep are independent
            job.wait()
        sweep.check_all_finished(sweep_dir, [(job, j.exception(), j.paths.stderr) for job, j in zip(todo, submitted)])
        return sweep.in_job_order(jobs, [j.results()[0] for j in submitted])

    def _check_resources(self, jobs: List[sweep.SweepJob]) -> None:
        for job in jobs:
            wanted = OmegaConf.to_container(job.config.hydra.launcher, resolve=True)
            for key in sweep.RESOURCES:
                if key in wanted and key in self.params and wanted[key] != self.params[key]:
                    raise ConfigError(
                        f"job {job.num} ({' '.join(filter_overrides(job.overrides))}) needs {key}={wanted[key]}, and the "
                        f"array is sized for {self.params[key]}: one submitit array has one set of resources; "
                        f"sweep the hardware group in separate commands"
                    )

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict, config: Optional[DictConfig] = None) -> JobReturn:
        """One job, on the node: runs the config composed at launch (a requeued job too, since
        submitit resubmits it with the same arguments)."""
        import submitit

        from nanogpt.distributed import detect
        from nanogpt.preflight import quiet_secondary_rank

        Singleton.set_state(singleton_state)
        setup_globals()
        config = copy.deepcopy(config)  # run_job makes it read-only; a requeue resubmits the original
        with open_dict(config.hydra.job):
            config.hydra.job.id = submitit.JobEnvironment().job_id
            config.hydra.job.num = job_num
        rank = detect().rank
        quiet_secondary_rank(config, rank)
        if rank == 0:  # the job's dir has one live owner (held until this process exits), as a single run's
            from nanogpt.sweep import job_dir

            runlock.hold(job_dir(config))
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                       job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")


class SubmititLocalLauncher(_Submitit, _SubmititLocal):
    """Each job in its own process on this machine, with a time limit; requeued after a timeout."""

    def executor(self):
        """submitit's LocalExecutor itself: the AutoExecutor in front of it drops signal_delay_s."""
        import submitit

        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"],
                                          max_num_timeout=self.params["max_num_timeout"])
        params = {k: v for k, v in self.params.items() if k not in ("submitit_folder", "max_num_timeout")}
        params["gpus_per_node"] = params.get("gpus_per_node") or 0  # it counts them: None (cpu) is 0 here
        executor.update_parameters(**params)
        return executor


class SlurmLauncher(_Submitit, _SubmititSlurm):
    """Each job a task of one SLURM job array; requeued after preemption or a time limit."""


@dataclass
class SubmititLocalConf(LocalQueueConf):
    """submitit_local's settings, plus the two it takes but hydra-submitit-launcher does not expose."""

    _target_: str = "hydra_plugins.nanogpt_launchers.launchers.SubmititLocalLauncher"
    signal_delay_s: int = 30  # the timeout signal (USR2) comes this long before the time limit
    max_num_timeout: int = 3  # requeues after a timeout before the job counts as failed


ConfigStore.instance().store(group="hydra/launcher", name="nanogpt_submitit_local", node=SubmititLocalConf,
                             provider="nanogpt")
