"""nanogpt-report on a real sweep with seeds: three learning rates x four seeds of a tiny model on
the real tiny Shakespeare, through nanogpt-train --multirun. Every figure of the groups' table and
of the comparison at equal cost is computed again here, with scipy and numpy, from the jobs' own
metrics.jsonl and provenance.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import SHAKESPEARE, TINY, report_rows, require_shakespeare, run_cli

LRS = ("0.001", "0.003", "0.01")
SEEDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("seeds")
    result = run_cli("nanogpt.train", "--multirun", "optim.lr=1e-3,3e-3,1e-2", "seed=1,2,3,4", "max_iters=300",
                     "eval_interval=100", *TINY, f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}", cwd=cwd,
                     env={"OMP_NUM_THREADS": "1"}, timeout=1200)  # one thread: jobs on a busy CPU do not crawl
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = list((cwd / "multirun").glob("*/*"))
    return sweep_dir


def evals(job: Path) -> list[dict]:
    return [r for r in map(json.loads, (job / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def jobs_by_lr(sweep_dir: Path) -> dict[str, list[Path]]:
    by_lr: dict[str, list[Path]] = {lr: [] for lr in LRS}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        (lr,) = [lr for lr in LRS if f"- optim.lr={lr}\n" in overrides]
        by_lr[lr].append(job)
    return by_lr


def interval(values: list[float]) -> tuple[float, float]:
    return stats.t.interval(0.95, df=len(values) - 1, loc=np.mean(values), scale=stats.sem(values))


@pytest.mark.slow
def test_three_settings_of_four_seeds_give_three_groups_whose_figures_scipy_confirms(sweep, tmp_path):
    result = run_cli("nanogpt.sweeps.report", str(sweep), "--baseline", "optim.lr=1e-3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(report_rows(result.stdout)) == 12
    table = result.stdout.split("Runs that differ only by seed")[1]
    printed = {cells[0]: cells for cells in report_rows(table.replace("| group ", "| job "))}
    assert sorted(printed) == [f"optim.lr={lr}" for lr in LRS]
    with open(sweep / "report_groups.csv") as f:
        groups = {row["group"]: row for row in csv.DictReader(f)}
    jobs = jobs_by_lr(sweep)
    finals = {lr: [evals(job)[-1]["val_loss"] for job in jobs[lr]] for lr in LRS}
    for lr in LRS:
        row, cells = groups[f"optim.lr={lr}"], printed[f"optim.lr={lr}"]
        assert (row["runs"], row["n"]) == ("4", "4") and cells[1:3] == ["4", "4"]
        best = [min(e["val_loss"] for e in evals(job)) for job in jobs[lr]]
        for metric, values, first_cell in (("final_val_loss", finals[lr], 3), ("best_val_loss", best, 6)):
            mean, std, (low, high) = np.mean(values), stats.tstd(values), interval(values)
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, rel=1e-9)
            assert float(row[f"{metric}_std"]) == pytest.approx(std, rel=1e-9)
            assert float(row[f"{metric}_ci_low"]) == pytest.approx(low, rel=1e-9)
            assert float(row[f"{metric}_ci_high"]) == pytest.approx(high, rel=1e-9)
            assert cells[first_cell:first_cell + 3] == [f"{mean:.4f}", f"{std:.4f}", f"[{low:.4f}, {high:.4f}]"]
        walls = [json.loads((job / "provenance.json").read_text())["wall_seconds"] for job in jobs[lr]]
        assert float(row["wall_s_mean"]) == pytest.approx(np.mean(walls))
        assert float(row["diff_vs_baseline"]) == pytest.approx(np.mean(finals[lr]) - np.mean(finals["0.001"]))
        if lr == "0.001":
            assert cells[-2:] == ["baseline", "-"]
        else:
            p = stats.ttest_ind(finals[lr], finals["0.001"], equal_var=False).pvalue
            assert float(row["p_value"]) == pytest.approx(p, rel=1e-9)
            assert cells[-1] == (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}") + (" ns" if p >= 0.05 else "")


@pytest.mark.slow
def test_the_comparison_at_equal_cost_is_read_off_the_jobs_curves(sweep, tmp_path):
    """Each group's val loss at the least tokens (and, where the runs log them, FLOPs and seconds
    of training) any job reached: numpy's linear interpolation of each job's evals, then scipy's
    interval over the seeds."""
    result = run_cli("nanogpt.sweeps.report", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(sweep / "report_budgets.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["measure"].startswith("val_loss_at_")]
    jobs = jobs_by_lr(sweep)
    tokens_per_step = 12 * 16  # TINY: batch 12, context 16
    axes = {row["measure"].removeprefix("val_loss_at_") for row in rows}
    assert "tokens" in axes

    def spent(curve: list[dict], axis: str) -> list[float]:  # tokens derived from the step where not logged
        return [e.get(axis, e["step"] * tokens_per_step if axis == "tokens" else None) for e in curve]

    for row in rows:
        axis, at = row["measure"].removeprefix("val_loss_at_"), float(row["at"])
        assert at == min(spent(evals(job), axis)[-1] for group in jobs.values() for job in group)
        curves = [evals(job) for job in jobs[row["group"].removeprefix("optim.lr=")]]
        spent_by_run = [spent(c, axis) for c in curves]
        values = [np.interp(at, s, [e["val_loss"] for e in c]) for s, c in zip(spent_by_run, curves)]
        assert row["n"] == "4"
        assert float(row["mean"]) == pytest.approx(np.mean(values), rel=1e-9)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx(interval(values), rel=1e-9)
    assert (sweep / "report.png").stat().st_size > 10_000
