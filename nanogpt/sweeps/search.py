"""A hyperparameter search with Optuna: the study in the sweep dir, and the workers that train its
trials (docs/search.md).

The study lives in the sweep dir, in Optuna's journal storage on a file (`study.journal`): an
append-only log that survives a crash at any point and needs no database server, also on a
shared file system (an RDB URL in search.storage may replace it). Workers share it through
Optuna's ask-and-tell interface and never wait for each other:

    worker: ask a trial -> train it as an ordinary run in <sweep dir>/trial-NNNN/ -> tell its
            objective (or pruned, or failed) -> ask again, until the study holds n_trials
            finished (complete or pruned) trials

A trial's number is the study's, so no run dir is ever used twice, also across a resume. At
each evaluation the run reports its val loss to the trial (train.py's on_eval, through
runs/trial.py); when the pruner says so, the run ends at that step with a checkpoint, and is
marked pruned in its provenance.json and in the study.

The same command again continues the study (`resume`): finished trials stay; a trial left
running by a worker that died is marked failed and its params asked again, in a new trial and a
new run dir. What starts the workers (local processes here) lives with the launchers in
hydra_plugins/nanogpt_launchers/search.py; `work` is all that a worker runs.

Optuna is imported inside the functions that need it: `--cfg job` and `--help` stay quick.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nanogpt.config import Direction, Objective, PrunerName, SamplerName, SearchConfig
from nanogpt.errors import ConfigError, UserError
from nanogpt.runs.loggers import redact

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger(__name__)

STUDY_NAME = "search"
JOURNAL = "study.journal"  # the study, in the sweep dir
ASK_LOCK = "ask.lock"  # held while a worker counts the trials and asks for one
SPACE_ATTR = "space"  # the study's user attr: the space it was created with (a resume must match it)
RETRY_ATTR = "retry_of"  # a trial's user attr: the trial whose worker died, whose params it tries again
FINISHED = ("COMPLETE", "PRUNED")  # the trials that count towards n_trials


def trial_dir_name(number: int) -> str:
    return f"trial-{number:04d}"


def check(search: SearchConfig, objective_needs: dict) -> None:
    """Optuna is there, and the settings of a search that do not depend on the space: one line per mistake.
    objective_needs: the base config's target_val_loss and budgets ({key: value})."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("search=... runs on Optuna, which is not installed: pip install 'nanogpt[search]'") from None
    if search.n_trials < 1:
        raise ConfigError(f"search.n_trials={search.n_trials}: a search needs at least 1 trial")
    if search.n_workers < 1:
        raise ConfigError(f"search.n_workers={search.n_workers}: a search needs at least 1 worker")
    if not 0 < search.assumed_mfu <= 1:
        raise ConfigError(f"search.assumed_mfu={search.assumed_mfu} is not a fraction of the peak: give one in (0, 1], "
                          f"e.g. the MFU nanogpt-bench measures")
    objective = Objective(search.objective)
    if objective.name.endswith("_to_target") and objective_needs.get("target_val_loss") is None:
        raise ConfigError(f"search.objective={objective.value} measures the time to target_val_loss, which is not set: "
                          f"set target_val_loss=LOSS (and stop_at_target=true to end each trial there)")
    if Direction(search.direction) == Direction.maximize and PrunerName(search.pruner.name) != PrunerName.none:
        raise ConfigError("search.direction=maximize with a pruner: pruners compare val losses, which a search "
                          "minimises; use direction=minimize (every objective is a loss or a cost) or pruner.name=none")
    if SamplerName(search.sampler.name) == SamplerName.cmaes:
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("search.sampler.name=cmaes needs the cmaes package: pip install 'nanogpt[search]'") from None
    if search.storage is not None and "://" not in search.storage:
        raise ConfigError(f"search.storage={search.storage} is not a database URL (sqlite:///PATH, postgresql://...): "
                          f"give one, or null for the journal file in the sweep dir")


def check_grid(search: SearchConfig, space: dict[str, "BaseDistribution"]) -> None:
    """sampler=grid: every key has its values, n_trials is at most their combinations, and nothing
    is enqueued (the grid tries each combination anyway)."""
    from nanogpt.sweeps.space import grid

    size = math.prod(len(values) for values in grid(search, space).values())
    if search.n_trials > size:
        raise ConfigError(f"search.n_trials={search.n_trials} is more than the {size} combinations of the grid "
                          f"(sampler=grid tries each once): set search.n_trials={size}")
    if search.enqueue:
        raise ConfigError("search.enqueue with sampler=grid: the grid tries every combination anyway; "
                          "drop search.enqueue (search.enqueue=[])")


