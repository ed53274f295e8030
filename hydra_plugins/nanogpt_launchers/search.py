"""`nanogpt-train --multirun search=NAME`: an Optuna search run by the sweeper (launchers.Sweeper
hands a sweep over here when the command selects a search), with its workers where the launcher
group says: local processes (launcher=local), or submitit jobs, on this machine
(launcher=submitit_local) or as one SLURM job array (launcher=slurm, preemptible).

The command's process is the driver: it checks the search (one line per mistake, before anything
is written), prints what it will do (and stops there with search.dry_run=true), makes the sweep
dir and the study, marks trials whose worker died (resume), and starts search.n_workers workers.
A worker composes each trial's config as the launchers compose a job's (frozen, checked), trains
it in its own process through Hydra's run_job, and reports to the study (nanogpt/sweeps/search.py):

- a local worker is the same command again, with NANOGPT_SEARCH_WORKER=<its index> and the sweep
  dir fixed;
- a submitit worker is a WorkerJob, one task of an array. A preempted or timed-out worker saves its
  trial's checkpoint (the run's own signal handling), submitit requeues the job with the same
  worker index, and the requeued worker first continues the trial it left running.
"""

# no `from __future__ import annotations`: Hydra imports plugin modules without registering them in sys.modules
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, configure_log, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from nanogpt.errors import ConfigError, UserError, one_line, user_errors
from nanogpt.parallel.distributed import planned_world_size
from nanogpt.runs import budgets, preflight, runlock, trial as run_trial_hooks
from nanogpt.runs.preflight import to_train_config
from nanogpt.sweeps import launcher, search, space as search_space

log = logging.getLogger(__name__)

WORKER_ENV = "NANOGPT_SEARCH_WORKER"  # set in a worker's environment: its index (its sampler's seed offset)


def is_search(config: DictConfig) -> bool:
    """Whether the command selected a search (search=NAME, whose space is not empty)."""
    return bool(OmegaConf.select(config, "search.space"))


def run(sweeper, arguments: List[str], workers: str) -> list:
    """The search of the command: as its driver, or as one of its local workers. workers: how the
    command's launcher runs them: "local" (processes), "submitit" (jobs of its executor) or
    "other" (a Hydra launcher of another plugin: refused)."""
    config, loader = sweeper.config, sweeper.hydra_context.config_loader
    if workers == "other":
        raise ConfigError(f"search=... runs its workers as local processes or submitit jobs, and the launcher "
                          f"{config.hydra.launcher._target_} is not supported for a search: use launcher=local, "
                          f"submitit_local, slurm or preemptible")
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    swept = [o.input_line for o in parsed if o.is_sweep_override()]
    if swept or OmegaConf.select(config, "hydra.sweeper.params"):
        what = swept[0] if swept else f"sweep={config.hydra.runtime.choices.get('sweep')}"
        raise ConfigError(f"{what} lists values for a grid, and search=... picks each trial's values itself: drop it, "
                          f"or put the key in search.space")
    overrides = [o.input_line for o in parsed]
    train_config = to_train_config(config)
    settings = train_config.search
    search.check(settings, {"target_val_loss": train_config.target_val_loss})
    if workers == "submitit" and train_config.hardware.nnodes > 1:
        raise ConfigError(f"hardware.nnodes={train_config.hardware.nnodes}: a search's worker job trains its trials on "
                          f"one node; search with trials of one node (hardware.nproc_per_node processes each)")
    if planned_world_size(train_config.hardware) > 1 and settings.pruner.name.value != "none":
        raise ConfigError("a pruned search hears each trial's evaluations in its worker's process, and "
                          "hardware.nproc_per_node > 1 trains in other processes: use one process per trial, or "
                          "search.pruner.name=none")
    given = {o.key_or_group.lstrip("+") for o in parsed}
    for key in settings.space:
        if key in given:
            raise ConfigError(f"{key} is set on the command line and searched (search.space.{key}): drop one")
    space = search_space.distributions(settings, config, check=to_train_config)
    search_space.check_enqueued(settings, space)
    if settings.sampler.name.value == "grid":
        search.check_grid(settings, space)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    worker = os.environ.get(WORKER_ENV)
    if worker is not None:
        _work(sweeper.hydra_context, sweeper.launcher.task_function, config, overrides, settings, space, sweep_dir,
              int(worker))
        return []
    return _drive(sweeper, overrides, train_config, settings, space, sweep_dir, workers)


