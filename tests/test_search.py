"""Hyperparameter search (nanogpt-train --multirun search=NAME, docs/search.md): real Optuna studies
in a journal file, real worker processes training tiny runs, read back from the study and the run
dirs. Must-show 1 (TPE, 12 trials, 2 workers, and the report's table of them), 3 (asynchrony), 4
(pruning, and the report's steps saved), 5 in part (resume marks a dead worker's trial failed and
asks its params again) and 7 (bad input). The rest of a search's report: tests/test_report_search.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omegaconf import OmegaConf

from conftest import REPO, SHAKESPEARE, TINY, assert_one_line_error, compose, report_rows, require_shakespeare, run_cli

optuna = pytest.importorskip("optuna", reason="the search extra: pip install -e '.[search]'")

# TINY without its warmup (a searched key must not be set on the command line too, and lr_cpu searches it)
RUN = [a for a in TINY if not a.startswith("optim.warmup_iters")] + [
    "batch_size=4", "max_iters=20", "eval_interval=5", "log_interval=100", "save_checkpoints=true"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """tiny Shakespeare prepared once for the module: each test's search only reads it."""
    require_shakespeare()
    path = tmp_path_factory.mktemp("search-data") / "data"
    result = run_cli("nanogpt.prepare", "data=shakespeare_char", f"data.source={SHAKESPEARE}", f"data.dir={path}",
                     cwd=path.parent)
    assert result.returncode == 0, result.stderr
    return path


def search(cwd: Path, data_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """nanogpt-train --multirun with the tiny run, where the space's keys are the search's own."""
    searched = " ".join(a for a in args if a.startswith("++search.space="))
    run = [a for a in RUN if f"{a.split('=')[0]}:" not in searched]
    return run_cli("nanogpt.train", "--multirun", *run, f"data.source={SHAKESPEARE}", f"data.dir={data_dir}",
                   f"hydra.sweep.dir={cwd / 'sweep'}", *args, cwd=cwd, timeout=timeout)


def space(**keys: str) -> str:
    """A space on the command line: '++search.space={key: spec, ...}' (keys with dots, as in a preset)."""
    return "++search.space={" + ", ".join(f"{key.replace('__', '.')}: {spec}" for key, spec in keys.items()) + "}"


def study(sweep_dir: Path) -> "optuna.Study":
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="search", storage=JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal"))))


def provenance(run_dir: Path) -> dict:
    return json.loads((run_dir / "provenance.json").read_text())


def eval_steps(run_dir: Path) -> list[int]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if r.get("kind") == "eval"]


def trial_rows(stdout: str) -> list[list[str]]:
    """The rows of the trials table nanogpt-report prints for a search (trial, state, objective,
    each searched key, steps, saved steps, wall s, tokens), each as its cells."""
    return report_rows(stdout.replace("| trial | state ", "| job | state "))