def objective_value(search: SearchConfig, result: dict) -> float:
    """A finished run's objective, from what nanogpt-train's task returned (train.py's result)."""
    objective = Objective(search.objective)
    if objective == Objective.best_val_loss:
        return float(result["best_val_loss"])
    if objective == Objective.final_val_loss:
        return float(result["val_loss"])
    target = result.get("target")
    if not target:  # never reached: the worst value a minimised cost can have
        return math.inf
    return float(target[{"time_to_target": "train_seconds", "tokens_to_target": "tokens",
                         "flops_to_target": "flops"}[objective.value]])


def sampler(search: SearchConfig, space: dict[str, "BaseDistribution"], worker: int) -> "optuna.samplers.BaseSampler":
    """search.sampler, seeded with seed + worker: two workers with one seed would draw the same trials
    (grid: one seed for all, which only shuffles the order of one grid)."""
    import optuna

    from nanogpt.sweeps.space import grid

    name, seed = SamplerName(search.sampler.name), search.sampler.seed + worker
    startup = search.sampler.n_startup_trials
    if name == SamplerName.tpe:
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    if name == SamplerName.random:
        return optuna.samplers.RandomSampler(seed=seed)
    if name == SamplerName.grid:  # every worker walks one grid: its seed only shuffles the order

        class Grid(optuna.samplers.GridSampler):
            def after_trial(self, *args, **kwargs) -> None:
                """Optuna's stops study.optimize() when the grid is done, and raises outside it (ask and
                tell): the workers stop by n_trials, which check_grid holds to the grid's size."""

        return Grid(grid(search, space), seed=search.sampler.seed)
    if name == SamplerName.cmaes:
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)


def pruner(search: SearchConfig) -> "optuna.pruners.BasePruner":
    import optuna

    p = search.pruner
    name = PrunerName(p.name)
    if name == PrunerName.median:
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if name == PrunerName.successive_halving:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if name == PrunerName.hyperband:
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def storage(search: SearchConfig, sweep_dir: Path):
    """Where the study lives: the journal file in the sweep dir, or search.storage's database."""
    if search.storage is not None:
        return search.storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))


def where(search: SearchConfig, sweep_dir: Path) -> str:
    """Where the study lives, in words for a log: the journal's path, or search.storage's URL
    without its user:password@ (the log and the terminal are no place for them)."""
    if search.storage is None:
        return str(sweep_dir / JOURNAL)
    return redact(search.storage)


def open_study(search: SearchConfig, space: dict[str, "BaseDistribution"], sweep_dir: Path, worker: int = 0,
               create: bool = False) -> "optuna.Study":
    """The sweep dir's study. create: make it if it is new (with the enqueued params first), and
    refuse one made with another space (resume)."""
    import optuna
    from optuna.distributions import distribution_to_json

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    kwargs = dict(study_name=STUDY_NAME, storage=storage(search, sweep_dir), sampler=sampler(search, space, worker),
                  pruner=pruner(search))
    if not create:
        study = optuna.load_study(**kwargs)
        # a worker of a continued search must not replay the draws of the workers before it: its
        # seed also counts the trials the study holds (reproducible for the same history)
        study.sampler = sampler(search, space, worker + 1000 * len(study.get_trials(deepcopy=False)))
        return study
    study = optuna.create_study(direction=Direction(search.direction).value, load_if_exists=True, **kwargs)
    space_json = {key: distribution_to_json(d) for key, d in space.items()}
    before = study.user_attrs.get(SPACE_ATTR)
    if before is None:
        study.set_user_attr(SPACE_ATTR, space_json)
        study.set_user_attr("objective", Objective(search.objective).value)
        with warnings.catch_warnings():  # Optuna marks it experimental; the dashboard and plots show the name
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([Objective(search.objective).value])
        for params in search.enqueue:
            study.enqueue_trial(dict(params))
    elif before != space_json or study.user_attrs.get("objective") != Objective(search.objective).value:
        raise ConfigError(f"{sweep_dir} holds a search of another space or objective: continue it with the command "
                          f"that started it, or start a new search (leave hydra.sweep.dir alone)")
    return study


