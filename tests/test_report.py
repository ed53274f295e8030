"""nanogpt-report on a real sweep: Hydra's basic launcher, four CPU jobs, one table and one plot."""

from __future__ import annotations

import csv

import pytest

from conftest import SHAKESPEARE, report_rows, require_shakespeare, run_cli


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("sweep")
    result = run_cli("nanogpt.train", "--multirun", "optim.lr=1e-3,3e-3", "seed=1,2", f"data.source={SHAKESPEARE}",
                     f"data.dir={cwd / 'data'}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                     "model.block_size=16", "max_iters=6", "eval_interval=3", "eval_iters=1", "optim.warmup_iters=0",
                     "hardware.peak_flops=1e11", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = list((cwd / "multirun").glob("*/*"))
    return cwd, sweep_dir


def test_a_basic_launcher_sweep_writes_one_run_dir_per_job(sweep):
    _, sweep_dir = sweep
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    for job in jobs:
        for name in (".hydra/config.yaml", "config.resolved.yaml", "provenance.json", "metrics.jsonl", "DONE",
                     "checkpoints/last.pt", "train.log"):
            assert (sweep_dir / job / name).is_file(), (job, name)


def test_the_report_has_a_row_per_job_sorted_by_val_loss_and_a_plot(sweep):
    cwd, sweep_dir = sweep
    result = run_cli("nanogpt.sweeps.report", str(sweep_dir), cwd=cwd)
    assert result.returncode == 0, result.stderr
    table = report_rows(result.stdout)
    assert len(table) == 4 and all(row[2] == "done" for row in table)
    with open(sweep_dir / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["job"] for r in rows) == ["0", "1", "2", "3"]
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)
    # the swept overrides (Hydra records 1e-3 as 0.001); the shared ones are printed once below the table
    assert {r["overrides"] for r in rows} == {f"optim.lr={lr} seed={s}" for lr in ("0.001", "0.003") for s in (1, 2)}
    assert "every run: data.source=" in result.stdout
    assert all(int(r["step"]) == 6 and r["restarts"] == "0" and float(r["tokens_per_s"]) > 0 for r in rows)
    png = (sweep_dir / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (sweep_dir / "report.md").read_text().startswith("\n".join(result.stdout.splitlines()[:6]) + "\n\n")
    # two seeds of two learning rates: two groups of two
    groups = report_rows(result.stdout.split("Runs that differ only by seed")[1].replace("| group ", "| job "))
    assert sorted((g[0], g[1], g[2]) for g in groups) == [("optim.lr=0.001", "2", "2"), ("optim.lr=0.003", "2", "2")]


def test_a_half_finished_sweep_is_reported_with_the_jobs_not_done_last(sweep, tmp_path):
    import shutil

    _, sweep_dir = sweep
    partial = tmp_path / "partial"
    shutil.copytree(sweep_dir, partial)
    (partial / "1" / "DONE").unlink()
    (partial / "1" / "metrics.jsonl").write_text("")  # started, nothing logged yet
    (partial / "4" / ".hydra").mkdir(parents=True)  # queued: only its snapshot exists
    (partial / "4" / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.01\n- seed=1\n")
    result = run_cli("nanogpt.sweeps.report", str(partial), "--sort", "final_val_loss", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = report_rows(result.stdout)
    assert len(rows) == 5
    assert rows[-1][:3] == ["4", "optim.lr=0.01 seed=1", "not started"]
    assert rows[-2][3:5] == ["-", "-"]  # job 1 has no losses yet
    # and how to finish it: the sweep's own command (from multirun.yaml), pinned to its dir
    hint = result.stdout.strip().splitlines()[-1]
    assert hint.startswith("not done: 4; to finish the sweep: nanogpt-train --multirun ")
    assert "optim.lr=1e-3,3e-3 seed=1,2" in hint and hint.endswith(f"hydra.sweep.dir={partial}")


def test_a_one_parameter_sweep_plots_the_loss_against_it():
    from nanogpt.sweeps.report import swept_parameter

    rows = [{"override_values": {"optim.lr": lr, "seed": "1"}} for lr in ("1e-3", "3e-3", "1e-2")]
    assert swept_parameter(rows) == "optim.lr"
    rows[0]["override_values"]["seed"] = "2"
    assert swept_parameter(rows) == "optim.lr"  # seeds are averaged over: still one axis
    rows[0]["override_values"]["model.n_layer"] = "2"
    assert swept_parameter(rows) is None  # two parameters vary: no single axis to plot against


def test_a_dir_without_runs_is_named(tmp_path):
    result = run_cli("nanogpt.sweeps.report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "holds no run dirs" in result.stderr
