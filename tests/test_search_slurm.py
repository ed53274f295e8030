"""A search's workers as submitit jobs (issue 18, must-show 2): on this machine with
launcher=submitit_local, and as one job array on the real local SLURM cluster, where a worker
preempted mid-trial is requeued and its trial ends as its uninterrupted twin does."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SHAKESPEARE
from test_search import RUN, data_dir, provenance, search, space, study  # noqa: F401 (data_dir: a fixture)
from test_sweeps import assert_same_weights, start, val_losses

optuna = pytest.importorskip("optuna", reason="the search extra: pip install -e '.[search]'")

LR = space(optim__lr="{low: 1.0e-4, high: 1.0e-2, log: true}")
TWINS = "search.enqueue=[{optim.lr: 0.002}, {optim.lr: 0.002}]"  # trials 0 and 1: the same run, twice


def array_ids(sweep_dir: Path) -> set[str]:
    """The SLURM array job ids of the worker jobs, from submitit's folders <array id>_<task id>."""
    return {p.name.split("_")[0] for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)}


def workers_of(sweep_dir: Path) -> dict[int, int]:
    """trial number -> the worker (array task) that trained it, from the study."""
    return {t.number: t.user_attrs["worker"] for t in study(sweep_dir).get_trials(deepcopy=False)}


@pytest.mark.slow
def test_a_search_runs_its_workers_as_submitit_local_jobs(tmp_path, data_dir):  # noqa: F811
    result = search(tmp_path, data_dir, "launcher=submitit_local", "search=none", LR, "search.n_trials=4",
                    "search.n_workers=2", "search.pruner.name=none")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    out = result.stdout + result.stderr
    assert "search: 4 trials of tpe (seed 0), 2 workers as submitit_local jobs" in out
    assert "each worker job: nodes=1, tasks_per_node=1, cpus_per_task=1, timeout_min=60, max_num_timeout=3" in out
    trials = study(sweep_dir).get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(set(workers_of(sweep_dir).values())) == [0, 1]  # both jobs trained trials
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.err"))) == 2  # one submitit job per worker
    for t in trials:
        assert (sweep_dir / f"trial-{t.number:04d}" / "DONE").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_search_on_slurm_is_one_array_and_a_preempted_worker_continues_its_trial(slurm_cluster, tmp_path,
                                                                                     data_dir):  # noqa: F811
    """Must-show 2: 2 workers as one array; every trial completes; the worker of trial 0 gets
    SLURM's preemption signal mid-trial (scancel --signal=USR2), is requeued, continues trial 0
    from its checkpoint, and trial 0 ends as its twin, trial 1 (the same params and seed), does."""
    sweep_dir = tmp_path / "sweep"
    run = [a for a in RUN if not a.startswith(("max_iters=", "eval_interval="))]
    driver = start(tmp_path, "--multirun", "launcher=slurm", "search=none", LR, TWINS, "search.n_trials=4",
                   "search.n_workers=2", "search.pruner.name=none", *run, "max_iters=1500", "eval_interval=250",
                   f"data.source={SHAKESPEARE}", f"data.dir={data_dir}", f"hydra.sweep.dir={sweep_dir}")
    try:
        checkpoint = sweep_dir / "trial-0000" / "checkpoints" / "step-00000250.pt"
        deadline = time.monotonic() + 300
        while not checkpoint.is_file():
            assert driver.poll() is None, driver.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "trial 0 saved no checkpoint at step 250 within 300 s"
            time.sleep(0.2)
        worker = workers_of(sweep_dir)[0]
        (array,) = array_ids(sweep_dir)
        subprocess.run(["scancel", "--signal=USR2", f"{array}_{worker}"], check=True)
        out, err = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
            subprocess.run(["scancel", "--name=train"], capture_output=True)
    assert driver.returncode == 0, err[-3000:]
    assert "2 workers as one SLURM job array (launcher=slurm)" in out + err

    trials = study(sweep_dir).get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4  # no trial failed, lost or counted twice
    assert {p.name for p in sweep_dir.glob("trial-*")} == {f"trial-{n:04d}" for n in range(4)}
    assert array_ids(sweep_dir) == {array}  # one array

    interrupted, twin = sweep_dir / "trial-0000", sweep_dir / "trial-0001"
    record = provenance(interrupted)
    assert record["status"] == "done"
    assert len(record["resumes"]) == 1 and record["resumes"][0]["from_step"] >= 250  # requeued, from its checkpoint
    assert record["resumes"][0]["slurm"]["SLURM_RESTART_COUNT"] == "1"
    assert "SIGUSR2 received" in (interrupted / "train.log").read_text()
    assert workers_of(sweep_dir)[0] == worker  # the requeued worker continued it, not another
    assert val_losses(interrupted) == val_losses(twin)
    assert trials[0].value == trials[1].value
    assert_same_weights(interrupted, twin)
