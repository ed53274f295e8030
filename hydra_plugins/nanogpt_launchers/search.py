"""`nanogpt-train --multirun search=NAME`: an Optuna search run by the sweeper (launchers.Sweeper
hands a sweep over here when the command selects a search), with its workers as local processes.

The command's process is the driver: it checks the search (one line per mistake, before anything
is written), prints what it will do (and stops there with search.dry_run=true), makes the sweep
dir and the study, marks trials whose worker died (resume), and starts search.n_workers workers.
Each worker is the same command again, with NANOGPT_SEARCH_WORKER=<its index> and the sweep dir
fixed: it composes each trial's config as the launchers compose a job's (frozen, checked), trains
it in this process through Hydra's run_job, and reports to the study (nanogpt/sweeps/search.py).
A job of another launcher (submitit, SLURM) can run a worker the same way.
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
from hydra.core.utils import JobStatus, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from nanogpt.errors import ConfigError, UserError, one_line
from nanogpt.parallel.distributed import planned_world_size
from nanogpt.runs import budgets, preflight, runlock, trial as run_trial_hooks
from nanogpt.runs.preflight import to_train_config
from nanogpt.sweeps import launcher, search, space as search_space

log = logging.getLogger(__name__)

WORKER_ENV = "NANOGPT_SEARCH_WORKER"  # set in a worker's environment: its index (its sampler's seed offset)


def is_search(config: DictConfig) -> bool:
    """Whether the command selected a search (search=NAME, whose space is not empty)."""
    return bool(OmegaConf.select(config, "search.space"))


def run(sweeper, arguments: List[str], local: bool) -> list:
    """The search of the command: as its driver, or as one of its workers. local: the command's
    launcher runs jobs on this machine (launcher=local)."""
    config, loader = sweeper.config, sweeper.hydra_context.config_loader
    if not local:
        chosen = config.hydra.runtime.choices.get("launcher")
        raise ConfigError(f"search=... runs its workers as local processes, and launcher={chosen} is not supported "
                          f"for a search yet: drop launcher= (search.n_workers sets how many trials run at once)")
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
        return _work(sweeper, overrides, settings, space, sweep_dir, int(worker))
    return _drive(sweeper, overrides, train_config, settings, space, sweep_dir)


def _drive(sweeper, overrides: List[str], train_config, settings, space, sweep_dir: Path) -> list:
    config, loader = sweeper.config, sweeper.hydra_context.config_loader
    # the base config checked as a job's would be (init_from, optimizer, device, data and vocab)
    (base,) = launcher.plan_jobs(loader, config, [[*overrides, "hydra.sweep.subdir=trial-check"]], 0)
    launcher.check_jobs([base], on_this_machine=True)
    meta = preflight.check_data_and_vocab(train_config)
    world_size = planned_world_size(train_config.hardware)
    tokens_per_step, flops_per_token = budgets.per_step(train_config, meta["vocab_size"], world_size)
    budget = budgets.resolve(train_config, tokens_per_step, flops_per_token)
    tokens = None if budget.by_time else budget.max_steps * tokens_per_step
    words = search.budget_words(train_config, budget)
    if any(key.startswith("model.") or key in ("block_size", "batch_size", "global_batch_size") for key in space):
        words += " (at the base config: the space changes the model or batch)"
    for line in search.describe(settings, space, tokens, flops_per_token, words):
        log.info(line)
    if settings.dry_run:
        log.info(f"dry run (search.dry_run=true): nothing was written; {sweep_dir} would hold the study and the trials")
        return []

    launcher.make_sweep_dir(config)
    study = search.open_study(settings, space, sweep_dir, create=True)
    lost = search.recover(study, sweep_dir, is_busy=_busy)
    if lost:
        log.info(f"trials {', '.join(map(str, lost))} were left running by a worker that died: marked failed, "
                 f"their params asked again in new trials")
    counts = search.count(study)
    if search.finished(counts) >= settings.n_trials:
        log.info(f"the study already holds {search.finished(counts)} finished trials (search.n_trials="
                 f"{settings.n_trials}): nothing to run")
    else:
        log.info(f"study: {sweep_dir / search.JOURNAL}; {search.finished(counts)} of {settings.n_trials} trials "
                 f"finished; starting {settings.n_workers} worker{'s' * (settings.n_workers > 1)}")
        _run_workers(config, overrides, sweep_dir, settings.n_workers)
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


def _work(sweeper, overrides: List[str], settings, space, sweep_dir: Path, worker: int) -> list:
    """One worker: trials asked from the study and trained here, until the study has its trials."""
    config, loader = sweeper.config, sweeper.hydra_context.config_loader
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
            ret = launcher.run_here(job, sweeper.hydra_context, sweeper.launcher.task_function, config.hydra)
        if ret.status == JobStatus.COMPLETED:
            result = ret.return_value
            return search.TrialRun("pruned" if result.get("ended_by") == "pruned" else "complete", result)
        return search.TrialRun("failed", error=one_line(ret._return_value))

    trained = search.work(study, settings, space, sweep_dir, run_trial, worker)
    log.info(f"worker {worker}: done, {trained} trial{'s' * (trained != 1)} trained")
    return []
