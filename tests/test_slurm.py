"""Sweeps on a real SLURM cluster (slurmctld, slurmd and slurmdbd on this machine, started by
.ci/slurm-cluster through the slurm_cluster fixture): jobs submitted by launcher=slurm, preempted
with the signal SLURM sends, DDP over two tasks, and a config edited while jobs wait."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY, report_rows, require_shakespeare, run_cli
from test_sweeps import assert_same_weights, data_args, provenance, start, sweep_dir_of, val_losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def start_sweep(cwd: Path, *overrides: str, flags: tuple[str, ...] = ()) -> subprocess.Popen:
    """nanogpt-train --multirun ... in the background: it waits for its jobs as a user's would."""
    return start(cwd, *flags, "--multirun", "launcher=slurm", *overrides)


def wait_for(what: str, condition, sweep: subprocess.Popen, timeout: float = 300):  # a bound for a busy machine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if sweep.poll() is not None:
            pytest.fail(f"{what}: the sweep ended first: {sweep.stderr.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f} s; the queue: {squeue()}")


def squeue() -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True).stdout


def task_folders(sweep_dir: Path) -> list[Path]:
    """submitit's folder of each job: <array job id>_<task id>, or <job id> for a sweep of one job."""
    return [p for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)]


def array_job_id(sweep_dir: Path) -> str:
    return task_folders(sweep_dir)[0].name.split("_")[0]


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the sweep did not end in {timeout} s: {err[-3000:]}; the queue: {squeue()}")
    assert process.returncode == 0, err[-3000:]
    return out + err


def test_a_sweep_runs_as_a_slurm_array_and_the_report_agrees(slurm_cluster, tmp_path):
    require_shakespeare()
    result = run_cli("nanogpt.train", "--multirun", "launcher=slurm", "optim.lr=1e-3,3e-3", "seed=1,2",
                     "max_iters=6", "eval_interval=3", *TINY, *data_args(tmp_path), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    assert len({p.name.split("_")[0] for p in task_folders(sweep_dir)}) == 1  # one array
    report = run_cli("nanogpt.sweeps.report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = report_rows(report.stdout)
    assert len(rows) == 4
    for cells in rows:
        job = sweep_dir / cells[0]
        assert cells[2] == "done" and (job / "DONE").is_file()
        assert float(cells[4]) == pytest.approx(val_losses(job)[-1], abs=1e-4)
        assert provenance(job)["slurm"]["SLURM_ARRAY_TASK_ID"] == cells[0]


def test_a_preempted_job_is_requeued_resumes_and_ends_as_if_uninterrupted(slurm_cluster, tmp_path):
    """Two identical jobs in one array; job 0 gets SLURM's preemption signal (scancel --signal=USR2,
    what SLURM sends with --signal ahead of preemption or the time limit) mid-run."""
    require_shakespeare()
    sweep = start_sweep(tmp_path, "seed=7,7", "max_iters=1500", "eval_interval=250", "logger=wandb",
                        "logger.mode=offline", *TINY, *data_args(tmp_path))
    checkpoint = wait_for("job 0's first checkpoint",
                          lambda: next(iter(tmp_path.glob("multirun/*/*/0/checkpoints/step-00000250.pt")), None), sweep)
    run_dir = checkpoint.parents[1]
    subprocess.run(["scancel", "--signal=USR2", f"{array_job_id(run_dir.parent)}_0"], check=True)
    finish(sweep)

    record = provenance(run_dir)
    assert record["status"] == "done"
    assert len(record["resumes"]) == 1 and record["resumes"][0]["from_step"] >= 250  # one restart, from its checkpoint
    assert record["resumes"][0]["slurm"]["SLURM_RESTART_COUNT"] == "1"
    assert "SIGUSR2 received" in (run_dir / "train.log").read_text()
    assert_same_weights(run_dir, run_dir.parent / "1")
    assert val_losses(run_dir) == val_losses(run_dir.parent / "1")
    # the requeued job logged to the same wandb run as its first start
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in offline_runs}) == 1


