"""nanogpt-report: the tables and plots of a sweep, also while it is still running.

    nanogpt-report multirun/2026-11-22/10-00-00            # tables on stdout; report*.{csv,md,png} in the dir
    nanogpt-report multirun/2026-11-22/10-00-00 --sort final_val_loss
    nanogpt-report multirun/2026-11-22/10-00-00 --baseline optim.lr=1e-3   # differences, Welch's p-values
    nanogpt-report multirun/2026-11-22/10-00-00 --target 1.8               # time to a val loss, from the evals

Every run dir under the given dir (a sweep's job dirs, or any dir of run dirs) is one row: the
command-line overrides that differ between runs (those all runs share are printed once), status, best and final val loss, tokens/s, wall time, restarts,
what ended the run (max_iters, a budget or the target) and micro_batch (sequences per micro-step x micro-steps per optimizer step: what batch_size=auto chose),
and, when some run ran lm-eval tasks during training (eval_tasks), a column eval/TASK/METRIC per score with its newest value, read
from what the run wrote (`.hydra/overrides.yaml`, `provenance.json`, `metrics.jsonl`). Rows are
sorted by the metric, runs without it last.

Runs that differ only by `seed` form a group: per group, n finished runs and the mean, std and 95%
Student t interval of their final and best val loss, tokens/s and wall time; with --baseline, each
group's difference to the baseline group's mean final val loss and Welch's t-test p-value
(sweeps/stats.py). Then the groups at equal cost: the val loss each group had at the smallest
number of tokens, FLOPs and seconds of training that all runs reached, the time to the target
val loss, and the Pareto front of final val loss against cost (sweeps/curves.py). The plots
(sweeps/plots.py): val loss against step for every run and, for a sweep over one parameter, the
final val loss against it (mean and interval over seeds); val loss against training time and
FLOPs (mean and interval per group) and the Pareto front.

A search's sweep dir (nanogpt-train --multirun search=NAME: its study.journal, or the database in
search.storage) gets its trials first (sweeps/trials.py): read from the study (state, params,
objective) with each trial's run dir (steps, wall time, tokens), best first, as report_trials.csv
too; the best trial and the command that trains it again; what pruning saved; and the plots of
the optimisation history (report_history.png) and of the objective against each searched key
(report_params.png). Without Optuna installed, one line says so and the run-dir tables still print.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from nanogpt.errors import UserError
from nanogpt.runs.runfiles import RunFileError, read_json, read_jsonl, read_yaml
from nanogpt.sweeps import plots, trials
from nanogpt.sweeps.curves import AXES, AXIS_NAMES, RunCurve, equal_budgets, final_spend, pareto_front, \
    points_from, time_to_target, tokens_per_step
from nanogpt.sweeps.stats import SIGNIFICANCE, Summary, significant, summarise, welch_p

# a run file that cannot be read: the report goes on without what it would add
REPORT_FIX = "restore it from a copy of the run, or move it aside (the report then goes without it)"

COLUMNS = ("job", "overrides", "status", "best_val_loss", "final_val_loss", "step", "tokens_per_s", "wall_s", "restarts",
           "ended_by", "micro_batch")


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run dirs under sweep_dir: those with a provenance.json or a Hydra snapshot."""
    runs = {p.parent for p in sweep_dir.rglob("provenance.json")}
    runs |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(runs, key=lambda p: [int(part) if part.isdigit() else part for part in p.relative_to(sweep_dir).parts])


