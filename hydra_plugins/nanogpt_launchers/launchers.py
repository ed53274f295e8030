"""nanogpt's Hydra launchers: Hydra's basic launcher and hydra-submitit-launcher's local and SLURM
launchers, with each job's config composed and checked at launch, finished jobs skipped, and one
snapshot per multi-task job (what and why: nanogpt/sweeps/launcher.py). They live here because Hydra loads
launcher classes only from the hydra_plugins package; conf/launcher/*.yaml select them.
"""

# no `from __future__ import annotations`: Hydra imports plugin modules without registering them in
# sys.modules, where dataclasses look string annotations up
import contextlib
import copy
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher as _HydraBasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    BaseSubmititLauncher, LocalLauncher as _SubmititLocal, SlurmLauncher as _SubmititSlurm,
)
from omegaconf import DictConfig, OmegaConf, open_dict

from nanogpt.errors import ConfigError, UserError, user_errors
from nanogpt.parallel.distributed import detect
from nanogpt.runs import runlock
from nanogpt.runs.preflight import quiet_secondary_rank
from nanogpt.sweeps import launcher
from hydra_plugins.nanogpt_launchers import search

log = logging.getLogger(__name__)


class Sweeper(BasicSweeper):
    """Hydra's basic sweeper (the product of the listed values), except that our launchers make the
    sweep dir and write multirun.yaml once every job passed its checks: Hydra's writes it first,
    so a sweep refused before it ran left a sweep dir, or rewrote a finished sweep's record.
    A command that selects a search (search=NAME) gets an Optuna search instead of a grid (search.py)."""

    def sweep(self, arguments: List[str]) -> List[Sequence[JobReturn]]:
        if search.is_search(self.config):
            workers = "local" if isinstance(self.launcher, BasicLauncher) else \
                "submitit" if isinstance(self.launcher, _Submitit) else "other"
            return search.run(self, arguments, workers)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides([*self._parse_config(), *arguments]),
                                              self.max_batch_size)
        ours = isinstance(self.launcher, (BasicLauncher, _Submitit))
        returns = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            if not ours:  # another launcher (hydra/launcher=...) gets Hydra's way
                self.validate_batch_is_legal(batch)
                Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
                OmegaConf.save(self.config, Path(str(self.config.hydra.sweep.dir)) / "multirun.yaml")
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)  # ours compose and check each job
            for r in results:
                _ = r.return_value  # another launcher's failed job raises here, as in Hydra
            initial_job_idx += len(batch)
            returns.append(results)
        return returns


