"""Where the jobs of a sweep (--multirun) run: Hydra's basic launcher and submitit's local and SLURM
launchers (hydra-submitit-launcher), each with what a research sweep needs on top:

- No drift. Every job's config is composed and checked when the sweep is launched, and the job
  runs that config: Hydra's own launchers compose each job again when it starts, so an edit of
  conf/ made while jobs wait in the queue (or before a requeue) would leak into them.
- Bad jobs are named before any runs: each job's config goes through the same checks as a single
  run's (config, init_from, optimizer, data and vocab), and a SLURM array, which has one set of
  resources, refuses jobs that need different ones. A sweep refused before it runs leaves nothing:
  the launcher makes the sweep dir and its multirun.yaml only once every job passed (Hydra's own
  sweeper writes multirun.yaml first), and takes them back if the submission fails.
- Choices that belong to the whole command (the launcher, the site, the sweep preset, Hydra's
  launcher and sweeper) cannot be swept, and without --multirun they are refused: they would do
  nothing (nanogpt/runs/preflight.py checks both).
- Sites. A site file (partition, account, ... of a cluster) is an option of the group `site`, found
  in the package's conf/site/ and in the user's dirs (config.site_dirs), so a wheel install reads
  them too; a site the command names must exist (the SLURM presets read the default one optionally).
- One summary. However a job ends (done, refused, failed with an error, killed, cancelled, out of
  requeues), the sweep waits for all of them and ends with one line naming each job that did not
  finish, why, its log, and the command that finishes the sweep.
- Sweep resume. A job whose run dir already holds a finished run (DONE) of the same config is
  skipped; the others continue from their checkpoints (resume=auto). Re-running the command with
  hydra.sweep.dir=<the sweep's dir> therefore finishes a sweep that was cut short.
- Each task of a multi-task SLURM job (one per process of a DDP run) runs the job; only rank 0
  writes the snapshot and train.log, as under torchrun (preflight.quiet_secondary_rank).

The launcher classes live in hydra_plugins/nanogpt_launchers/ (Hydra loads launchers only from
the hydra_plugins package); conf/launcher/ holds the presets that select them. Requeue after preemption is
submitit's: its signal handler resubmits the job into the same dir (see nanogpt/runs/signals.py for how
the run saves first), where resume=auto continues it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job
from omegaconf import DictConfig, OmegaConf, open_dict

from nanogpt.config import check_world_size
from nanogpt.errors import ConfigError, UserError, user_errors
from nanogpt.parallel.distributed import planned_world_size
from nanogpt.runs import preflight, runlock, startup
from nanogpt.runs.preflight import check_working_dir, to_train_config
from nanogpt.runs.provenance import _read_json
from nanogpt.runs.resume import flatten, plan_in_place
from nanogpt.runs.runfiles import read_yaml
from nanogpt.sweeps.report import resume_command

log = logging.getLogger(__name__)

# hydra.launcher keys that the hardware group decides (conf/launcher/slurm.yaml): one SLURM array
# has one value of each, so the jobs of a sweep must agree on them
RESOURCES = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task")


@dataclass
class SweepJob:
    num: int  # hydra.job.num: the job's subdir of the sweep dir
    overrides: list[str]
    config: DictConfig  # composed at launch, with the sweep dir resolved: what the job runs
    run_dir: Path
    finished: bool  # the run dir holds a finished run of this config: the job is skipped


def plan_jobs(config_loader, master: DictConfig, job_overrides: Sequence[Sequence[str]],
              initial_job_idx: int) -> list[SweepJob]:
    """Compose and check the config of every job of the sweep now, and find the ones already
    finished. (check_jobs then makes the checks that read files.)"""
    sweep_dir = Path(str(master.hydra.sweep.dir))
    jobs = []
    for i, overrides in enumerate(job_overrides):
        num = initial_job_idx + i
        config = config_loader.load_sweep_config(master, list(overrides))
        with open_dict(config):
            config.hydra.job.num = num
            config.hydra.sweep.dir = str(sweep_dir)  # resolved once: ${now:} is the launch's time
            config.hydra.sweep.subdir = str(config.hydra.sweep.subdir)
        run_dir = job_dir(config)
        job = SweepJob(num, list(overrides), config, run_dir, finished=False)
        with naming(job):
            runlock.check_free(run_dir)  # a job still running from an earlier launch of this sweep
            check_working_dir(config)
            train_config = to_train_config(config)
            check_world_size(train_config, planned_world_size(train_config.hardware))
            job.finished = _finished_here(config, run_dir)
        jobs.append(job)
    return jobs


def job_dir(config: DictConfig) -> Path:
    """The run dir of a sweep job whose config plan_jobs composed (sweep dir and subdir resolved)."""
    return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def check_jobs(jobs: list[SweepJob], on_this_machine: bool, check_data: bool = True) -> None:
    """The rest of a single run's checks (nanogpt/runs/preflight.py) for every job that will run:
    init_from, the optimizer, data and vocab (preparing the data if it is missing; not with
    check_data=False), and the device where the jobs run on this machine (a SLURM job's GPUs are
    on its node, not on the login node)."""
    for job in jobs:
        if job.finished:
            continue
        with naming(job):
            train_config = preflight.to_train_config(job.config)
            preflight.check_init_from(train_config)
            preflight.check_optimizer(train_config)
            if on_this_machine:
                preflight.check_hardware(train_config)
            if check_data and job.config.hydra.callbacks.preflight.get("check_data", True):
                preflight.check_data_and_vocab(train_config)


def describe(job: SweepJob) -> str:
    return f"job {job.num} ({' '.join(filter_overrides(job.overrides)) or 'no overrides'})"


@contextlib.contextmanager
def naming(job: SweepJob) -> Iterator[None]:
    """A job's user mistake, with the job named in front of it."""
    try:
        yield
    except UserError as e:
        raise ConfigError(f"{describe(job)}: {e}") from e