def steps_saved(stdout: str) -> int:
    """N of the report's line `pruning saved N steps (...)`."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("pruning saved ")]
    return int(line.split()[2].replace(",", ""))


LR_AND_DROPOUT = space(optim__lr="{low: 1.0e-4, high: 3.0e-2, log: true}", model__dropout="{low: 0.0, high: 0.3}")


@pytest.mark.slow
def test_tpe_search_of_12_trials_on_2_workers(tmp_path, data_dir):
    """Must-show 1: TPE over optim.lr (log) and model.dropout, 12 trials, 2 local workers: the study
    holds 12 finished trials, each trained in its own run dir, and the command names the best."""
    result = search(tmp_path, data_dir, "search=none", LR_AND_DROPOUT, "search.n_trials=12", "search.n_workers=2",
                    "search.sampler.name=tpe", "search.sampler.n_startup_trials=4", "search.pruner.name=none")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    trials = study(sweep_dir).get_trials()
    assert len(trials) == 12 and {t.state.name for t in trials} == {"COMPLETE"}
    assert sorted(t.number for t in trials) == list(range(12))
    run_dirs = sorted(p.name for p in sweep_dir.glob("trial-*"))
    assert run_dirs == [f"trial-{n:04d}" for n in range(12)]
    for t in trials:
        run_dir = sweep_dir / f"trial-{t.number:04d}"
        assert (run_dir / "DONE").is_file() and provenance(run_dir)["status"] == "done"
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"optim.lr={t.params['optim.lr']!r}" in overrides  # the trial's own values, frozen in its snapshot
        assert t.value == pytest.approx(min(json.loads(line)["val_loss"] for line in
                                            (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
                                            if json.loads(line)["step"] > 0))
        assert 1e-4 <= t.params["optim.lr"] <= 3e-2 and 0.0 <= t.params["model.dropout"] <= 0.3
    assert len({(t.params["optim.lr"], t.params["model.dropout"]) for t in trials}) == 12  # the workers drew apart
    by_worker = {t.user_attrs.get("worker") for t in trials}
    assert by_worker == {0, 1}, "both workers trained trials"
    best = min(trials, key=lambda t: t.value)
    assert f"best: trial {best.number} " in result.stderr + result.stdout
    # the report lists the 12 trials from the study, best first, with their params and states
    report = run_cli("nanogpt.sweeps.report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = trial_rows(report.stdout)
    by_value = sorted(trials, key=lambda t: (t.value, t.number))
    assert [int(r[0]) for r in rows] == [t.number for t in by_value]
    for row, t in zip(rows, by_value):
        assert row[1:5] == ["complete", f"{t.value:.4f}", f"{t.params['optim.lr']:.4g}",
                            f"{t.params['model.dropout']:.4g}"]
    assert f"best: trial {best.number}, best_val_loss {best.value:.4f}: optim.lr={best.params['optim.lr']!r} " \
        f"model.dropout={best.params['model.dropout']!r}" in report.stdout


@pytest.mark.slow
def test_workers_do_not_wait_for_a_slow_trial(tmp_path, data_dir):
    """Must-show 3: one trial is made slow (a 768-wide model among 16- to 32-wide ones; the grid's
    seed 4 asks it first); while it trains, the other worker completes the other trials that
    started after it, at least 2, as the study's own timestamps show."""
    result = search(tmp_path, data_dir, "search=none", "max_iters=120", "eval_interval=60", "save_checkpoints=false",
                    space(model__n_embd="{choices: [768, 16, 24, 32]}"), "search.n_trials=4", "search.n_workers=2",
                    "search.sampler.name=grid", "search.sampler.seed=4", "search.pruner.name=none")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = study(tmp_path / "sweep").get_trials()
    assert sorted(t.params["model.n_embd"] for t in trials) == [16, 24, 32, 768]  # the grid, each once
    (slow,) = [t for t in trials if t.params["model.n_embd"] == 768]
    meanwhile = [t for t in trials if t.number != slow.number and t.state.name == "COMPLETE"
                 and t.datetime_start >= slow.datetime_start and t.datetime_complete <= slow.datetime_complete]
    assert len(meanwhile) >= 2, [(t.number, t.params, t.datetime_start, t.datetime_complete) for t in trials]
    assert {t.user_attrs["worker"] for t in meanwhile} != {slow.user_attrs["worker"]}