def _drive(sweeper, overrides: List[str], train_config, settings, space, sweep_dir: Path, workers: str) -> list:
    config, loader = sweeper.config, sweeper.hydra_context.config_loader
    on_this_machine = workers == "local" or sweeper.launcher.on_this_machine
    # the base config checked as a job's would be (init_from, optimizer, device, data and vocab)
    (base,) = launcher.plan_jobs(loader, config, [[*overrides, "hydra.sweep.subdir=trial-check"]], 0)
    # a dry run writes nothing, the data cache included: a missing dataset (FineWeb-Edu is days of
    # download) is left for the first trial, and the FLOPs use the vocabulary known without it
    unprepared = settings.dry_run and not preflight.data_is_prepared(train_config)
    launcher.check_jobs([base], on_this_machine=on_this_machine, check_data=not unprepared)
    if unprepared:
        vocab = preflight.vocab_before_preparing(train_config)
        log.info(f"data={train_config.data.name} is not prepared in {train_config.data.dir}: the first trial will "
                 f"prepare it (or nanogpt-prepare data={train_config.data.name} now)"
                 + ("" if vocab else "; its char vocabulary is unknown until then: FLOPs counted with 256 tokens"))
        vocab = vocab or 256
    else:
        vocab = preflight.check_data_and_vocab(train_config)["vocab_size"]
    world_size = planned_world_size(train_config.hardware)
    tokens_per_step, flops_per_token = budgets.per_step(train_config, vocab, world_size)
    budget = budgets.resolve(train_config, tokens_per_step, flops_per_token)
    tokens = None if budget.by_time else budget.max_steps * tokens_per_step
    words = search.budget_words(train_config, budget)
    if any(key.startswith("model.") or key in ("block_size", "batch_size", "global_batch_size") for key in space):
        words += " (at the base config: the space changes the model or batch)"
    resources = _worker_resources(sweeper.launcher, train_config) if workers == "submitit" else None
    where = _where_words(config, settings.n_workers, resources)
    for line in search.describe(settings, space, tokens, flops_per_token, words, where):
        log.info(line)
    for line in search.device_hours(settings, train_config, budget, tokens, flops_per_token, world_size):
        log.info(line)
    if resources is not None:
        log.info("each worker job: " + ", ".join(f"{k}={v}" for k, v in resources.items() if v is not None))
        if not resources.get("max_num_timeout"):
            log.info("note: a worker job trains trial after trial; one that reaches timeout_min is not requeued "
                     "(max_num_timeout=0) and its trial is asked again from the start: launcher=preemptible requeues "
                     "it to continue the trial from its checkpoint")
    if settings.dry_run:
        log.info(f"dry run (search.dry_run=true): nothing was written; {sweep_dir} would hold the study and the trials")
        return []

    launcher.make_sweep_dir(config)
    study = search.open_study(settings, space, sweep_dir, create=True)
    lost = search.recover(study, sweep_dir, is_busy=_busy, reask=settings.reask_lost)
    if lost:
        log.info(f"trials {', '.join(map(str, lost))} were left running by a worker that died: marked failed"
                 + (", their params asked again in new trials" if settings.reask_lost else ""))
    counts = search.count(study)
    if search.finished(counts) >= settings.n_trials:
        log.info(f"the study already holds {search.finished(counts)} finished trials (search.n_trials="
                 f"{settings.n_trials}): nothing to run")
    else:
        log.info(f"study: {search.where(settings, sweep_dir)}; {search.finished(counts)} of {settings.n_trials} trials "
                 f"finished; starting {settings.n_workers} worker{'s' * (settings.n_workers > 1)}")
        if workers == "local":
            _run_workers(config, overrides, sweep_dir, settings.n_workers)
        else:
            _submit_workers(sweeper, overrides, settings, space, sweep_dir, resources)
        # a worker that died (killed, out of memory) left its trial running: failed now, its params asked again
        lost = search.recover(search.open_study(settings, space, sweep_dir), sweep_dir, is_busy=_busy,
                              reask=settings.reask_lost)
        if lost:
            log.warning(f"trials {', '.join(map(str, lost))} were left running by a worker that died: marked failed"
                        + (", their params to be asked again" if settings.reask_lost else ""))
    _summary(search.open_study(settings, space, sweep_dir), settings, sweep_dir, overrides)
    return []


