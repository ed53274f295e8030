"""nanogpt-report: one table and one plot of a sweep, also while it is still running.

    nanogpt-report multirun/2026-11-22/10-00-00            # table on stdout; report.{csv,md,png} in the dir
    nanogpt-report multirun/2026-11-22/10-00-00 --sort final_val_loss

Every run dir under the given dir (a sweep's job dirs, or any dir of run dirs) is one row: the
command-line overrides that differ between runs (those all runs share are printed once), status, best and final val loss, tokens/s, wall time, restarts
and micro_batch (sequences per micro-step x micro-steps per optimizer step: what batch_size=auto chose), read
from what the run wrote (`.hydra/overrides.yaml`, `provenance.json`, `metrics.jsonl`). Rows are
sorted by the metric, runs without it last. The plot shows val loss against step for every run,
and for a sweep over one parameter, the final val loss against that parameter.
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

# a run file that cannot be read: the report goes on without what it would add
REPORT_FIX = "restore it from a copy of the run, or move it aside (the report then goes without it)"

COLUMNS = ("job", "overrides", "status", "best_val_loss", "final_val_loss", "step", "tokens_per_s", "wall_s", "restarts",
           "micro_batch")


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run dirs under sweep_dir: those with a provenance.json or a Hydra snapshot."""
    runs = {p.parent for p in sweep_dir.rglob("provenance.json")}
    runs |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(runs, key=lambda p: [int(part) if part.isdigit() else part for part in p.relative_to(sweep_dir).parts])


def read_run(run_dir: Path, sweep_dir: Path) -> dict:
    """One row of the table, and the run's val curve (under "curve")."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in read_yaml(overrides_file, REPORT_FIX, kind="list")] if overrides_file.is_file() else []
    record = read_json(run_dir / "provenance.json", REPORT_FIX, missing_ok=True) or {}
    evals, trains = read_metrics(run_dir)
    status = record.get("status", "not started")
    if status == "running" and (run_dir / "DONE").exists():
        status = "done"
    speeds = [t["tokens_per_s"] for t in trains if "tokens_per_s" in t]
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
        "micro_batch": _micro_batch([record, *record.get("resumes", [])]),
        "curve": [(e["step"], e["val_loss"]) for e in evals],
        "override_values": dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith(("hydra.", "+", "~"))),
    }


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


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c], c) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, metric: str) -> None:
    """Val loss vs step for every run; beside it, for a one-parameter sweep, the metric vs the parameter."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    swept = _swept_parameter(rows)
    fig, axes = plt.subplots(1, 2 if swept else 1, figsize=(12 if swept else 7, 4.5), squeeze=False)
    curves = axes[0][0]
    for row in rows:
        if row["curve"]:
            steps, losses = zip(*row["curve"])
            curves.plot(steps, losses, marker=".", label=row["overrides"] or row["job"])
    curves.set(xlabel="step", ylabel="val loss", title="val loss of every run")
    curves.grid(alpha=0.3)
    if any(row["curve"] for row in rows):
        curves.legend(fontsize="small")
    if swept:
        points = sorted((_number(row["override_values"][swept]), row[metric]) for row in rows if row[metric] is not None)
        ax = axes[0][1]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        if all(isinstance(p[0], float) and p[0] > 0 for p in points) and len(points) > 1:
            if max(p[0] for p in points) / min(p[0] for p in points) >= 10:
                ax.set_xscale("log")  # learning rates and the like span decades
        ax.set(xlabel=swept, ylabel=metric.replace("_", " "), title=f"{metric.replace('_', ' ')} vs {swept}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def _swept_parameter(rows: list[dict]) -> str | None:
    """The one override whose value differs between runs, if there is exactly one."""
    varying = varying_keys(rows)
    return varying[0] if len(varying) == 1 and len(rows) > 1 else None


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
    args = parser.parse_args(argv)
    try:
        if not args.sweep_dir.is_dir():
            raise UserError(f"{args.sweep_dir} is not a dir: give a sweep dir such as multirun/DATE/TIME")
        runs = find_runs(args.sweep_dir)
        if not runs:
            raise UserError(f"{args.sweep_dir} holds no run dirs (none has a provenance.json or .hydra/): is it a sweep dir?")
        rows = sort_rows([read_run(run, args.sweep_dir) for run in runs], args.sort)
        common = show_swept_overrides(rows)
        table = markdown(rows)
        (args.sweep_dir / "report.md").write_text(table)
        write_csv(rows, args.sweep_dir / "report.csv")
        plot(rows, args.sweep_dir / "report.png", "final_val_loss")
        unfinished = [row["job"] for row in rows if row["status"] != "done"]
        command = resume_command(args.sweep_dir) if unfinished else None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table, end="")
    if common:
        print(f"\nevery run: {' '.join(common)}")
    print(f"\n{len(rows)} runs; written: {args.sweep_dir / 'report.md'}, report.csv, report.png")
    if command:
        print(f"not done: {', '.join(unfinished)}; to finish the sweep: {command}")


if __name__ == "__main__":
    main()