@pytest.mark.slow
def test_diverging_learning_rates_are_pruned_before_their_last_step(tmp_path, data_dir):
    """Must-show 4: half the learning rates diverge; the median pruner stops them at their first
    evaluation after the good ones ran, with a checkpoint there, marked pruned in its run dir, its
    provenance.json and the study; nanogpt-report says how many steps that saved."""
    result = search(tmp_path, data_dir, "search=none", "max_iters=30",
                    space(optim__lr="{choices: [1.0e-3, 3.0e-3, 3.0, 10.0]}"), "search.n_trials=6",
                    "search.n_workers=1", "search.sampler.name=random", "search.sampler.seed=1",
                    "search.pruner.name=median", "search.pruner.n_startup_trials=1",
                    "search.enqueue=[{optim.lr: 1.0e-3}]", "on_nonfinite=skip")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    trials = study(sweep_dir).get_trials()
    states = {t.number: (t.params["optim.lr"], t.state.name) for t in trials}
    assert len(trials) == 6
    for t in trials:
        run_dir = sweep_dir / f"trial-{t.number:04d}"
        if t.params["optim.lr"] >= 3.0:  # diverges
            assert t.state.name == "PRUNED", states
            assert provenance(run_dir)["status"] == "pruned" and not (run_dir / "DONE").exists()
            assert (run_dir / "PRUNED").is_file()  # marked in its run dir too
            assert max(eval_steps(run_dir)) < 30
            stop = max(eval_steps(run_dir))
            assert (run_dir / "checkpoints" / f"step-{stop:08d}.pt").is_file()  # saved where it stopped
            assert t.last_step == stop
        else:
            assert t.state.name == "COMPLETE", states
            assert max(eval_steps(run_dir)) == 30
    assert any(t.state.name == "PRUNED" for t in trials), states
    # the report says how many steps pruning saved: each pruned trial's max_iters minus the step it stopped at
    report = run_cli("nanogpt.sweeps.report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    saved = sum(30 - max(eval_steps(sweep_dir / f"trial-{t.number:04d}")) for t in trials if t.state.name == "PRUNED")
    assert steps_saved(report.stdout) == saved > 0


@pytest.mark.slow
def test_the_same_command_continues_a_search_killed_mid_way(tmp_path, data_dir):
    """Must-show 5: SIGKILL the driver and its workers mid-search; the same command again ends with
    exactly n_trials completed trials: the completed ones kept, each trial killed while running
    marked failed and its params asked again in a new trial, no trial number or run dir used twice."""
    args = ["search=none", LR_AND_DROPOUT, "search.n_trials=6", "search.n_workers=2", "search.pruner.name=none",
            "max_iters=60"]
    sweep_dir = tmp_path / "sweep"
    searched = " ".join(a for a in args if a.startswith("++search.space="))
    command = [sys.executable, "-m", "nanogpt.train", "--multirun",
               *[a for a in RUN if f"{a.split('=')[0]}:" not in searched], f"data.source={SHAKESPEARE}",
               f"data.dir={data_dir}", f"hydra.sweep.dir={sweep_dir}", *args]
    driver = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until 2 trials completed and others are running
            time.sleep(0.5)
            if (sweep_dir / "study.journal").is_file():
                states = [t.state.name for t in study(sweep_dir).get_trials()]
                if states.count("COMPLETE") >= 2 and "RUNNING" in states:
                    break
        else:
            raise AssertionError("the search did not get going")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and both workers, as a node failure would
        driver.wait()
    before = {t.number: t.state.name for t in study(sweep_dir).get_trials()}
    killed = [n for n, state in before.items() if state == "RUNNING"]
    assert killed

    again = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = study(sweep_dir).get_trials()
    assert [t.state.name for t in trials].count("COMPLETE") == 6
    assert all(trials[n].state.name == before[n] for n, state in before.items() if state == "COMPLETE")  # kept
    for n in killed:
        assert trials[n].state.name == "FAIL"
        (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == n]
        assert retry.params == trials[n].params and retry.number > max(before)
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers)
    assert {p.name for p in sweep_dir.glob("trial-*")} <= {f"trial-{n:04d}" for n in numbers}
    for n in killed:  # a killed trial's run dir is left as the kill left it: never continued by another trial
        run_dir = sweep_dir / f"trial-{n:04d}"
        assert not (run_dir / "provenance.json").is_file() or "resumes" not in provenance(run_dir)
    assert all((sweep_dir / f"trial-{t.number:04d}" / "DONE").is_file() for t in trials if t.state.name == "COMPLETE")