def read_run(run_dir: Path, sweep_dir: Path) -> dict:
    """One row of the table, the run's val curve (under "curve") and its evals against cost (under "run_curve")."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in read_yaml(overrides_file, REPORT_FIX, kind="list")] if overrides_file.is_file() else []
    record = read_json(run_dir / "provenance.json", REPORT_FIX, missing_ok=True) or {}
    evals, trains = read_metrics(run_dir)
    status = record.get("status", "not started")
    if status == "running" and (run_dir / "DONE").exists():
        status = "done"
    speeds = [t["tokens_per_s"] for t in trains if "tokens_per_s" in t]
    config_file = run_dir / "config.resolved.yaml"  # written at the start, beside provenance.json
    config = read_yaml(config_file, REPORT_FIX) if config_file.is_file() else None
    points = points_from(evals, tokens_per_step(config, record) if config is not None else None)
    target = record.get("target")
    return {
        "job": str(run_dir.relative_to(sweep_dir)) or ".",
        "overrides": " ".join(overrides),
        "status": status,
        "best_val_loss": min((e["val_loss"] for e in evals), default=None),
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "step": max((e["step"] for e in evals + trains), default=0),
        "tokens_per_s": round(statistics.median(speeds)) if speeds else None,
        "wall_s": record.get("wall_seconds"),
        "restarts": len(record.get("resumes", [])),
        "ended_by": record.get("ended_by"),  # max_iters, a budget (max_tokens, ...), or target; None until it ends
        "micro_batch": _micro_batch([record, *record.get("resumes", [])]),
        "tasks": task_scores(evals),
        "curve": [(e["step"], e["val_loss"]) for e in evals],
        "override_values": dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith(("hydra.", "+", "~"))),
        # for the comparisons at equal cost: a failed run stops short, and would set every budget
        "run_curve": RunCurve(f"job {run_dir.relative_to(sweep_dir)}", points, live=status != "failed",
                              target=target if isinstance(target, dict) else None,
                              target_val_loss=config.get("target_val_loss") if config is not None else None),
    }


def task_scores(evals: list[dict]) -> dict[str, float]:
    """The newest value of each lm-eval metric the run's evaluations logged (eval_tasks: keys
    TASK/METRIC beside the val loss), as report columns eval/TASK/METRIC."""
    found = {}
    for record in evals:
        found.update({f"eval/{k}": v for k, v in record.items() if "/" in k and _is_number(v)})
    return found


def task_columns(rows: list[dict]) -> tuple[str, ...]:
    """The lm-eval columns any run has, sorted: the table grows by them only when some run logged them."""
    return tuple(sorted({key for row in rows for key in row["tasks"]}))


def _micro_batch(starts: list[dict]) -> str | None:
    """Sequences per micro-step x micro-steps per optimizer step, as the newest start that ended ran
    them (what batch_size=auto chose); None until one has ended."""
    for start in reversed(starts):
        if isinstance(start.get("batch_size"), int) and isinstance(start.get("grad_accum"), int):
            return f"{start['batch_size']} x {start['grad_accum']}"
    return None


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """A run's metrics.jsonl records: (eval records, train records), in the order written. A line
    cut short by a kill (or being written) is left out; any other damage is named."""
    evals, trains = [], []
    path = run_dir / "metrics.jsonl"
    for entry in read_jsonl(path, REPORT_FIX):
        if not isinstance(entry.get("step"), int) or (entry.get("kind") == "eval" and not _is_number(entry.get("val_loss"))):
            raise RunFileError(f"{path} holds a record without a step or val loss ({json.dumps(entry)[:80]}): "
                               f"{REPORT_FIX}")
        (evals if entry.get("kind") == "eval" else trains).append(entry)
    return evals, trains


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sort_rows(rows: list[dict], metric: str) -> list[dict]:
    """Best first (lowest loss, highest tokens/s); runs without the metric last."""
    sign = -1 if metric == "tokens_per_s" else 1
    return sorted(rows, key=lambda r: (r[metric] is None, sign * r[metric] if r[metric] is not None else 0.0))


def markdown(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, row["tasks"].get(c)), c) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def varying_keys(rows: list[dict]) -> list[str]:
    """The overrides whose values differ between runs (what the sweep swept), in command-line order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["override_values"] if k not in keys]
    return [k for k in keys if len({row["override_values"].get(k) for row in rows}) > 1]


def show_swept_overrides(rows: list[dict]) -> list[str]:
    """Make each row's `overrides` the swept ones only; return the overrides all runs share."""
    varying = varying_keys(rows)
    common = [] if not rows else [f"{k}={v}" for k, v in rows[0]["override_values"].items() if k not in varying]
    if len(rows) > 1:
        for row in rows:
            row["overrides"] = " ".join(f"{k}={row['override_values'][k]}" for k in varying if k in row["override_values"])
    return common


def swept_parameter(rows: list[dict]) -> str | None:
    """The one override besides the seed whose value differs between runs, if there is exactly one."""
    varying = [k for k in varying_keys(rows) if k != SEED]
    return varying[0] if len(varying) == 1 and len(rows) > 1 else None


# --- seeds aggregated: one group per setting, the runs that differ only by seed ---