def _run_workers(config: DictConfig, overrides: List[str], sweep_dir: Path, n_workers: int) -> None:
    """n_workers copies of this command as worker processes, on this sweep dir; waits for them all."""
    # Hydra's own overrides of the command (launcher, logging, ...), the sweep dir fixed: ${now:} differs per process
    hydra_overrides = [o for o in OmegaConf.to_container(config.hydra.overrides.hydra)
                       if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    command = [sys.executable, "-m", "nanogpt.train", "--multirun", *hydra_overrides, *overrides,
               f"hydra.sweep.dir={sweep_dir}"]
    # the workers share this machine's cores (hardware.cpus_per_process each, if set), unless the user set threads
    threads = OmegaConf.select(config, "hardware.cpus_per_process") or max(1, (os.cpu_count() or 1) // n_workers)
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    workers = [subprocess.Popen(command, env={**env, WORKER_ENV: str(i)}) for i in range(n_workers)]
    try:
        codes = [w.wait() for w in workers]
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: each saves its trial and stops
        for w in workers:
            w.wait()
        raise
    for i, code in enumerate(codes):
        if code != 0:
            log.warning(f"worker {i} exited with status {code}")


def _summary(study, settings, sweep_dir: Path, overrides: List[str]) -> None:
    counts = search.count(study)
    done = search.finished(counts)
    log.info(f"search: {done} of {settings.n_trials} trials finished ({counts.get('COMPLETE', 0)} complete, "
             f"{counts.get('PRUNED', 0)} pruned; {counts.get('FAIL', 0)} failed) in {sweep_dir}")
    if counts.get("COMPLETE"):
        best = study.best_trial
        params = " ".join(search_space.override(k, v) for k, v in best.params.items())
        log.info(f"best: trial {best.number} ({sweep_dir / search.trial_dir_name(best.number)}), "
                 f"{settings.objective.value}={best.value:.6g}: {params}")
    if done < settings.n_trials:
        command = shlex.join(["nanogpt-train", "--multirun", *overrides, f"hydra.sweep.dir={sweep_dir}"])
        raise UserError(f"the search stopped with {done} of {settings.n_trials} trials finished: continue it with "
                        f"`{command}`")


def _busy(run_dir: Path) -> bool:
    try:
        runlock.check_free(run_dir)
    except runlock.RunDirBusy:
        return True
    return False


def _work(hydra_context, task_function, config: DictConfig, overrides: List[str], settings, space, sweep_dir: Path,
          worker: int) -> int:
    """One worker: trials asked from the study and trained in this process, until the study has its
    trials. Returns how many it trained."""
    loader = hydra_context.config_loader
    setup_globals()
    study = search.open_study(settings, space, sweep_dir, worker=worker)

    def run_trial(trial, on_eval: Callable[[int, float], bool]) -> search.TrialRun:
        params = [search_space.override(key, value) for key, value in trial.params.items()]
        log.info(f"worker {worker}: trial {trial.number}: {' '.join(params)}")
        try:
            (job,) = launcher.plan_jobs(loader, config, [[*overrides, *params,
                                        f"hydra.sweep.subdir={search.trial_dir_name(trial.number)}"]], trial.number)
            launcher.check_jobs([job], on_this_machine=True)
        except UserError as e:
            return search.TrialRun("failed", error=one_line(e))
        with open_dict(job.config):
            job.config.hydra.job.id = f"{trial.number}"

        with run_trial_hooks.reporting_to(on_eval):
            ret = launcher.run_here(job, hydra_context, task_function, config.hydra)
        if ret.status == JobStatus.COMPLETED:
            result = ret.return_value
            return search.TrialRun("pruned" if result.get("ended_by") == "pruned" else "complete", result)
        return search.TrialRun("failed", error=one_line(ret._return_value))

    trained = search.work(study, settings, space, sweep_dir, run_trial, worker, is_busy=_busy)
    log.info(f"worker {worker}: done, {trained} trial{'s' * (trained != 1)} trained")
    return trained


# the worker job's resources that differ from a grid job's: the rest is the launcher's own (hydra.launcher.*)
WORKER_RESOURCES = ("tasks_per_node", "cpus_per_task", "gpus_per_node")


def _worker_resources(hydra_launcher, train_config) -> dict:
    """What each worker job asks for: one task on one node that trains its trials one after the
    other, each with hardware.nproc_per_node processes that nanogpt-train starts itself (as under
    submitit_local), so the task gets their CPUs and GPUs; the rest is the launcher's
    (conf/launcher/*.yaml and the site)."""
    params, hardware = hydra_launcher.params, train_config.hardware
    cpus = hardware.cpus_per_process
    resources = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": params.get("gpus_per_node"),
                 "cpus_per_task": None if cpus is None else cpus * hardware.nproc_per_node}
    for key in ("mem_gb", "timeout_min", "max_num_timeout", "partition", "account", "qos", "constraint"):
        if params.get(key) is not None:
            resources[key] = params[key]
    return resources


def _where_words(config: DictConfig, n_workers: int, resources: dict | None) -> str:
    """Where the workers run, for the plan's first line."""
    workers = f"{n_workers} worker{'s' * (n_workers > 1)}"
    if resources is None:
        return f"{n_workers} local worker{'s' * (n_workers > 1)}"
    chosen = config.hydra.runtime.choices.get("launcher")
    if chosen == "submitit_local":
        return f"{workers} as submitit_local jobs"
    return f"{workers} as one SLURM job array (launcher={chosen})"


def _submit_workers(sweeper, overrides: List[str], settings, space, sweep_dir: Path, resources: dict) -> None:
    """search.n_workers WorkerJobs as one array of the launcher's executor; waits for them all."""
    job = WorkerJob(sweeper.hydra_context, sweeper.launcher.task_function, sweeper.config, overrides, settings,
                    space, sweep_dir)
    asked = {key: resources[key] for key in WORKER_RESOURCES if resources.get(key) is not None}
    submitted = sweeper.launcher.submit([(i,) for i in range(settings.n_workers)], function=job, **asked)
    log.info(f"workers submitted: job{'s' * (len(submitted) > 1)} {', '.join(s.job_id for s in submitted)}; their "
             f"logs in {sweep_dir / '.submitit'}")
    for i, submission in enumerate(submitted):
        try:
            error = submission.exception()  # waits for it
        except Exception as e:  # submitit could not tell how it ended (its state, its pickled result)
            error = e
        if error is not None:
            why = str(error).strip().splitlines()
            log.warning(f"worker {i} (job {submission.job_id}) ended without finishing: "
                        f"{why[-1] if why else type(error).__name__}; its log: {submission.paths.stderr}")


class WorkerJob:
    """A search's worker as a submitit job (one task of an array), called with its worker index.
    When its job is preempted or reaches its time limit, the run it trains saves and hands the
    signal to submitit (nanogpt/runs/signals.py), which calls checkpoint() and requeues the job
    with the same index: the requeued worker continues the trial it left running."""

    def __init__(self, hydra_context, task_function, config: DictConfig, overrides: List[str], settings, space,
                 sweep_dir: Path) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        self.overrides, self.settings, self.space, self.sweep_dir = overrides, settings, space, sweep_dir
        self.singleton_state = Singleton.get_state()  # Hydra's state (config store, ...) for the job's process

    def __call__(self, worker: int) -> int:
        Singleton.set_state(self.singleton_state)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        with user_errors():
            return _work(self.hydra_context, self.task_function, self.config, self.overrides, self.settings,
                         self.space, self.sweep_dir, worker)

    def checkpoint(self, worker: int):
        """submitit's hook on preemption or a time limit: the same worker again."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, worker)
