"""The report's figures: what a sweep did (report.png), its groups at equal cost (report_budgets.png),
and a search's trials (report_history.png, report_params.png).

Each group has one colour in every panel: its runs are thin lines or dots, its mean a thick line
with the 95% interval over its runs as a band (none for a group of one run). matplotlib is loaded
only here, inside the functions, and draws to files only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from nanogpt.sweeps.curves import AXIS_NAMES, RunCurve, comparable, final_spend, pareto_front, reached, value_at
from nanogpt.sweeps.stats import summarise

if TYPE_CHECKING:
    from nanogpt.sweeps.trials import Search

CURVE_AXES = ("train_seconds", "flops")  # val loss against these: the costs that differ between settings
GRID = 50  # points of a group's mean curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def sweep(rows: list[dict], groups: dict[str, list[dict]], stats: list[dict], swept: dict | None, path: Path,
          metric: str) -> None:
    """Val loss vs step for every run; beside it, for a sweep over one parameter (seeds aside), the
    metric of every finished run against the parameter, with each setting's mean and 95% interval.
    swept: the parameter's name and each group's value of it (a number where it is one)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if swept else 1, figsize=(12 if swept else 7, 4.5), squeeze=False)
    curves = axes[0][0]
    colour = {label: f"C{i % 10}" for i, label in enumerate(groups)}
    for label, runs in groups.items():
        for j, row in enumerate(r for r in runs if r["curve"]):
            steps, losses = zip(*row["curve"])
            curves.plot(steps, losses, marker=".", color=colour[label], alpha=0.8,
                        label=(label if len(runs) > 1 else row["overrides"] or row["job"]) if j == 0 else None)
    curves.set(xlabel="step", ylabel="val loss", title="val loss of every run")
    curves.grid(alpha=0.3)
    if any(row["curve"] for row in rows):
        curves.legend(fontsize="small")
    if swept:
        _against_parameter(axes[0][1], groups, stats, swept["name"], swept["values"], metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _against_parameter(ax, groups: dict[str, list[dict]], stats: list[dict], swept: str, values: dict,
                       metric: str) -> None:
    numeric = all(isinstance(v, float) for v in values.values())
    order = sorted(values, key=lambda label: values[label]) if numeric else list(values)
    x = {label: values[label] if numeric else i for i, label in enumerate(order)}
    for label in order:  # every finished run, the seeds of a setting stacked above its value
        ys = [r[metric] for r in groups[label] if r["status"] == "done" and r[metric] is not None]
        ax.plot([x[label]] * len(ys), ys, "o", color="grey", alpha=0.4, markersize=4)
    summary = {row["group"]: row[metric] for row in stats}
    shown = [label for label in order if summary[label].mean is not None]
    xs = [x[label] for label in shown]
    if not numeric:  # categories: nothing lies between two of them, so bars, not a line and band
        ax.errorbar(xs, [summary[label].mean for label in shown], fmt="o", color="C0", capsize=4,
                    yerr=[[_or(summary[label].half_width, 0.0) for label in shown]] * 2,
                    label="mean over seeds, 95% interval (Student t)")
    else:
        ax.plot(xs, [summary[label].mean for label in shown], marker="o", color="C0", label="mean over seeds")
    if numeric and any(summary[label].ci_low is not None for label in shown):
        ax.fill_between(xs, [_or(summary[label].ci_low, summary[label].mean) for label in shown],
                        [_or(summary[label].ci_high, summary[label].mean) for label in shown],
                        color="C0", alpha=0.2, label="95% interval (Student t)")
    if numeric and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")  # learning rates and the like span decades
    if not numeric:
        ax.set_xticks(range(len(order)), [str(values[label]) for label in order])
        ax.set_xlim(-0.5, len(order) - 0.5)
    name = metric.replace("_", " ")
    ax.set(xlabel=swept, ylabel=name, title=f"{name} vs {swept}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def budgets(groups: dict[str, list[RunCurve]], finished: dict[str, list[RunCurve]], path: Path) -> bool:
    """Val loss against training time and against FLOPs (each run thin, each group's mean and 95%
    interval over the range all its runs reached), and the Pareto front of the finished runs' final
    val loss against each. False (and no file) when no run logged either cost."""
    axes_logged = [a for a in CURVE_AXES if any(reached(r, a) for runs in groups.values() for r in runs)]
    costs = [a for a in CURVE_AXES if any(r.points and r.points[-1].get(a) is not None
                                          for runs in finished.values() for r in runs)]
    panels = [("curve", a) for a in axes_logged] + [("pareto", a) for a in costs]
    if not panels:
        return False
    plt = _pyplot()
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.5 * rows), squeeze=False)
    colour = {label: f"C{i % 10}" for i, label in enumerate(groups)}
    for ax, (kind, axis) in zip(axes.flat, panels):
        if kind == "curve":
            _curves(ax, groups, axis, colour)
        else:
            _pareto(ax, finished, axis, colour)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _curves(ax, groups: dict[str, list[RunCurve]], axis: str, colour: dict[str, str]) -> None:
    import numpy as np

    later = []  # the losses after each run's first eval: the untrained model's would squash the rest
    for label, runs in groups.items():
        for run in runs:
            known = [(p[axis], p["val_loss"]) for p in run.points if p.get(axis) is not None]
            if known:
                ax.plot(*zip(*known), color=colour[label], alpha=0.3, linewidth=0.8,
                        linestyle="-" if run.live else ":")
                later += [loss for _, loss in known[1:]]
        shared = [r for r in comparable({label: runs})[label] if reached(r, axis)]
        if not shared:
            continue
        low = max(next(p[axis] for p in r.points if p.get(axis) is not None) for r in shared)
        high = min(reached(r, axis) for r in shared)
        if high <= low:
            continue
        grid = np.linspace(low, high, GRID)
        at = [summarise([value_at(r.points, axis, x) for r in shared]) for x in grid]
        ax.plot(grid, [s.mean for s in at], color=colour[label], linewidth=2, label=f"{label} (n={len(shared)})")
        if len(shared) > 1:
            ax.fill_between(grid, [_or(s.ci_low, s.mean) for s in at], [_or(s.ci_high, s.mean) for s in at],
                            color=colour[label], alpha=0.2)
    if later:
        top = max(later) + 0.05 * (max(later) - min(later) or 1.0)
        ax.set_ylim(min(later) - 0.05 * (top - min(later)), top)
    ax.set(xlabel=AXIS_NAMES[axis], ylabel="val loss", title=f"val loss against {AXIS_NAMES[axis]}: mean and 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _pareto(ax, finished: dict[str, list[RunCurve]], axis: str, colour: dict[str, str]) -> None:
    means = {}
    for label, runs in finished.items():
        runs = [r for r in runs if r.points and r.points[-1].get(axis) is not None]
        if not runs:
            continue
        ax.plot([r.points[-1][axis] for r in runs], [r.points[-1]["val_loss"] for r in runs], "o", color=colour[label],
                alpha=0.3, markersize=4)
        end = final_spend(runs)
        cost, loss = end[axis], end["val_loss"]
        means[label] = (cost.mean, loss.mean)
        ax.errorbar(cost.mean, loss.mean, xerr=cost.half_width, yerr=loss.half_width, fmt="o", color=colour[label],
                    capsize=3, markersize=7, label=f"{label} (n={loss.n})")
    front = pareto_front(means)
    if len(front) > 1:
        ax.plot([means[f][0] for f in front], [means[f][1] for f in front], color="black", linestyle="--",
                linewidth=1, drawstyle="steps-post", label="Pareto front")
    ax.set(xlabel=f"{AXIS_NAMES[axis]} at the end", ylabel="final val loss",
           title=f"final val loss against {AXIS_NAMES[axis]}: runs, mean ± 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


# --- a search's trials (sweeps/trials.py): how the search went, and where its good values lie ---

def search_history(search: "Search", path: Path) -> bool:
    """The optimisation history: each complete trial's objective against its number, the best so
    far as a line, the best trial starred; pruned and failed trials, which have no objective, as
    marks along the bottom. False (and no file) when no trial has a finite objective yet."""
    complete = sorted((t for t in search.trials if t.state == "complete" and math.isfinite(t.value)),
                      key=lambda t: t.number)
    if not complete:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot([t.number for t in complete], [t.value for t in complete], "o", color="C0", label="complete")
    best, so_far = [], None
    for t in complete:
        if so_far is None or (t.value < so_far if search.direction == "minimize" else t.value > so_far):
            so_far = t.value
        best.append(so_far)
    last = max(t.number for t in search.trials)
    ax.plot([t.number for t in complete] + [last], best + best[-1:], color="C1", drawstyle="steps-post",
            label="best so far")
    top = _best_finite(search)
    ax.plot(top.number, top.value, "*", color="C1", markersize=14, label=f"best: trial {top.number}")
    values = [t.value for t in complete]
    pad = 0.1 * (max(values) - min(values) or abs(values[0]) or 1.0)
    ax.set_ylim(min(values) - 2.5 * pad, max(values) + pad)  # a strip below the objectives for the marks
    bottom = ax.get_xaxis_transform()  # x in trial numbers, y in the axes' height
    for state, marker, colour in (("pruned", "x", "C3"), ("failed", "X", "grey")):
        numbers = [t.number for t in search.trials if t.state == state]
        if numbers:
            ax.plot(numbers, [0.05] * len(numbers), marker, color=colour, transform=bottom, clip_on=False,
                    label=f"{state} ({len(numbers)}; no objective)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="trial", ylabel=search.objective,
           title=f"optimisation history: {search.objective} ({search.direction})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def search_params(search: "Search", path: Path) -> bool:
    """The objective of every complete trial against each searched key, one panel each, coloured by
    trial number (later trials darker), the best starred: a log axis for a key searched on a log
    scale, the choices as categories. False (and no file) when no trial has a finite objective yet."""
    from matplotlib.ticker import MaxNLocator, NullFormatter
    from optuna.distributions import CategoricalDistribution

    complete = [t for t in search.trials if t.state == "complete" and math.isfinite(t.value)]
    keys = [k for k in search.space if any(k in t.params for t in complete)]
    if not keys:
        return False
    plt = _pyplot()
    columns = min(len(keys), 3)
    rows = (len(keys) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns + 1, 4 * rows + 0.5), squeeze=False,
                             layout="constrained")
    numbers = [t.number for t in search.trials]
    norm = plt.Normalize(min(numbers), max(max(numbers), min(numbers) + 1))
    for ax, key in zip(axes.flat, keys):
        shown = [t for t in complete if key in t.params]
        distribution = search.space[key]
        if isinstance(distribution, CategoricalDistribution):
            choices = list(distribution.choices)
            x = [choices.index(t.params[key]) for t in shown]
            ax.set_xticks(range(len(choices)), [str(c) for c in choices])
            ax.set_xlim(-0.5, len(choices) - 0.5)
        else:  # the whole searched range, so that one sees where in it the trials fell
            x = [t.params[key] for t in shown]
            if distribution.log:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # under a decade, matplotlib labels every minor tick
                ax.set_xlim(distribution.low / 1.2, distribution.high * 1.2)
            else:
                pad = 0.05 * (distribution.high - distribution.low)
                ax.set_xlim(distribution.low - pad, distribution.high + pad)
        points = ax.scatter(x, [t.value for t in shown], c=[t.number for t in shown], cmap="viridis_r", norm=norm,
                            edgecolors="black", linewidths=0.3)
        best = _best_finite(search)
        if key in best.params:
            at = best.params[key]
            ax.plot(choices.index(at) if isinstance(distribution, CategoricalDistribution) else at, best.value, "*",
                    color="C1", markersize=14, markeredgecolor="black", markeredgewidth=0.5,
                    label=f"best: trial {best.number}")
            ax.legend(fontsize="small")
        ax.set(xlabel=key, ylabel=search.objective, title=f"{search.objective} vs {key}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.colorbar(points, ax=axes.ravel().tolist(), label="trial").locator = MaxNLocator(integer=True)
    fig.suptitle(f"complete trials ({len(complete)} of {len(search.trials)}): {search.objective} against each "
                 f"searched key")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _best_finite(search: "Search"):
    """The best complete trial with a finite objective (an infinite one: a target never reached)."""
    return next(t for t in search.trials if t.state == "complete" and math.isfinite(t.value))