SEED = "seed"  # the override that tells repeats of one setting apart
ALL_RUNS = "all runs"  # the label of the one group of a sweep over seeds only
GROUP_METRICS = ("final_val_loss", "best_val_loss", "tokens_per_s", "wall_s")
GROUP_COLUMNS = ("group", "runs", "n", *(f"{m}_{s}" for m in GROUP_METRICS for s in ("mean", "std", "ci_low", "ci_high")),
                 "diff_vs_baseline", "p_value", "significant")


def group_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """The runs by setting: those whose overrides differ only by seed share a group, labelled by its
    swept overrides besides the seed (ALL_RUNS when only the seed varies)."""
    varying = [k for k in varying_keys(rows) if k != SEED]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        label = " ".join(f"{k}={row['override_values'][k]}" for k in varying if k in row["override_values"])
        groups.setdefault(label or ALL_RUNS, []).append(row)
    return groups


def find_baseline(groups: dict[str, list[dict]], baseline: str) -> str:
    """The group --baseline names: its label as printed, or overrides (key=value ...) that only its
    runs have; a value is matched as a number too (1e-3 is the 0.001 Hydra records)."""
    if baseline in groups:
        return baseline
    wanted = [o.split("=", 1) for o in baseline.split()]
    matches = []
    if wanted and all(len(w) == 2 for w in wanted):
        matches = [label for label, runs in groups.items()
                   if all(k != SEED and _same_value(runs[0]["override_values"].get(k), v) for k, v in wanted)]
    names = ", ".join(f"'{label}'" for label in groups)
    if not matches:
        raise UserError(f"--baseline {baseline} names no group: the groups are {names}; give one of them as printed "
                        f"(e.g. --baseline '{next(iter(groups))}'), or overrides that pick one")
    if len(matches) > 1:
        raise UserError(f"--baseline {baseline} matches {len(matches)} groups ({', '.join(repr(m) for m in matches)}): "
                        "add the overrides that tell them apart, or give one label as printed")
    return matches[0]


def _same_value(have: str | None, want: str) -> bool:
    if have is None:
        return False
    a, b = _number(have), _number(want)
    return a == b if isinstance(a, float) and isinstance(b, float) else have == want


def group_stats(groups: dict[str, list[dict]], baseline: str | None, metric: str) -> list[dict]:
    """One row per group: over its finished runs (a final val loss is final only there), the Summary
    of each metric; with a baseline, the difference of the mean final val loss to the baseline's and
    Welch's p-value. Best first by the metric's mean, groups without it last."""
    def finished(runs: list[dict], m: str) -> list[float]:
        return [r[m] for r in runs if r["status"] == "done" and r[m] is not None]

    base = finished(groups[baseline], "final_val_loss") if baseline is not None else []
    table = []
    for label, runs in groups.items():
        row = {"group": label, "runs": len(runs), "n": sum(r["status"] == "done" for r in runs)}
        row.update({m: summarise(finished(runs, m)) for m in GROUP_METRICS})
        finals, diff, p = finished(runs, "final_val_loss"), None, None
        if baseline is not None and finals and base:
            diff = row["final_val_loss"].mean - summarise(base).mean
            p = None if label == baseline else welch_p(finals, base)
        row.update(diff_vs_baseline=diff, p_value=p, significant=significant(p), baseline=label == baseline)
        table.append(row)
    sign = -1 if metric == "tokens_per_s" else 1
    return sorted(table, key=lambda r: (r[metric].mean is None, sign * (r[metric].mean or 0.0)))


