"""A search's trials, as nanogpt-report shows them (docs/search.md, "The report").

The study is the source of truth for each trial: its state (complete, pruned, failed, running,
waiting), its params and its objective. Each trial's run dir, `<sweep dir>/trial-NNNN/`, adds
what it ran: steps, wall time, tokens and FLOPs (metrics.jsonl, provenance.json), and where it
would have ended had the pruner let it (max_iters, or the step its budget ends at, as
runs/budgets.py resolves it from config.resolved.yaml). From these follow the table, the best
trial and the command that trains it again, and the compute that pruning saved.

The study is found and opened as nanogpt-dashboard finds it (sweeps/dashboard.py). Optuna is
imported inside the functions that read it: a grid's report needs none, and a sweep dir with a
study on a machine without Optuna still gets its run-dir tables (`OptunaMissing`).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from nanogpt.runs import budgets
from nanogpt.runs.runfiles import read_json, read_jsonl, read_yaml
from nanogpt.sweeps import dashboard
from nanogpt.sweeps.curves import tokens_per_step
from nanogpt.sweeps.search import JOURNAL, STUDY_NAME, trial_dir_name
from nanogpt.sweeps.space import override

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

# a trial's run file that cannot be read: what to do about it
RUN_FIX = "restore it from a copy of the sweep dir, or move it aside (the report then goes without it)"
NO_OPTUNA = ("this sweep dir holds an Optuna search, and Optuna is not installed here: pip install 'nanogpt[search]' "
             "for its trials, best trial and pruning (the tables above are its trials' run dirs)")
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
CSV_COLUMNS = ("trial", "state", "value", "steps", "planned_steps", "saved_steps", "wall_s", "tokens", "flops",
               "run_dir")  # the params' columns go after value, one per key of the space


class OptunaMissing(Exception):
    """The sweep dir holds a study, and Optuna (the search extra) is not installed."""


@dataclass
class Trial:
    """One trial: the study's view of it, and what its run dir says it ran."""

    number: int
    state: str  # complete | pruned | failed | running | waiting
    params: dict[str, Any]
    value: float | None  # the objective; complete trials only
    run_dir: Path
    steps: int | None = None  # the last step the run logged; None: nothing logged (yet)
    planned_steps: int | None = None  # where it would have ended unpruned; None: unknown, or set by time (max_time)
    wall_s: float | None = None  # the run's wall time; a running trial: seconds since it started
    tokens: int | None = None  # trained by the last step logged, all processes
    flops: float | None = None  # training FLOPs by then (model FLOPs per token x tokens)
    tokens_per_step: int | None = None
    flops_per_token: float | None = None
    threads: int | None = None  # torch threads the run trained with: CPU sums depend on them

    @property
    def saved_steps(self) -> int | None:
        """The steps a pruned trial did not run: its planned end minus where it stopped."""
        if self.state != "pruned" or self.planned_steps is None or self.steps is None:
            return None
        return max(self.planned_steps - self.steps, 0)

    @property
    def saved_tokens(self) -> int | None:
        saved = self.saved_steps
        return None if saved is None or self.tokens_per_step is None else saved * self.tokens_per_step

    @property
    def saved_flops(self) -> float | None:
        tokens = self.saved_tokens
        return None if tokens is None or self.flops_per_token is None else tokens * self.flops_per_token


@dataclass
class Search:
    """A sweep dir's study: its trials in the report's order (complete ones best first, then the
    others by number) and what they searched."""

    objective: str  # best_val_loss, final_val_loss, time_to_target, ...
    direction: str  # minimize | maximize
    n_trials: int | None  # the finished trials the search runs to (multirun.yaml's search.n_trials)
    space: dict[str, "BaseDistribution"]  # key -> its distribution, in the space's order
    trials: list[Trial]

    @property
    def best(self) -> Trial | None:
        complete = [t for t in self.trials if t.state == "complete"]
        return complete[0] if complete else None

    @property
    def finished(self) -> int:
        """The trials that count towards n_trials (nanogpt/sweeps/search.py: complete or pruned)."""
        return sum(t.state in ("complete", "pruned") for t in self.trials)


def holds_study(sweep_dir: Path) -> bool:
    """Whether sweep_dir is a search's: its study.journal, or a database named in multirun.yaml."""
    if (sweep_dir / JOURNAL).is_file():
        return True
    multirun = _multirun(sweep_dir)
    return multirun is not None and bool(OmegaConf.select(multirun, "search.space")) \
        and OmegaConf.select(multirun, "search.storage") is not None


