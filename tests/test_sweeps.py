"""Sweeps through the launcher presets without a cluster: submitit's local executor (real
processes, real timeouts and requeues), the sbatch files the SLURM presets would submit (written
by submitit's own code), sweep resume, and the mistakes a sweep refuses before it runs anything.
The same sweeps on a real SLURM cluster: tests/test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHAKESPEARE, TINY, compose, report_rows, require_shakespeare, run_cli


def sweep_dir_of(cwd: Path) -> Path:
    (sweep_dir,) = list((cwd / "multirun").glob("*/*"))
    return sweep_dir


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def provenance(run_dir: Path) -> dict:
    return json.loads((run_dir / "provenance.json").read_text())


def val_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e["val_loss"] for e in map(json.loads, lines) if e.get("kind") == "eval"]


def data_args(cwd: Path) -> list[str]:
    return [f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}"]


def start(cwd: Path, *args: str) -> subprocess.Popen:
    """nanogpt-train ARGS in the background, from cwd, as a user would run it."""
    return subprocess.Popen([sys.executable, "-m", "nanogpt.train", *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------------------------------------
# submitit's local executor


@pytest.mark.slow
def test_a_submitit_local_sweep_matches_the_basic_launchers_and_the_report_agrees(tmp_path):
    require_shakespeare()
    sweep = ["--multirun", "optim.lr=1e-3,3e-3", "seed=1,2", "max_iters=6", "eval_interval=3", *TINY]
    dirs = {}
    for launcher in ("local", "submitit_local"):
        cwd = tmp_path / launcher
        cwd.mkdir()
        result = run_cli("nanogpt.train", *sweep, f"launcher={launcher}", *data_args(cwd), cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        dirs[launcher] = sweep_dir_of(cwd)

    local = dirs["submitit_local"]
    assert sorted(p.name for p in local.iterdir() if p.is_dir() and p.name[0] != ".") == ["0", "1", "2", "3"]
    for job in "0123":  # the same jobs, the same numbers: each job ran the config its overrides say
        assert (local / job / "DONE").is_file()
        assert val_losses(local / job) == val_losses(dirs["local"] / job)

    report = run_cli("nanogpt.report", str(local), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = report_rows(report.stdout)
    assert len(rows) == 4
    for cells in rows:
        job, status, final = cells[0], cells[2], float(cells[4])
        assert status == "done" and final == pytest.approx(val_losses(local / job)[-1], abs=1e-4)
    assert (local / "report.png").stat().st_size > 0


@pytest.mark.slow
def test_a_job_that_reaches_its_time_limit_is_requeued_and_ends_as_if_uninterrupted(tmp_path):
    """submitit_local with a 1-minute limit and the save signal 52 s early: the job is signalled
    8 s after each start, saves at the next step boundary, is requeued by submitit, and resumes.
    Its twin without the limit runs beside it."""
    require_shakespeare()
    job = ["--multirun", "launcher=submitit_local", "seed=7", "max_iters=2500", "eval_interval=250",
           "hydra.launcher.max_num_timeout=8", *TINY]
    limits = {"reference": [], "limited": ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=52"]}
    processes = {}
    for name, limit in limits.items():
        (tmp_path / name).mkdir()
        processes[name] = start(tmp_path / name, *job, *limit, *data_args(tmp_path / name))
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"

    run_dir, reference_dir = sweep_dir_of(tmp_path / "limited") / "0", sweep_dir_of(tmp_path / "reference") / "0"
    record = provenance(run_dir)
    assert record["status"] == "done" and len(record["resumes"]) >= 1  # at least one restart
    assert all(r["from_step"] > 0 for r in record["resumes"])  # each from a checkpoint, not from scratch
    log = (run_dir / "train.log").read_text()
    assert "SIGUSR2 received" in log
    assert_same_weights(run_dir, reference_dir)
    assert val_losses(run_dir) == val_losses(reference_dir)


@pytest.mark.slow
def test_rerunning_a_sweep_with_a_killed_job_completes_only_that_job(tmp_path):
    """Job 1 is killed (SIGKILL, as the OOM killer would) while job 0 finishes; the same command
    with hydra.sweep.dir then runs job 1 alone, from its checkpoint."""
    require_shakespeare()
    sweep = ["--multirun", "launcher=submitit_local", "max_iters=400,1200", "eval_interval=100", *TINY,
             *data_args(tmp_path)]
    process = start(tmp_path, *sweep)
    deadline = time.monotonic() + 120
    victim = None
    while time.monotonic() < deadline and victim is None:
        found = list((tmp_path / "multirun").glob("*/*/1/checkpoints/step-00000200.pt"))
        if found:
            victim = found[0].parents[1]
        time.sleep(0.05)
    assert victim is not None, "job 1 saved no checkpoint in 120 s"
    os.kill(provenance(victim)["pid"], signal.SIGKILL)  # the job's own process
    _, stderr = process.communicate(timeout=300)
    sweep_dir = victim.parent
    assert process.returncode == 2  # the sweep waited for the other job, then named the one that failed
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: 1 of 2 jobs failed: job 1 (launcher=submitit_local max_iters=1200"), line
    assert "to finish the sweep: nanogpt-train --multirun launcher=submitit_local max_iters=400,1200" in line
    assert f"hydra.sweep.dir={sweep_dir.relative_to(tmp_path)} (it skips the jobs that finished)" in line
    assert (sweep_dir / "0" / "DONE").is_file() and not (victim / "DONE").exists()
    finished = (sweep_dir / "0" / "metrics.jsonl").read_bytes()

    again = run_cli("nanogpt.train", *sweep, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(1 of 2 jobs to run)" in again.stdout + again.stderr
    assert (sweep_dir / "0" / "metrics.jsonl").read_bytes() == finished  # the finished job was not run again
    assert "resumes" not in provenance(sweep_dir / "0")
    record = provenance(victim)
    assert record["status"] == "done" and len(record["resumes"]) == 1
    assert record["resumes"][0]["from_step"] >= 200  # continued from its checkpoint
    assert (victim / "DONE").is_file()


# ---------------------------------------------------------------------------------------------
# the sbatch files of the SLURM presets, as submitit writes them


def sbatch_file(tmp_path: Path, overrides: list[str]) -> tuple[list[str], object]:
    """The sbatch lines the launcher preset would submit, written by submitit's own executor
    (nothing is submitted), and the executor."""
    from hydra.utils import instantiate

    cfg = compose("train", [*overrides, f"hydra.sweep.dir={tmp_path}"], hydra=True)
    launcher = instantiate(cfg.hydra.launcher)
    executor = launcher.executor()
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit JOB_FOLDER", "uid")
    return text.splitlines(), executor._executor


def test_the_slurm_preset_sizes_the_job_from_the_hardware_group_and_the_site_file(tmp_path):
    lines, executor = sbatch_file(tmp_path, ["launcher=slurm", "site=example", "hardware=multinode"])
    for expected in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
                     "--time=1440", "--partition=gpu", "--account=my-project", "--qos=normal", "--signal=USR2@120"):
        assert f"#SBATCH {expected}" in lines, expected
    assert "module load cuda/12.4" in lines  # the site file's setup lines run before the job
    assert executor.max_num_timeout == 0  # a time limit ends the job: no requeue
    assert not any("--requeue" in line for line in lines)


def test_the_preemptible_preset_requeues_and_signals_early(tmp_path):
    lines, executor = sbatch_file(tmp_path, ["launcher=preemptible", "hardware=ddp", "hardware.nproc_per_node=4"])
    for expected in ("--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--time=240",
                     "--signal=USR2@300", "--requeue"):
        assert f"#SBATCH {expected}" in lines, expected
    assert executor.max_num_timeout == 20
    assert not any("--partition" in line for line in lines)  # no site file: the cluster's default partition


def test_a_cpu_job_asks_for_no_gpus(tmp_path):
    lines, _ = sbatch_file(tmp_path, ["launcher=slurm", "hardware=cpu", "hydra.launcher.timeout_min=30"])
    assert not any(line.startswith("#SBATCH --g") for line in lines)  # no --gpus-*, no --gres: sbatch rejects --gpus-per-node=0 on a CPU node
    assert "#SBATCH --cpus-per-task=4" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --time=30" in lines


def test_the_submitit_local_preset_runs_one_process_per_job_with_its_own_time_limit(tmp_path):
    from hydra.utils import instantiate

    cfg = compose("train", ["launcher=submitit_local", "hardware=ddp", f"hydra.sweep.dir={tmp_path}"], hydra=True)
    executor = instantiate(cfg.hydra.launcher).executor()
    assert type(executor).__name__ == "LocalExecutor"
    params = executor.parameters
    assert params["tasks_per_node"] == 1  # nanogpt-train starts the DDP processes itself
    assert (params["timeout_min"], params["signal_delay_s"], executor.max_num_timeout) == (60, 30, 3)


# ---------------------------------------------------------------------------------------------
# mistakes a sweep refuses before it runs anything


@pytest.mark.parametrize("launcher", ["local", "submitit_local"])
def test_a_job_with_a_bad_config_stops_the_sweep_before_any_job_runs(tmp_path, launcher):
    result = run_cli("nanogpt.train", "--multirun", f"launcher={launcher}", "block_size=8,4096", "max_iters=2",
                     *TINY[:-1], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: job 1 (") and "block_size" in lines[-1], result.stderr[-2000:]
    assert not list(tmp_path.glob("multirun/*/*/0"))  # job 0, which was fine, did not run either


def test_a_slurm_sweep_over_the_process_count_is_refused_before_submission(tmp_path):
    result = run_cli("nanogpt.train", "--multirun", "launcher=slurm", "hardware=cpu",
                     "hardware.nproc_per_node=1,2", "max_iters=2", cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: job 1 (") and "needs tasks_per_node=2, and the array is sized for 1" in line, line
    assert "separate commands" in line
    assert not list(tmp_path.glob("multirun/*/*/.submitit/*"))  # nothing was submitted


@pytest.mark.slow
def test_a_sweep_dir_is_not_reused_for_other_values(tmp_path):
    require_shakespeare()
    first = run_cli("nanogpt.train", "--multirun", "optim.lr=1e-3", "max_iters=2", "eval_interval=2", *TINY,
                    *data_args(tmp_path), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    sweep_dir = sweep_dir_of(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()}
    other = run_cli("nanogpt.train", "--multirun", "optim.lr=5e-3", "max_iters=2", "eval_interval=2", *TINY,
                    *data_args(tmp_path), f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert other.returncode == 2
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith("error: job 0 (optim.lr=0.005") and "optim.lr=0.001" in line and "new sweep" in line
    after = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file() and p.name != "multirun.yaml"}
    assert after == {p: t for p, t in before.items() if p.name != "multirun.yaml"}


# ---------------------------------------------------------------------------------------------
# the sweep presets


def preset_jobs(preset: str, extra: list[str]) -> list[list[str]]:
    """The jobs Hydra's sweeper makes of a sweep preset, as override lists."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose("train", [f"sweep={preset}", *extra], hydra=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return batch


@pytest.mark.parametrize("preset, extra, expected", [
    ("lr_grid", [], [f"optim.lr={lr}" for lr in ("0.0001", "0.0003", "0.001", "0.003", "0.01")]),
    ("seeds", [], [f"seed={s}" for s in range(1, 6)]),
    ("model_ladder", ["experiment=gpt2_124m"], [f"model={m}" for m in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")]),
])
def test_each_sweep_preset_makes_valid_jobs(preset, extra, expected):
    from nanogpt.preflight import to_train_config

    jobs = preset_jobs(preset, extra)
    assert [" ".join(job) for job in jobs] == expected
    for job in jobs:  # every job composes and passes the checks a run makes before it starts
        to_train_config(compose("train", [f"sweep={preset}", *extra, *job]))


@pytest.mark.slow
def test_a_sweep_preset_runs_its_jobs(tmp_path):
    require_shakespeare()
    result = run_cli("nanogpt.train", "--multirun", "sweep=seeds", "max_iters=2", "eval_interval=2", *TINY,
                     *data_args(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    seeds = [provenance(sweep_dir / str(job))["seed"] for job in range(5)]
    assert seeds == [1, 2, 3, 4, 5]