def groups_markdown(table: list[dict], with_baseline: bool) -> str:
    columns = ["group", "runs", "n", "final val loss", "std", "95% CI", "best val loss", "std", "95% CI", "tokens/s",
               "wall s"] + (["Δ final vs baseline", "p (Welch)"] if with_baseline else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [_escape(row["group"]), str(row["runs"]), str(row["n"])]
        for m in ("final_val_loss", "best_val_loss"):
            s = row[m]
            cells += [_fmt(s.mean), _fmt(s.std, s.n), _interval(s)]
        cells += [_fmt(row["tokens_per_s"].mean, digits=0) + _spread(row["tokens_per_s"], 0),
                  _fmt(row["wall_s"].mean, digits=1) + _spread(row["wall_s"], 1)]
        if with_baseline:
            if row["baseline"]:
                cells += ["baseline", "-"]
            else:
                cells += [_fmt(row["diff_vs_baseline"], signed=True), _p_cell(row["p_value"], row["final_val_loss"].n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _p_cell(p: float | None, n: int) -> str:
    if p is None:
        return "-" if n == 0 else "n/a"
    return (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}") + (" ns" if p >= SIGNIFICANCE else "")


def _fmt(value: float | None, n: int = 2, digits: int = 4, signed: bool = False) -> str:
    """A number; "-" where there is none, "n/a" where one run cannot give it (a std of one value)."""
    if value is None:
        return "n/a" if n == 1 else "-"
    return f"{value:+.{digits}f}" if signed else f"{value:,.{digits}f}" if digits == 0 else f"{value:.{digits}f}"


def _interval(s: Summary) -> str:
    return "-" if s.n == 0 else "n/a" if s.ci_low is None else f"[{s.ci_low:.4f}, {s.ci_high:.4f}]"


def _spread(s: Summary, digits: int) -> str:
    return f" ± {s.std:,.{digits}f}" if s.std is not None else ""


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def groups_csv_rows(table: list[dict]) -> list[dict]:
    rows = []
    for row in table:
        out = {"group": row["group"], "runs": row["runs"], "n": row["n"], "diff_vs_baseline": row["diff_vs_baseline"],
               "p_value": row["p_value"], "significant": row["significant"]}
        for m in GROUP_METRICS:
            s = row[m]
            out.update({f"{m}_mean": s.mean, f"{m}_std": s.std, f"{m}_ci_low": s.ci_low, f"{m}_ci_high": s.ci_high})
        rows.append(out)
    return rows


# --- at equal cost: val loss at equal budgets, time to target, the Pareto front ---

BUDGET_COLUMNS = ("group", "measure", "at", "n", "mean", "std", "ci_low", "ci_high")
COSTS = ("flops", "train_seconds")  # what the Pareto front weighs the final val loss against


def budget_section(groups: dict[str, list[RunCurve]], finished: dict[str, list[RunCurve]],
                   target: float | None = None) -> tuple[str, list[dict]]:
    """The comparison at equal cost, as Markdown and as long-form CSV rows (group, measure, at, n,
    mean, std, interval): each group's val loss at the smallest tokens, FLOPs and training time all
    its runs and the others' reached (`groups`: every run, also those still going); the final spend
    of the finished runs (`finished`) and whether the group is on the Pareto front of final val
    loss against it; and the time to the target val loss (target, else each run's target_val_loss).
    Empty when there is nothing to compare."""
    budgets = equal_budgets(groups)
    ends = {label: final_spend(runs) for label, runs in finished.items()}
    fronts = {cost: pareto_front({label: (e[cost].mean, e["val_loss"].mean) for label, e in ends.items()
                                  if e[cost].mean is not None and e["val_loss"].mean is not None})
              for cost in COSTS}
    costs = [c for c in COSTS if any(e[c].n for e in ends.values())]
    rows: list[dict] = []
    text = []
    if len(groups) > 1 and (budgets or costs):  # one group has nothing to be compared with
        counted = {label: sum(r.live and len(r.points) > 1 for r in runs) for label, runs in groups.items()}
        columns = ["group", "runs"] + [f"val loss at {_amount(b.value, b.axis)} {AXIS_NAMES[b.axis]}" for b in budgets] \
            + [f"{AXIS_NAMES[c]} (final)" for c in costs] + (["Pareto front"] if costs else [])
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for label in groups:
            cells = [_escape(label), str(counted[label])]
            cells += [_mean_ci(b.losses[label], counted[label]) for b in budgets]
            cells += [_mean_ci(ends[label][c], len(finished[label]), c) if label in ends else "-" for c in costs]
            if costs:
                cells.append(", ".join(AXIS_NAMES[c] for c in costs if label in fronts[c]) or "-")
            lines.append("| " + " | ".join(cells) + " |")
            rows += [_csv_row(label, f"val_loss_at_{b.axis}", b.value, b.losses[label]) for b in budgets]
            rows += [_csv_row(label, f"final_{c}", None, ends[label][c]) for c in costs if label in ends]
        text.append("\n".join(lines) + "\n")
        notes = [f"{_amount(b.value, b.axis)} {AXIS_NAMES[b.axis]}, as far as {b.limited_by} got" for b in budgets]
        text.append("At equal cost: each group's val loss (mean ± half the 95% interval over its runs) at the least "
                    "that any run reached, linear between the evals around it: " + "; ".join(notes) + ". Runs: those "
                    "past their first eval and not failed. Final: the finished runs' last eval; the Pareto front "
                    "holds the groups no other beats on both final val loss and that cost.\n")
    reached = time_to_target(groups, target)
    if reached:
        targets = sorted({target} if target is not None else {r.target_val_loss for rs in groups.values() for r in rs
                                                               if r.target_val_loss is not None})
        columns = ["group", "reached", "step", *(AXIS_NAMES[a] for a in AXES)]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for label, t in reached.items():
            cells = [_escape(label), f"{t.reached} of {t.runs}"]
            cells += [_mean_ci(t.spend[key], t.reached, key) for key in ("step", *AXES)]
            lines.append("| " + " | ".join(cells) + " |")
            rows += [_csv_row(label, f"target_{key}", targets[0] if len(targets) == 1 else None, t.spend[key])
                     for key in ("step", *AXES)]
        text.append(f"Time to target val loss {', '.join(f'{t:g}' for t in targets)}:\n\n" + "\n".join(lines) + "\n")
        text.append("The first eval at or below the target, over the runs that reached it (mean ± half the 95% "
                    "interval); a run that has not reached it yet counts in `of` only.\n")
    return "\n".join(text), rows


def _mean_ci(s: Summary, runs: int, key: str = "val_loss") -> str:
    if s.n == 0:
        return "-"
    cell = f"{_amount(s.mean, key)} ± {_amount(s.half_width, key) if s.half_width is not None else 'n/a'}"
    return cell + (f" ({s.n} of {runs})" if s.n != runs else "")


def _amount(value: float, key: str) -> str:
    """A spend or loss as the report prints it: tokens and steps whole, FLOPs in 3 figures, seconds to 0.1."""
    if key in ("tokens", "step"):
        return f"{value:,.0f}"
    if key == "flops":
        return f"{value:.3g}"
    if key == "train_seconds":
        return f"{value:.1f}"
    return f"{value:.4f}"


def _csv_row(group: str, measure: str, at: float | None, s: Summary) -> dict:
    return {"group": group, "measure": measure, "at": at, "n": s.n, "mean": s.mean, "std": s.std, "ci_low": s.ci_low,
            "ci_high": s.ci_high}


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _cell(value, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if column == "wall_s" else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def resume_command(sweep_dir: Path) -> str | None:
    """The command that finishes the sweep: its own, from Hydra's multirun.yaml, pinned to its dir
    (finished jobs are skipped, the others continue from their checkpoints)."""
    import shlex

    from omegaconf import OmegaConf

    if not (sweep_dir / "multirun.yaml").is_file():
        return None
    multirun = read_yaml(sweep_dir / "multirun.yaml", REPORT_FIX)
    overrides = OmegaConf.select(multirun, "hydra.overrides")
    if overrides is None:
        raise RunFileError(f"{sweep_dir / 'multirun.yaml'} holds no hydra.overrides: {REPORT_FIX}")
    kept = [o for o in [*overrides.hydra, *overrides.task] if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    return " ".join(["nanogpt-train", "--multirun", *map(shlex.quote, kept), f"hydra.sweep.dir={shlex.quote(str(sweep_dir))}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nanogpt-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep dir (multirun/DATE/TIME) or any dir of run dirs")
    parser.add_argument("--sort", default="best_val_loss", choices=("best_val_loss", "final_val_loss", "tokens_per_s"),
                        help="the column to sort by (default: best_val_loss)")
    parser.add_argument("--baseline", metavar="GROUP",
                        help="the group to compare the others with: its label as printed, or its overrides "
                             "(e.g. optim.lr=1e-3): differences in mean final val loss and Welch's t-test p-values")
    parser.add_argument("--target", type=float, metavar="LOSS",
                        help="time to this val loss, read from every run's evals (default: each run's target_val_loss)")
    args = parser.parse_args(argv)
    try:
        if not args.sweep_dir.is_dir():
            raise UserError(f"{args.sweep_dir} is not a dir: give a sweep dir such as multirun/DATE/TIME")
        if args.target is not None and not args.target > 0:
            raise UserError(f"--target {args.target}: give a positive val loss, e.g. --target 1.8")
        runs = find_runs(args.sweep_dir)
        if not runs:
            raise UserError(f"{args.sweep_dir} holds no run dirs (none has a provenance.json or .hydra/): is it a sweep dir?")
        rows = [read_run(run, args.sweep_dir) for run in runs]
        is_search = trials.holds_study(args.sweep_dir)
        search, search_note = None, None
        if is_search:  # the trials from the study (Optuna's word on states and objectives) with their run dirs
            try:
                search = trials.read(args.sweep_dir)
            except trials.OptunaMissing as e:  # the run-dir tables need no Optuna: they still print
                search_note = str(e)
            if search is None and search_note is None:
                search_note = "the search's study holds no trials yet"
        groups = group_runs(rows)  # in the sweep's order, as its jobs were numbered
        rows = sort_rows(rows, args.sort)
        baseline = find_baseline(groups, args.baseline) if args.baseline is not None else None  # before any file is written
        common = show_swept_overrides(rows)
        columns = COLUMNS + task_columns(rows)  # eval/TASK/METRIC of the runs that ran eval_tasks
        table = markdown(rows, columns)
        seeded = baseline is not None or any(len(runs) > 1 for runs in groups.values())
        stats = group_stats(groups, baseline, args.sort)
        curves = {label: [r["run_curve"] for r in runs] for label, runs in groups.items()}
        finished = {label: [r["run_curve"] for r in runs if r["status"] == "done"] for label, runs in groups.items()}
        budgets, budget_rows = budget_section(curves, finished, args.target)
        sections = [table] if search is None else [trials.section(search), "Their run dirs:\n\n" + table]
        if seeded:
            sections.append(f"Runs that differ only by {SEED}, per setting ({group_note(baseline)}):\n\n"
                            + groups_markdown(stats, baseline is not None))
        if budgets:
            sections.append(budgets)
        text = "\n".join(sections)
        (args.sweep_dir / "report.md").write_text(text)
        write_csv([{**row, **row["tasks"]} for row in rows], args.sweep_dir / "report.csv", columns)
        write_csv(groups_csv_rows(stats), args.sweep_dir / "report_groups.csv", GROUP_COLUMNS)
        written = ["report.md", "report.csv", "report_groups.csv", "report.png"]
        if budget_rows:
            write_csv(budget_rows, args.sweep_dir / "report_budgets.csv", BUDGET_COLUMNS)
            written.insert(3, "report_budgets.csv")
        swept = swept_parameter(rows)
        values = {label: _number(runs[0]["override_values"].get(swept, "?")) for label, runs in groups.items()}
        plots.sweep(rows, groups, stats, {"name": swept, "values": values} if swept else None,
                    args.sweep_dir / "report.png", "final_val_loss")
        if plots.budgets(curves, finished, args.sweep_dir / "report_budgets.png"):
            written.append("report_budgets.png")
        if search is not None:
            trial_rows, trial_columns = trials.csv_rows(search)
            write_csv(trial_rows, args.sweep_dir / "report_trials.csv", trial_columns)
            written.append("report_trials.csv")
            written += [name for name, plot in (("report_history.png", plots.search_history),
                                                ("report_params.png", plots.search_params))
                        if plot(search, args.sweep_dir / name)]
        if is_search:  # pruned and failed trials are ended, not unfinished: the study says whether more are due
            unfinished = [] if search is None or search.n_trials is None or search.finished >= search.n_trials else \
                [f"{search.finished} of {search.n_trials} trials finished"]
        else:
            unfinished = [row["job"] for row in rows if row["status"] != "done"]
        command = resume_command(args.sweep_dir) if unfinished else None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text, end="")
    if common:
        print(f"\nevery run: {' '.join(common)}")
    if search_note:
        print(f"\n{search_note}")
    if not seeded and not is_search:  # a search's trials each try other values: seeds are another question
        print(f"\neach setting ran once: add {SEED}=1,2,3 to the sweep for means, intervals and p-values over seeds")
    print(f"\n{len(rows)} runs in {len(groups)} groups; written: {args.sweep_dir / written[0]}, {', '.join(written[1:])}")
    if command:
        what = "to continue the search" if is_search else "to finish the sweep"
        print(f"not done: {', '.join(unfinished)}; {what}: {command}")


def group_note(baseline: str | None) -> str:
    note = "n: the finished runs, whose final val loss is final; mean, sample std and 95% Student t interval over them"
    if baseline is not None:
        note += (f"; Δ and p: the difference to the mean final val loss of '{baseline}', and the p-value of Welch's "
                 f"t-test; ns: p >= {SIGNIFICANCE}, not significant (the difference may be noise)")
    return note + "; n/a: one run has no spread"


if __name__ == "__main__":
    main()