def test_a_two_task_job_trains_with_ddp_over_gloo_in_one_run_dir(slurm_cluster, tmp_path):
    require_shakespeare()
    result = run_cli("nanogpt.train", "--multirun", "launcher=slurm", "max_iters=6", "eval_interval=3", *TINY,
                     "hardware.nproc_per_node=2", "eval_iters=2", *data_args(tmp_path), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    (job_folder,) = task_folders(sweep_dir)
    assert len(list(job_folder.glob("*_log.out"))) == 2  # two SLURM tasks, one log each
    run_dir = sweep_dir / "0"
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    assert provenance(run_dir)["world_size"] == 2 and (run_dir / "DONE").is_file()
    assert (run_dir / "train.rank1.log").is_file()
    assert list((run_dir / ".hydra").iterdir())  # one snapshot, written by rank 0
    assert "x 2 processes" in (run_dir / "train.log").read_text()


def test_editing_a_config_after_submission_does_not_change_what_a_queued_job_runs(slurm_cluster, tmp_path):
    require_shakespeare()
    extra = tmp_path / "extra_conf"
    (extra / "optim").mkdir(parents=True)
    mine = extra / "optim" / "mine.yaml"
    mine.write_text("defaults:\n  - adamw\n  - _self_\nlr: 0.001\n")
    sweep = start_sweep(tmp_path, "optim=mine", "seed=1,2", "max_iters=4", "eval_interval=2",
                        "+hydra.launcher.additional_parameters.hold=true", *TINY, *data_args(tmp_path),
                        flags=("--config-dir", str(extra)))
    try:
        wait_for("the held jobs", lambda: "JobHeldUser" in squeue(), sweep)  # the array waits, as one line
        mine.write_text("defaults:\n  - adamw\n  - _self_\nlr: 0.5\n")  # the edit, while the jobs wait
        sweep_dir = next(tmp_path.glob("multirun/*/*"))
        subprocess.run(["scontrol", "release", array_job_id(sweep_dir)], check=True)
        finish(sweep)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            subprocess.run(["scancel", "--name=train"], capture_output=True)
    for job in ("0", "1"):
        assert OmegaConf.load(sweep_dir / job / "config.resolved.yaml").optim.lr == 0.001
        assert OmegaConf.load(sweep_dir / job / ".hydra" / "config.yaml").optim.lr == 0.001


def test_a_cancelled_job_is_named_in_the_sweeps_summary_and_the_other_job_finishes(slurm_cluster, tmp_path):
    """scancel of one task of the array: that job saves and ends (SLURM: CANCELLED), the other
    finishes, and the sweep ends with its one-line summary rather than submitit's traceback."""
    require_shakespeare()
    sweep = start_sweep(tmp_path, "max_iters=100000,4", "eval_interval=100", *TINY, *data_args(tmp_path))
    try:
        checkpoint = wait_for("job 0's first checkpoint",
                              lambda: next(iter(tmp_path.glob("multirun/*/*/0/checkpoints/step-*.pt")), None), sweep)
        sweep_dir = checkpoint.parents[2]
        subprocess.run(["scancel", f"{array_job_id(sweep_dir)}_0"], check=True)
        _, stderr = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            subprocess.run(["scancel", "--name=train"], capture_output=True)
    assert sweep.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: 1 of 2 jobs failed: job 0 (launcher=slurm max_iters=100000 "), line
    assert ") was cancelled (CANCELLED" in line
    assert f"its log: {(sweep_dir / '0' / 'train.log').relative_to(tmp_path)}; the others finished" in line
    assert "; to finish the sweep: nanogpt-train --multirun launcher=slurm max_iters=100000,4 " in line
    assert (sweep_dir / "1" / "DONE").is_file() and provenance(sweep_dir / "0")["status"] == "preempted"
