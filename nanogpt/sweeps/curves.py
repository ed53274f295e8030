"""Val loss against cost: groups of runs compared at equal budgets, time to target, the Pareto front.

A run's curve is its eval records (metrics.jsonl), each with the val loss and what the run had
spent by then: `tokens` (all processes), training `flops`, and `train_seconds` (the optimizer steps
only, over all starts of the run). Two settings are compared fairly at the same spend, not the same
step: each group's val loss at the smallest budget that every one of its runs, and every other
group's, has reached, read off each curve by linear interpolation between the evals around it.

Runs written before these fields existed still compare: their tokens are derived from the step
(tokens per step is fixed by the config); their FLOPs and training time are unknown, and they
leave those columns (n/a).

Used by nanogpt-report (groups of seeds) and nanogpt-compare (groups of repeats).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from nanogpt.sweeps.stats import Summary, summarise

# the costs a run logs, in the order the report shows them
AXES = ("tokens", "flops", "train_seconds")
AXIS_NAMES = {"tokens": "tokens", "flops": "FLOPs", "train_seconds": "s of training"}


@dataclass
class RunCurve:
    """One run, as the comparisons see it."""

    name: str  # the job (report) or experiment/repeat (compare): what a note names
    points: list[dict]  # eval records in order: step, val_loss, tokens, flops, train_seconds (None: not logged)
    live: bool = True  # done or still going; a failed run's curve stops short and would set every budget
    target: dict | None = None  # provenance's record of the first eval that met target_val_loss
    target_val_loss: float | None = None


@dataclass
class Budget:
    """The smallest spend every run reached on one axis, who set it, and each group's val loss there."""

    axis: str
    value: float
    limited_by: str  # the run that reached the least
    losses: dict[str, Summary] = field(default_factory=dict)  # group -> val loss at `value` over its runs


def points_from(evals: list[dict], tokens_per_step: int | None) -> list[dict]:
    """A run's eval records as curve points. A record without `tokens` (a run from before budgets)
    gets step x tokens_per_step; one without flops or train_seconds keeps None there."""
    points = []
    for e in evals:
        tokens = e.get("tokens")
        if tokens is None and tokens_per_step is not None:
            tokens = e["step"] * tokens_per_step
        points.append({"step": e["step"], "val_loss": e["val_loss"], "tokens": tokens, "flops": e.get("flops"),
                       "train_seconds": e.get("train_seconds"), "reached_target": bool(e.get("reached_target"))})
    return points


def tokens_per_step(config, provenance: dict) -> int | None:
    """Tokens of one optimizer step over all processes, from a run's resolved config and its
    provenance (which records the micro-batch and accumulation batch_size=auto chose). None when
    neither says."""
    block = config.get("block_size")
    world = provenance.get("world_size", 1)
    if isinstance(provenance.get("batch_size"), int) and isinstance(provenance.get("grad_accum"), int):
        sequences = provenance["batch_size"] * provenance["grad_accum"] * world
    elif isinstance(config.get("global_batch_size"), int):
        sequences = config.global_batch_size
    elif isinstance(config.get("batch_size"), int):
        sequences = config.batch_size * world
    else:
        return None
    return sequences * block if isinstance(block, int) else None


def value_at(points: list[dict], axis: str, x: float) -> float | None:
    """The val loss at spend x on axis, linear between the two evals around it; None where x lies
    outside what the run measured or the run did not log the axis."""
    known = [(p[axis], p["val_loss"]) for p in points if p.get(axis) is not None]
    if not known or not known[0][0] <= x <= known[-1][0]:
        return None
    xs = [k[0] for k in known]
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return known[i][1]
    (x0, y0), (x1, y1) = known[i - 1], known[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def reached(run: RunCurve, axis: str) -> float | None:
    """How far the run got on axis (its last eval's spend); None if it did not log it."""
    known = [p[axis] for p in run.points if p.get(axis) is not None]
    return known[-1] if known else None


def comparable(groups: dict[str, list[RunCurve]]) -> dict[str, list[RunCurve]]:
    """The runs that set and share the equal budgets: live runs that have trained past their first eval."""
    return {label: [r for r in runs if r.live and len(r.points) > 1] for label, runs in groups.items()}


def equal_budgets(groups: dict[str, list[RunCurve]]) -> list[Budget]:
    """Per axis that the runs logged: the smallest spend all comparable runs reached, and each
    group's val loss there (mean and interval over its runs). Axes no run logged are left out; a
    run that did not log an axis others did is left out of that axis (and named by n)."""
    runs = [r for rs in comparable(groups).values() for r in rs]
    budgets = []
    for axis in AXES:
        ends = [(reached(r, axis), r.name) for r in runs if reached(r, axis)]
        if not ends:
            continue
        value, limited_by = min(ends)
        losses = {label: summarise([value_at(r.points, axis, value) for r in rs])
                  for label, rs in comparable(groups).items()}
        budgets.append(Budget(axis, value, limited_by, losses))
    return budgets


def target_point(run: RunCurve, target: float | None = None) -> dict | None:
    """Where the run first met its target val loss: step, tokens, flops, train_seconds; None if it
    has not. With target given, that loss instead of the run's own target_val_loss, from its evals."""
    if target is None:
        if run.target is not None:
            return run.target
        if run.target_val_loss is None:
            return None
        marked = next((p for p in run.points if p["reached_target"]), None)
        if marked is not None:
            return marked
        target = run.target_val_loss
    return next((p for p in run.points if p["val_loss"] <= target), None)


@dataclass
class TimeToTarget:
    reached: int  # runs that met it
    runs: int  # runs that had a target and began training
    spend: dict[str, Summary]  # axis (and "step") -> over the runs that met it


def time_to_target(groups: dict[str, list[RunCurve]], target: float | None = None) -> dict[str, TimeToTarget]:
    """Per group, how many runs met the target and what they had spent by then (mean, interval).
    Empty when no run has a target (none set, and none given)."""
    out = {}
    for label, runs in groups.items():
        with_target = [r for r in runs if r.points and (target is not None or r.target_val_loss is not None)]
        if not with_target:
            continue
        hits = [p for p in (target_point(r, target) for r in with_target) if p is not None]
        spend = {key: summarise([p.get(key) for p in hits]) for key in ("step", *AXES)}
        out[label] = TimeToTarget(len(hits), len(with_target), spend)
    return out


def final_spend(runs: list[RunCurve]) -> dict[str, Summary]:
    """The val loss and the spend at each run's last eval: mean and interval over the runs."""
    return {key: summarise([r.points[-1].get(key) for r in runs if r.points]) for key in ("val_loss", *AXES)}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The labels whose (cost, loss) no other point beats on both (as cheap or cheaper and lower,
    or cheaper and as low), cheapest first."""
    front = []
    for label, (cost, loss) in sorted(points.items(), key=lambda item: (item[1][0], item[1][1])):
        if not front or loss < points[front[-1]][1]:
            front.append(label)
    return front