def count(study: "optuna.Study") -> dict[str, int]:
    """The study's trials by state: COMPLETE, PRUNED, FAIL, RUNNING, WAITING."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def finished(counts: dict[str, int]) -> int:
    return sum(counts.get(state, 0) for state in FINISHED)


def recover(study: "optuna.Study", sweep_dir: Path, is_busy: Callable[[Path], bool], reask: bool = True) -> list[int]:
    """Trials left running by a worker that died (their run dir has no live owner): each is
    marked failed and, with reask (search.reask_lost), its params are asked again, first, in a
    new trial (and so a new run dir). Returns their numbers."""
    from optuna.trial import TrialState

    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_busy(sweep_dir / trial_dir_name(trial.number)):
            continue  # its worker is alive (another command is working on this study)
        study.tell(trial.number, state=TrialState.FAIL)
        if reask:
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_ATTR: trial.number})
        lost.append(trial.number)
    return lost


@dataclass
class TrialRun:
    """What a worker's run_trial returns: how the run ended, and its result (train.py's)."""

    state: str  # complete | pruned | failed
    result: dict | None = None
    error: str | None = None  # failed: why, in one line


def unfinished_of(study: "optuna.Study", sweep_dir: Path, worker: int,
                  is_busy: Callable[[Path], bool]) -> list["optuna.trial.FrozenTrial"]:
    """The trials this worker left running and no live process trains: a worker job that was
    preempted (or reached its time limit) and requeued finds its trial here, saved at the step
    where the signal came, and continues it in its run dir."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") == worker and not is_busy(sweep_dir / trial_dir_name(t.number))]


def work(study: "optuna.Study", search: SearchConfig, space: dict[str, "BaseDistribution"], sweep_dir: Path,
         run_trial: Callable[["optuna.Trial", Callable[[int, float], bool]], TrialRun], worker: int = 0,
         is_busy: Callable[[Path], bool] = lambda run_dir: False) -> int:
    """One worker: first the trials it left running before a requeue (unfinished_of), resumed
    from their checkpoints; then ask a trial, train it (run_trial(trial, on_eval)), tell how it
    ended; again, until the study holds n_trials finished trials or none is left to ask. Returns
    the trials this worker trained. Failed trials do not count: the worker asks again, up to
    n_trials of them in the study, after which a search that only fails stops."""
    import optuna
    from optuna.storages.journal import JournalFileOpenLock

    ask_lock = JournalFileOpenLock(str(sweep_dir / ASK_LOCK))
    trained = 0
    for left in unfinished_of(study, sweep_dir, worker, is_busy):
        trial = optuna.Trial(study, left._trial_id)
        log.info(f"worker {worker}: trial {left.number} was left running by this worker's last start: continuing it")
        _train_and_tell(study, search, trial, run_trial)
        trained += 1
    while True:
        ask_lock.acquire()  # counting and asking as one: two workers never ask for the last trial both
        try:
            counts = count(study)
            if finished(counts) + counts.get("RUNNING", 0) >= search.n_trials:
                return trained
            if counts.get("FAIL", 0) >= search.n_trials:
                raise UserError(f"{counts['FAIL']} trials of the search failed, as many as search.n_trials: see "
                                f"their train.log in {sweep_dir}/trial-*/ (the same command continues the search)")
            trial = study.ask(space)
            trial.set_user_attr("worker", worker)  # before the lock goes: a requeued worker finds its trial by it
        finally:
            ask_lock.release()
        _train_and_tell(study, search, trial, run_trial)
        trained += 1