def read(sweep_dir: Path) -> Search | None:
    """The sweep dir's search, its trials joined with their run dirs; None when the study holds
    nothing yet (a search that is starting). Raises OptunaMissing, or a UserError when the study
    or a trial's run files cannot be read."""
    try:
        import optuna
        from optuna.distributions import json_to_distribution
    except ImportError:
        raise OptunaMissing(NO_OPTUNA) from None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # found and opened as nanogpt-dashboard does: a damaged journal or a moved database is one line
    storage = dashboard.open_storage(*dashboard.find_storage(sweep_dir))
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage,
                                  sampler=optuna.samplers.RandomSampler())  # the report asks for no trial
    except KeyError:  # the journal exists, the study is not in it yet
        return None
    frozen = study.get_trials(deepcopy=False)
    space = {key: json_to_distribution(d) for key, d in study.user_attrs.get("space", {}).items()}
    for t in frozen:  # a study made before the space was recorded: the trials' own distributions
        for key, d in t.distributions.items():
            space.setdefault(key, d)
    direction = study.direction.name.lower()
    trials = [_trial(t, sweep_dir) for t in frozen]
    multirun = _multirun(sweep_dir)
    n_trials = OmegaConf.select(multirun, "search.n_trials") if multirun is not None else None
    return Search(objective=study.user_attrs.get("objective", "objective"), direction=direction,
                  n_trials=n_trials if isinstance(n_trials, int) else None, space=space,
                  trials=report_order(trials, direction))


def report_order(trials: list[Trial], direction: str) -> list[Trial]:
    """Complete trials best first (ties by number), then pruned, failed, running and waiting ones
    by number: those have no objective to rank by."""
    sign = 1 if direction == "minimize" else -1
    complete = sorted((t for t in trials if t.state == "complete"), key=lambda t: (sign * t.value, t.number))
    return complete + sorted((t for t in trials if t.state != "complete"), key=lambda t: t.number)


def _trial(frozen, sweep_dir: Path) -> Trial:
    state = STATES.get(frozen.state.name, frozen.state.name.lower())
    trial = Trial(number=frozen.number, state=state, params=dict(frozen.params),
                  value=frozen.value if state == "complete" else None,
                  run_dir=sweep_dir / trial_dir_name(frozen.number))
    _add_run(trial)
    if trial.wall_s is None and state == "running" and frozen.datetime_start is not None:
        start = frozen.datetime_start
        now = datetime.now(start.tzinfo) if start.tzinfo is not None else datetime.now()
        trial.wall_s = (now - start).total_seconds()
    return trial


def _add_run(trial: Trial) -> None:
    """What the trial's run dir says it ran, and where it would have ended unpruned (its budget)."""
    run_dir = trial.run_dir
    record = read_json(run_dir / "provenance.json", RUN_FIX, missing_ok=True) or {}
    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl", RUN_FIX) if isinstance(r.get("step"), int)]
    last = max(logged, key=lambda r: r["step"], default=None)
    if last is not None:
        trial.steps, trial.tokens, trial.flops = last["step"], last.get("tokens"), last.get("flops")
    counted = [r for r in logged if r.get("tokens") and r.get("flops") is not None]
    if counted:  # the model's FLOPs per token (6N + 12 L C T), as the run counted them
        trial.flops_per_token = counted[-1]["flops"] / counted[-1]["tokens"]
    trial.wall_s = record.get("wall_seconds")
    trial.threads = (record.get("machine") or {}).get("torch_threads")
    config_file = run_dir / "config.resolved.yaml"
    if not config_file.is_file():
        return
    config = read_yaml(config_file, RUN_FIX)
    trial.tokens_per_step = tokens_per_step(config, record)
    if trial.tokens_per_step and (config.get("max_flops") is None or trial.flops_per_token is not None):
        trial.planned_steps = budgets.resolve(config, trial.tokens_per_step, trial.flops_per_token or 0.0).max_steps


def _multirun(sweep_dir: Path):
    path = sweep_dir / "multirun.yaml"
    return read_yaml(path, RUN_FIX) if path.is_file() else None


# --- what the report prints ---