class BasicLauncher(_HydraBasicLauncher):
    """Hydra's basic launcher (the jobs one after the other, in this process)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:

        setup_globals()
        jobs = launcher.plan_jobs(self.hydra_context.config_loader, self.config, job_overrides, initial_job_idx)
        launcher.check_jobs(jobs, on_this_machine=True)
        sweep_dir = launcher.make_sweep_dir(self.config)
        log.info(f"Launching {sum(not j.finished for j in jobs)} of {len(jobs)} jobs locally")
        outcomes = []
        for job in jobs:
            launcher.log_job(job)
            if job.finished:
                continue
            with open_dict(job.config):
                job.config.hydra.job.id = job.num
            ret = launcher.run_here(job, self.hydra_context, self.task_function, self.config.hydra)
            outcomes.append(launcher.Outcome(job, ret))
        launcher.check_all_finished(sweep_dir, outcomes)
        return launcher.in_job_order(jobs, [o.returned for o in outcomes])


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

    on_this_machine = True  # the jobs run here: their device is checked at launch

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = launcher.plan_jobs(self.hydra_context.config_loader, self.config, job_overrides, initial_job_idx)
        self._check_resources(jobs)
        launcher.check_jobs(jobs, on_this_machine=self.on_this_machine)
        todo = [job for job in jobs if not job.finished]
        with launcher.sweep_dir_made(self.config) as sweep_dir:
            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir: {sweep_dir} ({len(todo)} of {len(jobs)} jobs to run)")
            for job in jobs:
                launcher.log_job(job)
            if not todo:
                return launcher.in_job_order(jobs, [])
            state = Singleton.get_state()
            params = [(job.overrides, "hydra.sweep.dir", job.num, f"job_id_for_{job.num}", state, job.config) for job in todo]
            submitted = self.submit(params)
        outcomes = []
        for job, submission in zip(todo, submitted):  # all of them, even after one failed: the jobs are independent
            error = submission.exception()  # waits for it; an error outside the job's run (None: it returned)
            returned = submission.results()[0] if error is None else None
            outcomes.append(launcher.Outcome(job, returned, state=submission.state if returned is None else "",
                                          scheduler_log=submission.paths.stderr, error=error))
        launcher.check_all_finished(sweep_dir, outcomes, limits=self._limits())
        return launcher.in_job_order(jobs, [o.returned for o in outcomes])

    def submit(self, params: list, function=None, **resources) -> list:
        """One array of jobs, one per tuple of arguments in params: each calls function (this
        launcher's __call__, a grid's job, by default) with them. resources: executor parameters
        that differ from the launcher's (a search's worker jobs)."""
        executor = self.executor()
        if resources:
            executor.update_parameters(**resources)
        return executor.map_array(function or self, *zip(*params))

    def _limits(self) -> str:
        return ", ".join(f"{key}={self.params[key]}" for key in ("timeout_min", "max_num_timeout") if key in self.params)

    def _check_resources(self, jobs: List[launcher.SweepJob]) -> None:
        for job in jobs:
            wanted = OmegaConf.to_container(job.config.hydra.launcher, resolve=True)
            for key in launcher.RESOURCES:
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

        Singleton.set_state(singleton_state)
        setup_globals()
        config = copy.deepcopy(config)  # run_job makes it read-only; a requeue resubmits the original
        with open_dict(config.hydra.job):
            config.hydra.job.id = submitit.JobEnvironment().job_id
            config.hydra.job.num = job_num
        rank = detect().rank
        quiet_secondary_rank(config, rank)
        job = launcher.SweepJob(job_num, sweep_overrides, config, launcher.job_dir(config), finished=False)

        def run_locked() -> JobReturn:
            if rank == 0:  # the job's dir has one live owner (held until this process exits), as a single run's
                with user_errors():
                    runlock.hold(job.run_dir)
            return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                           job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")

        return launcher.run_one(job, run_locked)


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

    on_this_machine = False  # the jobs' devices are on their nodes, not on the login node

    def submit(self, params: list, function=None, **resources) -> list:
        """No SLURM here, or sbatch's refusal (no controller answers, an unknown partition or account), as
        one line (submitit prints sbatch's stderr itself, which the line already holds)."""
        from submitit.core.utils import FailedJobError

        missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
        if missing:
            raise ConfigError(f"launcher=slurm submits with SLURM's {' and '.join(missing)}, and this machine has no "
                              f"{missing[0]}: run the sweep on the cluster's login node, or use launcher=submitit_local")
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                return super().submit(params, function, **resources)
        except FailedJobError as e:
            said = [line.strip() for line in (str(e) or printed.getvalue()).splitlines() if line.strip()]
            raise UserError(f"SLURM refused the sweep ({said[-1].rstrip('.') if said else 'sbatch failed'}), nothing was "
                            f"submitted: check that `sinfo` answers here, and the partition and account of the site "
                            f"(site=NAME, conf/site/)") from e


@dataclass
class SubmititLocalConf(LocalQueueConf):
    """submitit_local's settings, plus the two it takes but hydra-submitit-launcher does not expose."""

    _target_: str = "hydra_plugins.nanogpt_launchers.launchers.SubmititLocalLauncher"
    signal_delay_s: int = 30  # the timeout signal (USR2) comes this long before the time limit
    max_num_timeout: int = 3  # requeues after a timeout before the job counts as failed


ConfigStore.instance().store(group="hydra/launcher", name="nanogpt_submitit_local", node=SubmititLocalConf,
                             provider="nanogpt")