def _finished_here(config: DictConfig, run_dir: Path) -> bool:
    """Whether run_dir holds a finished run of this config. A job whose run dir holds a run
    continues it (config becomes that run's config, with the command's RESUMABLE values: a longer
    max_iters extends it); a run dir of another config (a sweep dir reused with other values) is
    refused: its checkpoints would be continued or skipped."""
    if not (run_dir / "config.resolved.yaml").is_file():
        return False
    before = OmegaConf.to_container(read_yaml(run_dir / "config.resolved.yaml", fix=(
        "restore it from a copy of the run, or move the job's dir aside to train that job again")))
    plan_in_place(config, run_dir, way_out="a sweep dir is finished with the command that started it; for "
                  "other values, start a new sweep (leave hydra.sweep.dir alone)")
    now = OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]),
                                 resolve=True, enum_to_str=True)
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


def make_sweep_dir(config: DictConfig) -> Path:
    """The sweep dir, with Hydra's multirun.yaml (the sweep's command and config): made by the
    launcher once every job passed its checks."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        sweep_dir.chmod(int(str(config.hydra.sweep.mode), 8))
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    return sweep_dir


@contextlib.contextmanager
def sweep_dir_made(config: DictConfig) -> Iterator[Path]:
    """make_sweep_dir, for a launcher that may still be refused after it (sbatch says no): on a
    UserError in the block, before any job ran, what was made is taken back."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    top = sweep_dir.absolute()  # the first dir this makes: removed whole on a refusal
    while not top.parent.exists():
        top = top.parent
    made = not top.exists()
    earlier = (sweep_dir / "multirun.yaml").read_bytes() if (sweep_dir / "multirun.yaml").is_file() else None
    before = set(sweep_dir.rglob("*")) if sweep_dir.exists() else set()
    make_sweep_dir(config)
    try:
        yield sweep_dir
    except UserError:
        if made:
            shutil.rmtree(top, ignore_errors=True)
        else:  # a rerun into a sweep dir: what it held stays as it was
            for path in sorted(set(sweep_dir.rglob("*")) - before, reverse=True):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            if earlier is None:
                (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
            else:
                (sweep_dir / "multirun.yaml").write_bytes(earlier)
        raise


def run_one(job: SweepJob, run: Callable[[], JobReturn]) -> JobReturn:
    """Run one job of the sweep (run: Hydra's run_job) and return how it ended, never raising for
    a job's own failure, so the sweep goes on with its other jobs and names this one at the end.
    A user mistake the job refused ends it with its one line and status 2 (nanogpt.errors.user_errors),
    as a single run; that SystemExit is raised while handling the UserError, its __context__."""
    try:
        ret = run()
    except SystemExit as e:
        if not isinstance(e.__context__, UserError):
            raise  # not a refusal: e.g. submitit's own exit after it requeued the job
        ret = JobReturn(overrides=job.overrides, cfg=job.config, working_dir=str(job.run_dir), status=JobStatus.FAILED)
        ret.return_value = e.__context__
    if ret.status == JobStatus.FAILED and not isinstance(ret._return_value, UserError) and not out_of_requeues(ret._return_value):
        error = ret._return_value  # a bug: Hydra caught it without a word; its traceback goes to the job's log
        log.error(f"{describe(job)} failed", exc_info=(type(error), error, error.__traceback__))
    return ret


def run_here(job: SweepJob, hydra_context, task_function, hydra_config: DictConfig) -> JobReturn:
    """Run one job in this process (the basic launcher's jobs, a search's trials), through run_one:
    its dir held by this process while it runs (one live owner, as a single run's), its start-up
    timed on its own, and Hydra's own logging put back afterwards (run_job configures the job's)."""
    def run_locked() -> JobReturn:
        with user_errors():  # a dir still owned by a live process is this job's refusal
            lock = runlock.acquire(job.run_dir)
        startup.clock.restart()  # each job's start-up is its own
        try:
            return run_job(hydra_context=hydra_context, task_function=task_function, config=job.config,
                           job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        finally:
            lock.release()

    ret = run_one(job, run_locked)
    configure_log(hydra_config.hydra_logging, hydra_config.verbose)
    return ret


def out_of_requeues(error: BaseException | None) -> bool:
    """submitit's word for a job that reached its time limit with no requeue left."""
    return type(error).__name__ == "UncompletedJobError" and "timed-out too many times" in str(error)


@dataclass
class Outcome:
    """How one launched job ended: what it returned (None: it ended without returning: killed,
    cancelled, out of memory), the scheduler's last state of it, and where its output went."""

    job: SweepJob
    returned: JobReturn | None
    state: str = ""  # submitit's job state: SLURM's (CANCELLED, OUT_OF_MEMORY, ...) or the local one (INTERRUPTED)
    scheduler_log: Path | None = None  # submitit's stderr of the job
    error: BaseException | None = None  # submitit's: an exception raised in the job outside its run

    @property
    def log(self) -> Path | None:
        """The job's own train.log if it got that far, else the scheduler's log of it."""
        train_log = self.job.run_dir / "train.log"
        return train_log if train_log.is_file() else self.scheduler_log

    def why(self, limits: str = "") -> str | None:
        """Why the job did not finish, in words; None: it finished."""
        ret = self.returned
        if ret is not None and ret.status == JobStatus.COMPLETED:
            return None
        error = ret._return_value if ret is not None else self.error
        # submitit raises this from its signal handler: inside the run, or during the job's start-up
        if out_of_requeues(error) or "timed-out too many times" in str(self.error or ""):
            return (f"ran out of requeues: it reached its time limit once more than max_num_timeout allows ({limits}); "
                    f"to go on, add a larger hydra.launcher.max_num_timeout (or timeout_min) to the command "
                    f"that finishes the sweep: the job continues from its checkpoint")
        if ret is not None:
            if isinstance(error, UserError):  # refused at its start, or stopped with a message (a NaN loss)
                return f"ended with an error: {str(error).rstrip('.')}"
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return f"failed with {type(error).__name__}{': ' + first if first else ''}"
        if type(self.error).__name__ == "FailedJobError":  # its message holds the job's traceback between rules
            trace = [line for line in str(self.error).split("-" * 22)[1].splitlines() if line.strip()] \
                if str(self.error).count("-" * 22) >= 2 else []
            return f"failed with {trace[-1].strip() if trace else 'an error'}"
        state = self.state.strip()
        if state.startswith("CANCELLED"):
            return f"was cancelled ({state})"
        known = {  # SLURM's word for how it ended (sacct), where it has one
            "OUT_OF_MEMORY": "ran out of memory (OUT_OF_MEMORY): give it more with hydra.launcher.mem_gb",
            "TIMEOUT": f"was killed at its time limit before it could save (TIMEOUT; {limits}): raise "
                       f"hydra.launcher.signal_delay_s or timeout_min",
            "NODE_FAIL": "lost its node (NODE_FAIL)",
            "PREEMPTED": "was preempted and not requeued (PREEMPTED): launcher=preemptible requeues such jobs",
            "INTERRUPTED": "was killed by a signal",  # submitit_local: the job's controller ended on a signal
        }
        if state in known:
            return known[state]
        # submitit_local's controller ends normally whatever killed the job: the run's own record tells
        run = (_read_json(self.job.run_dir / "provenance.json") or {}).get("status")
        if run == "running":
            return "was killed while it ran (by a signal such as SIGKILL, or the out-of-memory killer): its run recorded no end"
        if run == "preempted":
            return "stopped on a signal after saving a checkpoint, and was not requeued"
        return f"crashed without a result ({state or 'no state'}{'; its run: ' + run if run else ''})"


def check_all_finished(sweep_dir: Path, outcomes: list[Outcome], limits: str = "") -> None:
    """After every job of the sweep ended: one line on the jobs that did not finish, why, their
    logs, and the command that finishes the sweep."""
    failed = [(o, why) for o in outcomes if (why := o.why(limits)) is not None]
    if not failed:
        return
    names = "; ".join(f"{describe(o.job)} {why}, its log: {o.log}" for o, why in failed)
    others = "; the others finished" if len(failed) < len(outcomes) else ""
    command = resume_command(sweep_dir)
    raise UserError(f"{len(failed)} of {len(outcomes)} jobs failed: {names}{others}"
                    + (f"; to finish the sweep: {command} (it skips the jobs that finished)" if command else ""))