def section(search: Search) -> str:
    """The trials table, the best trial and the command that trains it again, and what pruning
    saved, as Markdown."""
    parts = [f"Trials of the search ({search.objective}, {search.direction}; complete trials best first, "
             f"then the others by number; steps: run of planned):\n\n" + markdown(search)]
    best = search.best
    if best is not None:
        params = " ".join(override(k, best.params[k]) for k in _keys(search) if k in best.params)
        parts.append(f"best: trial {best.number}, {search.objective} {_value(best.value, search.objective)}: "
                     f"{params}\nreproduce it: {reproduce_command(best)}\n")
    else:
        parts.append("best: none yet (no trial is complete)\n")
    parts.append(pruning_saved(search) + "\n")
    return "\n".join(parts)


def markdown(search: Search) -> str:
    keys = _keys(search)
    columns = ["trial", "state", search.objective, *keys, "steps", "saved steps", "wall s", "tokens"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for t in search.trials:
        cells = [str(t.number), t.state, _value(t.value, search.objective),
                 *(_param(t.params.get(k)) for k in keys),
                 "-" if t.steps is None else f"{t.steps} of {t.planned_steps if t.planned_steps is not None else '?'}",
                 "-" if t.saved_steps is None else str(t.saved_steps),
                 "-" if t.wall_s is None else f"{t.wall_s:.1f}", "-" if t.tokens is None else f"{t.tokens:,}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(search: Search) -> tuple[list[dict], tuple[str, ...]]:
    """The table as CSV rows (full precision), and its columns."""
    keys = _keys(search)
    rows = [{"trial": t.number, "state": t.state, "value": t.value, **{k: t.params.get(k) for k in keys},
             "steps": t.steps, "planned_steps": t.planned_steps, "saved_steps": t.saved_steps, "wall_s": t.wall_s,
             "tokens": t.tokens, "flops": t.flops, "run_dir": str(t.run_dir)} for t in search.trials]
    return rows, (*CSV_COLUMNS[:3], *keys, *CSV_COLUMNS[3:])


def reproduce_command(trial: Trial) -> str:
    """The command that trains the trial again, in a fresh run dir, with its config (reproduce=) and
    the thread count it trained with: on a CPU another count sums in another order, and the losses
    part in their last digits (a search's worker sets OMP_NUM_THREADS for its trials)."""
    command = f"nanogpt-train reproduce={shlex.quote(str(trial.run_dir))}"
    return f"OMP_NUM_THREADS={trial.threads} {command}" if isinstance(trial.threads, int) else command


def pruning_saved(search: Search) -> str:
    """One line: the steps the pruned trials did not run (each: its planned end minus the step it
    stopped at), in tokens and FLOPs too, each as a share of what all trials would have run without
    pruning (what they ran plus what was saved)."""
    pruned = [t for t in search.trials if t.state == "pruned"]
    if not pruned:
        return "pruning saved nothing: no trial was pruned"
    known = [t for t in pruned if t.saved_steps is not None]
    ran = [t for t in search.trials if t.steps is not None]
    amounts = []
    for what, saved, spent, fmt in (("steps", [t.saved_steps for t in known], [t.steps for t in ran], "{:,.0f}"),
                                    ("tokens", [t.saved_tokens for t in known], [t.tokens for t in ran], "{:,.0f}"),
                                    ("FLOPs", [t.saved_flops for t in known], [t.flops for t in ran], "{:.3g}")):
        if not known or None in saved:  # a run from before metrics counted tokens and FLOPs
            continue
        total = sum(saved)
        without = None if None in spent else total + sum(spent)
        share = f" ({100 * total / without:.0f}% of {fmt.format(without)})" if without else ""
        amounts.append(f"{fmt.format(total)} {what}{share}")
    line = (f"pruning saved {', '.join(amounts) or 'an unknown amount'}: {len(known)} pruned "
            f"trial{'s' * (len(known) != 1)} stopped before their planned ends (shares: of what the {len(ran)} "
            f"trials would have run without pruning)")
    unknown = [t for t in pruned if t.saved_steps is None]
    if unknown:
        line += (f"; not counted: trial{'s' * (len(unknown) != 1)} {', '.join(str(t.number) for t in unknown)}, "
                 f"whose planned end is set by time (max_time) or not recorded")
    running = sum(t.state == "running" for t in search.trials)
    return line + (f"; {running} trial{'s' * (running != 1)} still running" if running else "")


def _keys(search: Search) -> list[str]:
    keys = list(search.space)
    return keys + sorted({k for t in search.trials for k in t.params} - set(keys))


def _value(value: float | None, objective: str) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if objective.endswith("val_loss") else f"{value:.4g}"


def _param(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