def _train_and_tell(study: "optuna.Study", search: SearchConfig, trial: "optuna.Trial",
                    run_trial: Callable[["optuna.Trial", Callable[[int, float], bool]], TrialRun]) -> None:
    """Train one trial and tell the study how it ended. A worker stopped by a signal (SystemExit,
    after the run saved) tells nothing: the trial stays running, for the requeued worker."""
    from optuna.trial import TrialState

    def on_eval(step: int, val_loss: float) -> bool:
        """Each evaluation's val loss, reported to the trial: True when the pruner ends it."""
        if step not in trial.storage.get_trial(trial._trial_id).intermediate_values:  # a resumed trial re-evaluates
            trial.report(val_loss, step)
        return trial.should_prune()

    try:
        outcome = run_trial(trial, on_eval)
    except Exception:  # a bug: the trial is failed in the study, not left running, and the worker ends
        study.tell(trial, state=TrialState.FAIL)
        raise
    if outcome.state == "complete":
        value = objective_value(search, outcome.result)
        study.tell(trial, value)
        log.info(f"trial {trial.number}: {Objective(search.objective).value}={value:.6g}")
    elif outcome.state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        log.info(f"trial {trial.number}: pruned at step {outcome.result.get('step')}")
    else:
        trial.set_user_attr("error", outcome.error or "failed")
        study.tell(trial, state=TrialState.FAIL)
        log.warning(f"trial {trial.number} failed: {outcome.error}")


def describe(search: SearchConfig, space: dict[str, "BaseDistribution"], tokens_per_trial: int | None,
             flops_per_token: float, per_trial: str, workers: str) -> list[str]:
    """What a search will do, before it does it: the dry run's lines (and the first lines of a real
    one). workers: where they run, in words ("2 local workers")."""
    lines = [f"search: {search.n_trials} trials of {SamplerName(search.sampler.name).value} (seed "
             f"{search.sampler.seed}), {workers}, "
             f"{Objective(search.objective).value} ({Direction(search.direction).value}), pruner "
             f"{PrunerName(search.pruner.name).value}"]
    for key, d in space.items():
        lines.append(f"  {key}: {_describe_distribution(d)}")
    if tokens_per_trial is not None:
        total = tokens_per_trial * flops_per_token * search.n_trials
        lines.append(f"compute: {per_trial}: {tokens_per_trial:,} tokens x {flops_per_token:.3g} FLOPs per token = "
                     f"{tokens_per_trial * flops_per_token:.3g} FLOPs per trial, {total:.3g} FLOPs for "
                     f"{search.n_trials} trials at most (pruning saves some)")
    else:
        lines.append(f"compute: {per_trial}")
    return lines


def device_hours(search: SearchConfig, train_config, budget, tokens_per_trial: int | None, flops_per_token: float,
                 devices_per_trial: int) -> list[str]:
    """The device-hours of the whole search at most (every trial to its end; pruning saves some),
    in words. Under max_time it is exact: trials x max_time x devices per trial (training time;
    evaluation and start-up come on top). Otherwise the search's FLOPs at search.assumed_mfu of
    hardware.peak_flops per device: device-seconds = FLOPs / (peak x MFU)."""
    n = search.n_trials
    if budget.by_time:
        hours = n * budget.max_seconds * devices_per_trial / 3600
        return [f"device-hours: {hours:.3g} at most ({n} trials x {train_config.max_time} of training x "
                f"{devices_per_trial} device{'s' * (devices_per_trial > 1)}; evaluation and start-up come on top)"]
    peak = train_config.hardware.peak_flops
    if peak is None:
        return ["device-hours: not estimated, as hardware.peak_flops is not set: set it to the device's dense FLOP/s "
                "(e.g. hardware.peak_flops=989e12 for an H100 in bf16) to see them"]
    flops = tokens_per_trial * flops_per_token * n
    hours = flops / (peak * search.assumed_mfu) / 3600
    return [f"device-hours: {hours:.3g} at most: {flops:.3g} FLOPs at {search.assumed_mfu:.0%} MFU "
            f"(search.assumed_mfu) of {peak:.3g} FLOP/s per device (hardware.peak_flops)"]


def _describe_distribution(d) -> str:
    from optuna.distributions import CategoricalDistribution

    if isinstance(d, CategoricalDistribution):
        return f"one of {list(d.choices)}"
    kind = "int" if type(d).__name__ == "IntDistribution" else "float"
    grid = f", step {d.step:g}" if d.step not in (None, 1) else ""
    return f"{kind} in [{d.low:g}, {d.high:g}]{', log scale' if d.log else ''}{grid}"


def budget_words(train_config, budget) -> str:
    """How long each trial trains, for describe()."""
    if budget.by_time:
        return f"each trial trains {train_config.max_time} (max_time: its FLOPs depend on the machine's speed)"
    knob = budget.name if budget.name != "max_iters" else "max_iters"
    return f"each trial trains {budget.max_steps} steps ({knob}={getattr(train_config, knob):g})"