def test_dry_run_prints_the_search_and_writes_nothing(tmp_path, data_dir):
    """Must-show 7's sibling: search.dry_run=true prints trials, workers and the FLOPs of the whole
    search (model FLOPs per token x tokens per trial x trials), and makes no sweep dir."""
    result = search(tmp_path, data_dir, "search=lr_cpu", "search.dry_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "search: 30 trials of tpe (seed 0), 2 local workers" in out
    assert "optim.lr: float in [0.0001, 0.01], log scale" in out
    assert "optim.warmup_iters: int in [0, 400], step 50" in out
    # 20 steps x 4 x 16 tokens, at the tiny model's FLOPs per token (6N + 12 L C T)
    assert "each trial trains 20 steps (max_iters=20): 1,280 tokens" in out
    assert "FLOPs for 30 trials" in out
    # 30 x 1,280 tokens x the FLOPs per token, at 40% of TINY's hardware.peak_flops=1e11
    assert "device-hours: " in out and "at 40% MFU (search.assumed_mfu) of 1e+11 FLOP/s per device" in out
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args, fragments", [
    ([space(optim__lrr="{low: 1.0e-4, high: 1.0e-2}")], ["search.space.optim.lrr", "not a config key"]),
    ([space(optim__lr="{low: 1.0e-2, high: 1.0e-4}")], ["search.space.optim.lr", "low=0.01 is above high=0.0001"]),
    ([space(optim__lr="{low: 0, high: 1.0e-2, log: true}")], ["search.space.optim.lr", "a log range needs low > 0"]),
    ([space(model__n_embd="{choices: [32, 33]}")], ["model.n_embd=33", "not divisible by model.n_head=2"]),
    ([LR_AND_DROPOUT, "search.objective=val_accuracy"], ["val_accuracy", "best_val_loss"]),
    ([LR_AND_DROPOUT, "search.n_trials=0"], ["search.n_trials=0", "at least 1 trial"]),
    ([LR_AND_DROPOUT, "search.n_workers=0"], ["search.n_workers=0", "at least 1 worker"]),
    ([LR_AND_DROPOUT, "search.objective=time_to_target"], ["target_val_loss", "not set"]),
    ([LR_AND_DROPOUT, "optim.lr=1e-3"], ["optim.lr is set on the command line and searched"]),
    ([LR_AND_DROPOUT, "launcher=submitit_local",  # hydra-submitit-launcher's own class, not ours
      "hydra.launcher._target_=hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"],
     ["submitit_launcher.LocalLauncher is not supported for a search",
      "launcher=local, submitit_local, slurm or preemptible"]),
    ([LR_AND_DROPOUT, "search.assumed_mfu=0"], ["search.assumed_mfu=0", "(0, 1]"]),
], ids=["unknown-key", "low-above-high", "log-low-zero", "categorical-fails-check", "unknown-objective",
        "zero-trials", "zero-workers", "target-not-set", "searched-and-set", "other-launcher", "assumed-mfu"])
def test_bad_search_is_one_line_and_writes_nothing(tmp_path, data_dir, args, fragments):
    """Must-show 7: each mistake is one line, exit 2, before anything is written."""
    result = search(tmp_path, data_dir, "search=none", *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "multirun").exists()


def test_a_search_preset_without_multirun_is_refused(tmp_path, data_dir):
    result = run_cli("nanogpt.train", "search=lr_cpu", *RUN, f"data.dir={data_dir}", cwd=tmp_path)
    assert_one_line_error(result, "search=lr_cpu", "add --multirun")


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "cmaes", "gp"])
def test_each_sampler_is_seeded_per_worker(name):
    """Every sampler builds from its name; one seed draws the same trials, and the next worker's
    seed draws others (grid: one order for all workers, whose study hands each point out once)."""
    from nanogpt.config import SearchConfig
    from nanogpt.sweeps import search as engine
    from nanogpt.sweeps.space import distributions

    lr = {"choices": [1e-4, 1e-3, 1e-2]} if name == "grid" else {"low": 1e-4, "high": 1e-2, "log": True}
    settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SearchConfig), {
        "space": {"optim.lr": lr}, "sampler": {"name": name, "seed": 7}}))
    space = distributions(settings, compose("train", ["search=none"]), check=lambda config: None)

    def draws(worker: int) -> list:
        study = optuna.create_study(sampler=engine.sampler(settings, space, worker))
        return [study.ask(space).params["optim.lr"] for _ in range(3)]

    assert draws(0) == draws(0)
    if name != "grid":
        assert draws(0) != draws(1)
    else:
        assert sorted(draws(0)) == [1e-4, 1e-3, 1e-2]


