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

    report = run_cli("nanogpt.sweeps.report", str(local), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = report_rows(report.stdout)
    assert len(rows) == 4
    for cells in rows:
        job, status, final = cells[0], cells[2], float(cells[4])
        assert status == "done" and final == pytest.approx(val_losses(local / job)[-1], abs=1e-4)
    assert (local / "report.png").stat().st_size > 0


def last_step(run_dir: Path) -> int:
    """The step of the run's newest checkpoint; 0 without one."""
    last = run_dir / "checkpoints" / "last.pt"
    return torch.load(last, map_location="cpu", weights_only=True)["step"] if last.exists() else 0


@pytest.mark.slow
def test_a_job_out_of_requeues_ends_the_sweep_with_its_summary_and_the_finish_command_completes_it(tmp_path):
    """submitit_local with a 1-minute limit and the save signal 50 s early: the job is signalled
    10 s after each start, saves, is requeued once, and is then out of requeues; it cannot finish
    its 10^6 steps in two starts on any machine, so this holds however busy the machine is (a
    start slow enough to be signalled before its first step still ends out of requeues). The
    command the summary prints, with the limit lifted and max_iters set just past where the job
    stopped, finishes it, with the weights of a run that was never stopped. (10 s, not more: the
    test waits out both starts, and the reference retrains every step they took; a few seconds of
    start-up on an idle machine leave each start steps to train and save.)"""
    require_shakespeare()
    # constant lr, decay_iters fixed: the schedule does not depend on max_iters, which phase 2 changes
    job = ["seed=7", "eval_interval=250", "optim.schedule=constant", "optim.decay_iters=1000000", *TINY]
    limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=50", "hydra.launcher.max_num_timeout=1"]
    cwd = tmp_path / "limited"
    cwd.mkdir()
    result = run_cli("nanogpt.train", "--multirun", "launcher=submitit_local", "max_iters=1000000", *job, *limit,
                     *data_args(cwd), cwd=cwd, timeout=400)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(cwd)
    run_dir = sweep_dir / "0"
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 1 of 1 jobs failed: job 0 (launcher=submitit_local max_iters=1000000 seed=7"), line
    assert "ran out of requeues: it reached its time limit once more than max_num_timeout allows " \
           "(timeout_min=1, max_num_timeout=1)" in line
    assert f"to finish the sweep: nanogpt-train --multirun hydra.launcher.timeout_min=1" in line
    assert line.endswith(f"hydra.sweep.dir={sweep_dir.relative_to(cwd)} (it skips the jobs that finished).")
    assert not (run_dir / "DONE").exists()
    if (run_dir / "train.log").exists():  # a start reached training (on a very busy machine none may)
        assert f"its log: {(run_dir / 'train.log').relative_to(cwd)}" in line
        assert "SIGUSR2 received" in (run_dir / "train.log").read_text()  # it was signalled, not killed
        assert provenance(run_dir)["status"] == "preempted"

    stopped_at = last_step(run_dir)
    finish_at = f"max_iters={stopped_at + 20}"
    finish = start(cwd, "--multirun", "launcher=submitit_local", finish_at, *job, *data_args(cwd),
                   f"hydra.sweep.dir={sweep_dir}")
    (tmp_path / "reference").mkdir()
    reference = start(tmp_path / "reference", "--multirun", "launcher=submitit_local", finish_at, *job,
                      *data_args(tmp_path / "reference"))
    for name, process in {"finish": finish, "reference": reference}.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
    record = provenance(run_dir)
    assert record["status"] == "done" and (run_dir / "DONE").is_file()
    if stopped_at:  # the finishing start continued from the checkpoint the last signal saved
        assert record["resumes"][-1]["from_step"] == stopped_at
    reference_dir = sweep_dir_of(tmp_path / "reference") / "0"
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
    deadline = time.monotonic() + 300  # a bound on a busy machine, not a speed the test asserts
    victim = None
    while time.monotonic() < deadline and victim is None:
        found = list((tmp_path / "multirun").glob("*/*/1/checkpoints/step-00000200.pt"))
        if found:
            victim = found[0].parents[1]
        time.sleep(0.05)
    assert victim is not None, "job 1 saved no checkpoint in 300 s"
    os.kill(provenance(victim)["pid"], signal.SIGKILL)  # the job's own process
    _, stderr = process.communicate(timeout=300)
    sweep_dir = victim.parent
    assert process.returncode == 2  # the sweep waited for the other job, then named the one that failed
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: 1 of 2 jobs failed: job 1 (launcher=submitit_local max_iters=1200"), line
    assert (f") was killed while it ran (by a signal such as SIGKILL, or the out-of-memory killer): its run recorded no end, "
            f"its log: {(victim / 'train.log').relative_to(tmp_path)}; the others finished") in line
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


def an_outcome(tmp_path: Path, num: int, returned=None, **kw):
    """How job `num` of a sweep in tmp_path ended: a real JobReturn (what a job's run returns) or
    none (the job ended without one), as the launchers collect them."""
    from hydra.core.utils import JobReturn, JobStatus

    from nanogpt.sweeps.launcher import Outcome, SweepJob

    run_dir = tmp_path / str(num)
    run_dir.mkdir()
    (run_dir / "train.log").write_text("")
    if "run_status" in kw:  # what the run recorded in provenance.json before it ended
        (run_dir / "provenance.json").write_text(json.dumps({"status": kw.pop("run_status")}))
    job = SweepJob(num, [f"seed={num}"], None, run_dir, finished=False)
    if returned is not None:
        ret = JobReturn(overrides=job.overrides, status=JobStatus.COMPLETED if returned == "done" else JobStatus.FAILED)
        ret.return_value = returned if returned != "done" else {}
        returned = ret
    return Outcome(job, returned, **kw)


def test_every_way_a_job_ends_is_named_in_the_sweeps_summary(tmp_path):
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from nanogpt.errors import ConfigError, UserError
    from nanogpt.sweeps.launcher import check_all_finished

    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    hydra: []\n    task: [launcher=slurm, 'seed=range(13)']\n")
    trace = "Job (task=0) failed during processing with trace:\n" + "-" * 22 + "\nTraceback ...\nOSError: disk full\n" + "-" * 22
    endings = {  # job number: (how it ended, the words the summary gives it)
        0: (dict(returned="done"), None),
        1: (dict(returned=ConfigError("runs/x is in use by pid 7: wait for it")), "ended with an error: runs/x is in use by pid 7: wait for it"),
        2: (dict(returned=UncompletedJobError("Job not requeued because: timed-out too many times.")),
            "ran out of requeues: it reached its time limit once more than max_num_timeout allows (timeout_min=1, max_num_timeout=0)"),
        3: (dict(returned=RuntimeError("CUDA error: an illegal memory access\nmore")), "failed with RuntimeError: CUDA error: an illegal memory access"),
        4: (dict(state="INTERRUPTED"), "was killed by a signal"),
        5: (dict(state="CANCELLED by 0"), "was cancelled (CANCELLED by 0)"),
        6: (dict(state="OUT_OF_MEMORY"), "ran out of memory (OUT_OF_MEMORY)"),
        7: (dict(state="TIMEOUT"), "was killed at its time limit before it could save (TIMEOUT; timeout_min=1, max_num_timeout=0)"),
        8: (dict(state="FAILED", error=FailedJobError(trace)), "failed with OSError: disk full"),
        12: (dict(state="FINISHED", error=FailedJobError(trace.replace(
            "OSError: disk full", "submitit.core.utils.UncompletedJobError: Job not requeued because: timed-out too many times."))),
            "ran out of requeues: it reached its time limit once more than max_num_timeout allows"),
        9: (dict(state="NODE_FAIL"), "lost its node (NODE_FAIL)"),
        10: (dict(state="FINISHED", run_status="running"), "was killed while it ran (by a signal such as SIGKILL"),
        11: (dict(state="FAILED"), "crashed without a result (FAILED)"),
    }
    outcomes = [an_outcome(tmp_path, num, **how) for num, (how, _) in endings.items()]
    limits = "timeout_min=1, max_num_timeout=0"
    for outcome, (_, words) in zip(outcomes, endings.values()):
        assert outcome.why(limits) == words or outcome.why(limits).startswith(words)
    with pytest.raises(UserError) as refused:
        check_all_finished(tmp_path, outcomes, limits)
    line = str(refused.value)
    assert "\n" not in line and line.startswith("12 of 13 jobs failed: job 1 (seed=1) ended with an error: runs/x")
    for num, (_, words) in endings.items():
        if words is not None:
            assert f"job {num} (seed={num}) {words}" in line and f"its log: {tmp_path / str(num) / 'train.log'}" in line
    assert "job 0" not in line and "; the others finished" in line
    assert line.endswith(f"; to finish the sweep: nanogpt-train --multirun launcher=slurm 'seed=range(13)' "
                         f"hydra.sweep.dir={tmp_path} (it skips the jobs that finished)")
    check_all_finished(tmp_path, outcomes[:1], limits)  # all done: nothing to say


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "submitit_local"])
def test_a_job_that_stops_with_an_error_is_named_and_the_other_jobs_finish(tmp_path, launcher):
    """optim.lr=1e30 makes job 0's loss NaN: it stops with its one line (on_nonfinite=stop); job 1
    still runs, and the sweep ends with the summary, not a traceback."""
    require_shakespeare()
    result = run_cli("nanogpt.train", "--multirun", f"launcher={launcher}", "optim.lr=1e30,1e-3", "max_iters=4",
                     "eval_interval=4", *TINY, *data_args(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    sweep_dir = sweep_dir_of(tmp_path)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: 1 of 2 jobs failed: job 0 (launcher={launcher} optim.lr=1e+30 "), line
    assert ") ended with an error: step " in line and "the loss is nan" in line
    assert f"its log: {(sweep_dir / '0' / 'train.log').relative_to(tmp_path)}; the others finished" in line
    assert (sweep_dir / "1" / "DONE").is_file() and not (sweep_dir / "0" / "DONE").exists()


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
    assert not (tmp_path / "multirun").exists()  # job 0, which was fine, did not run either, and no sweep dir was made


def test_a_slurm_sweep_over_the_process_count_is_refused_before_submission(tmp_path):
    result = run_cli("nanogpt.train", "--multirun", "launcher=slurm", "hardware=cpu",
                     "hardware.nproc_per_node=1,2", "max_iters=2", cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: job 1 (") and "needs tasks_per_node=2, and the array is sized for 1" in line, line
    assert "separate commands" in line
    assert not (tmp_path / "multirun").exists()  # nothing was submitted, no sweep dir made


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
    after = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()}
    assert after == before  # multirun.yaml too: it still records the command that made the sweep


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
    ("seeds_ablation", [], [f"seed={s} model.position={p}" for s in range(1, 5) for p in ("learned", "rotary")]),
    ("model_ladder", ["experiment=gpt2_124m"], [f"model={m}" for m in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")]),
])
def test_each_sweep_preset_makes_valid_jobs(preset, extra, expected):
    from nanogpt.runs.preflight import to_train_config

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


# ---------------------------------------------------------------------------------------------
# choices that belong to the whole command


def assert_refused_without_trace(result, cwd: Path, *words: str) -> str:
    """Exit 2 with one error line holding `words`, and nothing written: no run dir, no sweep dir."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(p.name for p in cwd.iterdir()) == [], "the refused command left files"
    return lines[0]


@pytest.mark.parametrize("choice", ["sweep=lr_grid", "launcher=submitit_local", "launcher=slurm",
                                    "hydra.launcher.timeout_min=5 launcher=submitit_local"])
def test_a_sweep_choice_without_multirun_is_refused(tmp_path, choice):
    """Without --multirun, nanogpt-train runs one job here: sweep= and launcher= would do nothing."""
    result = run_cli("nanogpt.train", *choice.split(), "max_iters=2", cwd=tmp_path)
    assert_refused_without_trace(result, tmp_path, f"error: {choice.split()[0]} sets how the jobs of a sweep run",
                                 "add --multirun (-m)")


@pytest.mark.parametrize("swept, fix", [
    ("sweep=lr_grid,seeds", "give one preset (sweep=NAME)"),
    ("launcher=local,submitit_local", "give one value, and run one sweep per launcher"),
    ("site=example,other", "run one sweep per site"),
])
def test_a_swept_command_choice_is_refused(tmp_path, swept, fix):
    result = run_cli("nanogpt.train", "--multirun", "launcher=slurm", swept, "max_iters=2", cwd=tmp_path) \
        if swept.startswith("site") else run_cli("nanogpt.train", "--multirun", swept, "max_iters=2", cwd=tmp_path)
    key = swept.split("=")[0]
    assert_refused_without_trace(result, tmp_path, f"error: {swept} sweeps {key}, which belongs to the whole command", fix)


# ---------------------------------------------------------------------------------------------
# sites, and a SLURM that cannot be reached


def test_a_misspelled_site_is_named_before_anything_is_submitted(tmp_path):
    result = run_cli("nanogpt.train", "--multirun", "launcher=slurm", "site=exmaple", "max_iters=2", cwd=tmp_path)
    assert_refused_without_trace(result, tmp_path, "error: site=exmaple names no site file: the sites are example",
                                 "check the spelling")


def test_a_site_with_a_launcher_that_has_none_says_which_launchers_do(tmp_path):
    result = run_cli("nanogpt.train", "--multirun", "site=example", "max_iters=2", cwd=tmp_path)
    line = assert_refused_without_trace(result, tmp_path, "error: site=example sets where SLURM jobs go",
                                        "add launcher=slurm")
    assert "+site" not in line


def test_site_files_are_found_in_the_working_dir_and_the_users_config_dir(tmp_path):
    """What a wheel install reads as well as a checkout: ./conf/site/ (conf/site/local.yaml is the
    default of launcher=slurm), and ~/.config/nanogpt/site/ ($XDG_CONFIG_HOME)."""
    work, home = tmp_path / "work", tmp_path / "config"
    (work / "conf" / "site").mkdir(parents=True)
    (home / "nanogpt" / "site").mkdir(parents=True)
    (work / "conf" / "site" / "local.yaml").write_text("# @package hydra.launcher\npartition: here\naccount: mine\n")
    (home / "nanogpt" / "site" / "big.yaml").write_text("# @package hydra.launcher\npartition: big\nqos: high\n")
    env = {"XDG_CONFIG_HOME": str(home)}

    def launcher_settings(*overrides: str) -> dict:
        result = run_cli("nanogpt.train", "launcher=slurm", *overrides, "--cfg", "hydra", "-p", "hydra.launcher",
                         cwd=work, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.create(result.stdout))

    assert (launcher_settings()["partition"], launcher_settings()["account"]) == ("here", "mine")
    chosen = launcher_settings("site=big")
    assert (chosen["partition"], chosen["qos"], chosen["account"]) == ("big", "high", None)


def test_without_slurms_commands_a_slurm_sweep_is_one_line(tmp_path):
    require_shakespeare()
    cwd = tmp_path / "work"
    cwd.mkdir()
    result = run_cli("nanogpt.train", "--multirun", "launcher=slurm", "hardware=cpu", "max_iters=2", *TINY,
                     f"data.source={SHAKESPEARE}", f"data.dir={tmp_path / 'data'}", cwd=cwd,
                     env={"PATH": str(Path(sys.executable).parent)})  # python, and no sbatch
    assert_refused_without_trace(result, cwd, "error: launcher=slurm submits with SLURM's sbatch",
                                 "use launcher=submitit_local")


@pytest.mark.slow
def test_with_no_slurm_controller_to_reach_a_slurm_sweep_is_one_line_and_leaves_nothing(tmp_path):
    """Real sbatch, with a slurm.conf whose controller does not answer (nothing listens on its port)."""
    import shutil
    import socket

    require_shakespeare()
    if shutil.which("sbatch") is None:
        pytest.skip("needs SLURM's sbatch: run `.ci/slurm-cluster install` (CI does)")
    conf = tmp_path / "slurm.conf"
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    host = socket.gethostname().split(".")[0]
    conf.write_text(f"ClusterName=nowhere\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={port}\nMessageTimeout=1\n"
                    f"AuthType=auth/none\nNodeName={host} CPUs=1\nPartitionName=debug Nodes={host} Default=YES\n")
    cwd = tmp_path / "work"
    cwd.mkdir()
    result = run_cli("nanogpt.train", "--multirun", "launcher=slurm", "hardware=cpu", "max_iters=2", *TINY,
                     f"data.source={SHAKESPEARE}", f"data.dir={tmp_path / 'data'}", cwd=cwd, env={"SLURM_CONF": str(conf)})
    assert_refused_without_trace(result, cwd, "error: SLURM refused the sweep (sbatch: error: Batch job submission "
                                 "failed: Unable to contact slurm controller", "nothing was submitted")


@pytest.mark.slow
def test_a_sweep_refused_for_its_data_leaves_nothing(tmp_path):
    """The data is checked for every job before the sweep dir exists (it was checked in each job,
    after its run dir and log were made)."""
    require_shakespeare()
    text = SHAKESPEARE.read_text()
    (tmp_path / "a.txt").write_text(text[:20000])
    (tmp_path / "b.txt").write_text(text[-20000:])
    prepared = run_cli("nanogpt.prepare", "data=text", "data.source=a.txt", "data.dir=d", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("nanogpt.train", "--multirun", "seed=1,2", "max_iters=2", "data=text", "data.source=b.txt",
                     "data.dir=d", *TINY, cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: job 0 (seed=1 ") and "data.dir=d holds the tokens of data.source=" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no multirun/
