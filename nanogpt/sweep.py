"""Where the jobs of a sweep (--multirun) run: Hydra's basic launcher and submitit's local and SLURM
launchers (hydra-submitit-launcher), each with what a research sweep needs on top:

- No drift. Every job's config is composed and checked when the sweep is launched, and the job
  runs that config: Hydra's own launchers compose each job again when it starts, so an edit of
  conf/ made while jobs wait in the queue (or before a requeue) would leak into them.
- Bad jobs are named before any runs: each job's config goes through the same checks as a single
  run's, and a SLURM array, which has one set of resources, refuses jobs that need different ones.
- Sweep resume. A job whose run dir already holds a finished run (DONE) of the same config is
  skipped; the others continue from their checkpoints (resume=auto). Re-running the command with
  hydra.sweep.dir=<the sweep's dir> therefore finishes a sweep that was cut short.
- Each task of a multi-task SLURM job (one per process of a DDP run) runs the job; only rank 0
  writes the snapshot and train.log, as under torchrun (preflight.quiet_secondary_rank).

The launcher classes live in hydra_plugins/nanogpt_launchers/ (Hydra loads launchers only from
the hydra_plugins package); conf/launcher/ holds the presets that select them. Requeue after preemption is
submitit's: its signal handler resubmits the job into the same dir (see nanogpt/signals.py for how
the run saves first), where resume=auto continues it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

from nanogpt.config import ConfigError

log = logging.getLogger(__name__)

# hydra.launcher keys that the hardware group decides (conf/launcher/slurm.yaml): one SLURM array
# has one value of each, so the jobs of a sweep must agree on them
RESOURCES = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task")


def gpus_per_node(device: str, nproc_per_node: int) -> int | None:
    """GPUs a job asks for on each node: one per process, unless the hardware is the CPU (or
    Apple's GPU), where it asks for none (None: sbatch rejects --gpus-per-node=0 on a node without
    GPUs). `auto` counts as CUDA: a cluster job is sent to GPUs unless it says cpu."""
    name = getattr(device, "name", device)  # the schema's Device enum, or its name
    return None if name in ("cpu", "mps") else int(nproc_per_node)


@dataclass
class SweepJob:
    num: int  # hydra.job.num: the job's subdir of the sweep dir
    overrides: list[str]
    config: DictConfig  # composed at launch, with the sweep dir resolved: what the job runs
    run_dir: Path
    finished: bool  # the run dir holds a finished run of this config: the job is skipped


def plan_jobs(config_loader, master: DictConfig, job_overrides: Sequence[Sequence[str]],
              initial_job_idx: int) -> list[SweepJob]:
    """Compose and check every job of the sweep now, and find the ones already finished."""
    from nanogpt.preflight import to_train_config
    from nanogpt.config import UserError, check_world_size
    from nanogpt.distributed import planned_world_size

    sweep_dir = Path(str(master.hydra.sweep.dir))
    jobs = []
    for i, overrides in enumerate(job_overrides):
        num = initial_job_idx + i
        what = f"job {num} ({' '.join(filter_overrides(overrides)) or 'no overrides'})"
        config = config_loader.load_sweep_config(master, list(overrides))
        with open_dict(config):
            config.hydra.job.num = num
            config.hydra.sweep.dir = str(sweep_dir)  # resolved once: ${now:} is the launch's time
            config.hydra.sweep.subdir = str(config.hydra.sweep.subdir)
        run_dir = sweep_dir / config.hydra.sweep.subdir
        try:
            train_config = to_train_config(config)
            check_world_size(train_config, planned_world_size(train_config.hardware))
            finished = _finished_here(config, run_dir)
        except UserError as e:
            raise ConfigError(f"{what}: {e}") from e
        jobs.append(SweepJob(num, list(overrides), config, run_dir, finished))
    return jobs


def _finished_here(config: DictConfig, run_dir: Path) -> bool:
    """Whether run_dir holds a finished run of this config. A run dir of another config (a sweep
    dir reused with other values) is refused: its checkpoints would be continued or skipped."""
    from nanogpt.resume import flatten, refuse_changes

    if not (run_dir / "config.resolved.yaml").is_file():
        return False
    from nanogpt.runfiles import read_yaml

    before = OmegaConf.to_container(read_yaml(run_dir / "config.resolved.yaml", fix=(
        "restore it from a copy of the run, or move the job's dir aside to train that job again")))
    now = OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]),
                                 resolve=True, enum_to_str=True)
    refuse_changes(before, now, run_dir, way_out="a sweep dir is finished with the command that started it; for "
                   "other values, start a new sweep (leave hydra.sweep.dir alone)")
    return (run_dir / "DONE").is_file() and flatten(before) == flatten(now)


def log_job(job: SweepJob) -> None:
    done = f": finished already ({job.run_dir}/DONE), skipped" if job.finished else ""
    log.info(f"\t#{job.num} : {' '.join(filter_overrides(job.overrides))}{done}")


def skipped(job: SweepJob) -> JobReturn:
    ret = JobReturn(overrides=job.overrides, cfg=job.config, working_dir=str(job.run_dir), status=JobStatus.COMPLETED)
    ret.return_value = None
    return ret


def in_job_order(jobs: list[SweepJob], launched: Sequence[JobReturn]) -> list[JobReturn]:
    """The returns in job order: the skipped jobs' and the launched ones'."""
    launched = iter(launched)
    return [skipped(job) if job.finished else next(launched) for job in jobs]


def check_all_finished(sweep_dir: Path, outcomes: list[tuple[SweepJob, BaseException | None, Path]]) -> None:
    """After every job of the sweep ended: one line on the jobs that failed, and how to finish."""
    from nanogpt.config import UserError
    from nanogpt.report import resume_command

    failed = [(job, log_file) for job, error, log_file in outcomes if error is not None]
    if not failed:
        return
    names = "; ".join(f"job {job.num} ({' '.join(filter_overrides(job.overrides))}), its log: {log_file}"
                      for job, log_file in failed)
    command = resume_command(sweep_dir)
    raise UserError(f"{len(failed)} of {len(outcomes)} jobs failed: {names}; the others finished"
                    + (f"; to finish the sweep: {command} (it skips the jobs that finished)" if command else ""))


def register_resolvers() -> None:
    """The resolver conf/launcher/*.yaml derive the GPUs of a job with."""
    if not OmegaConf.has_resolver("gpus_per_node"):
        OmegaConf.register_new_resolver("gpus_per_node", gpus_per_node)