def test_objectives_read_the_run_result():
    from nanogpt.config import Objective, SearchConfig
    from nanogpt.sweeps.search import objective_value

    result = {"best_val_loss": 1.5, "val_loss": 1.7, "target": {"step": 40, "tokens": 5120, "flops": 2e9,
                                                                 "train_seconds": 3.25}}
    expected = {"best_val_loss": 1.5, "final_val_loss": 1.7, "time_to_target": 3.25, "tokens_to_target": 5120,
                "flops_to_target": 2e9}
    for objective, value in expected.items():
        assert objective_value(SearchConfig(objective=Objective(objective)), result) == value
    # a run that never reached its target: the worst cost, not a failure
    assert objective_value(SearchConfig(objective=Objective.time_to_target), {**result, "target": None}) == float("inf")


@pytest.mark.parametrize("reask", [True, False])
def test_a_trial_whose_worker_died_is_failed_and_asked_again_by_config(tmp_path, reask):
    """recover() on a real journal study: a running trial with no live owner is marked failed; with
    search.reask_lost (the default) its params come back first, as a new trial that names it;
    without, the sampler picks the next trial. A trial whose run dir is owned is left running."""
    from nanogpt.config import SearchConfig
    from nanogpt.runs import runlock
    from nanogpt.sweeps import search as engine
    from nanogpt.sweeps.space import distributions

    settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SearchConfig), {
        "space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "reask_lost": reask}))
    space = distributions(settings, compose("train", ["search=none"]), check=lambda config: None)
    study_ = engine.open_study(settings, space, tmp_path, create=True)
    assert study_.metric_names == ["best_val_loss"]  # the objective's name, for the dashboard and plots
    dead, alive = study_.ask(space), study_.ask(space)
    lock = runlock.acquire(tmp_path / engine.trial_dir_name(alive.number))  # a live worker trains this one

    def busy(run_dir: Path) -> bool:
        try:
            runlock.check_free(run_dir)
        except runlock.RunDirBusy:
            return True
        return False

    try:
        assert engine.recover(study_, tmp_path, is_busy=busy, reask=settings.reask_lost) == [dead.number]
    finally:
        lock.release()
    trials = study(tmp_path).get_trials()
    assert [t.state.name for t in trials[:2]] == ["FAIL", "RUNNING"]
    waiting = [t for t in trials if t.state.name == "WAITING"]
    if reask:
        (retry,) = waiting
        assert retry.system_attrs["fixed_params"] == dead.params  # what the next ask() hands out
        assert retry.user_attrs["retry_of"] == dead.number
    else:
        assert waiting == []


def test_the_study_is_named_in_the_log_without_a_password(tmp_path):
    from nanogpt.config import SearchConfig
    from nanogpt.sweeps.search import where

    assert where(SearchConfig(), tmp_path) == str(tmp_path / "study.journal")
    assert where(SearchConfig(storage="sqlite:///search.db"), tmp_path) == "sqlite:///search.db"
    assert where(SearchConfig(storage="postgresql://bob:s3cr@t@db:5432/x"), tmp_path) == "postgresql://***@db:5432/x"


def test_a_dry_run_leaves_missing_data_unprepared(tmp_path):
    """A dry run writes nothing, the data cache included (FineWeb-Edu would be a long download):
    it says the first trial prepares the data, and counts FLOPs with the encoding's vocabulary."""
    require_shakespeare()
    missing = tmp_path / "not-prepared"
    result = search(tmp_path, missing, "search=lr_cpu", "search.dry_run=true", "data=shakespeare")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert f"data=shakespeare is not prepared in {missing}: the first trial will prepare it" in out
    assert "FLOPs for 30 trials" in out and "256 tokens" not in out  # gpt2's 50,257, known without the data
    assert not missing.exists() and not (tmp_path / "sweep").exists()
