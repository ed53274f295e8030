"""Which process owns a run dir, and which config a command runs there: one live owner per run
dir (run.lock), extensions that keep the keys derived from the ones they change, and previews
(--cfg job) that show what would run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SHAKESPEARE, TINY, assert_one_line_error, require_shakespeare, run_cli


def data_args(cwd: Path) -> list[str]:
    return [f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}", "eval_iters=1", "hardware.peak_flops=1e11"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def resolved(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.resolved.yaml").read_text())


@pytest.mark.slow
def test_a_second_start_in_a_live_run_dir_is_refused_and_the_first_ends_whole(tmp_path):
    require_shakespeare()
    args = [*data_args(tmp_path), "max_iters=60", "eval_interval=10", "hydra.run.dir=runs/x"]
    first = subprocess.Popen([sys.executable, "-m", "nanogpt.train", *args], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    for line in first.stdout:  # it trains: the dir is its own
        if line.startswith("iter 1:"):
            break
    run_dir = tmp_path / "runs" / "x"
    started_by_first = (run_dir / "provenance.json").read_bytes()

    again = run_cli("nanogpt.train", *args, cwd=tmp_path)
    line = assert_one_line_error(again)
    assert f"{run_dir} is in use by process {first.pid} on " in line and " since 20" in line, line
    assert "pick another hydra.run.dir" in line
    resumed = run_cli("nanogpt.train", "resume=runs/x", "max_iters=70", cwd=tmp_path)
    assert_one_line_error(resumed, f"is in use by process {first.pid}")

    first.stdout.read()
    assert first.wait(timeout=300) == 0
    steps = [m["step"] for m in metrics(run_dir) if m["kind"] == "train"]
    assert steps == list(range(1, 61))  # one process's metrics, each step once
    log = (run_dir / "train.log").read_text()
    assert log.count("run dir: ") == 1 and log.count("done: 60 steps") == 1  # one start, not two interleaved
    record = json.loads((run_dir / "provenance.json").read_text())
    assert record["pid"] == first.pid and record["status"] == "done" and "resumes" not in record
    assert json.loads(started_by_first)["start_time"] == record["start_time"]
    assert (run_dir / "run.lock").read_text() == ""  # released: no owner now

    # the owner is gone: the dir is free again, and the same command finds nothing to do
    after = run_cli("nanogpt.train", *args, cwd=tmp_path)
    assert after.returncode == 0 and "nothing to do" in after.stdout, after.stderr


def test_a_refused_start_leaves_no_run_dir_behind(tmp_path):
    """The lock is taken before anything is written; a start refused after it (here: the data is
    too short for the context) removes the dirs it made."""
    (tmp_path / "tiny.txt").write_text("to be or not to be " * 3)
    result = run_cli("nanogpt.train", "data=text", f"data.source={tmp_path / 'tiny.txt'}",
                     f"data.dir={tmp_path / 'cache'}", "hydra.run.dir=deep/er/run", cwd=tmp_path)
    assert_one_line_error(result, "block_size=64 needs more than 64 tokens")
    assert not (tmp_path / "deep").exists()


@pytest.mark.slow
def test_extending_twice_then_repeating_the_command_has_nothing_to_do(tmp_path):
    """optim.decay_iters (${max_iters}) is derived: it keeps the run's value and is no change of the user's."""
    require_shakespeare()
    args = [*data_args(tmp_path), *TINY, "eval_interval=2", "hydra.run.dir=runs/ext"]
    for max_iters in (4, 8, 8, 12):
        result = run_cli("nanogpt.train", *args, f"max_iters={max_iters}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to do: the run already reached max_iters=8" not in result.stdout
    config = resolved(tmp_path / "runs" / "ext")
    assert config["max_iters"] == 12 and config["optim"]["decay_iters"] == 4  # the schedule the run began with
    assert [m["step"] for m in metrics(tmp_path / "runs" / "ext") if m["kind"] == "train"] == list(range(1, 13))
    repeat = run_cli("nanogpt.train", *args, "max_iters=12", cwd=tmp_path)
    assert repeat.returncode == 0 and "nothing to do: the run already reached max_iters=12" in repeat.stdout
    # a derived key the user sets is the user's choice, and a change
    changed = run_cli("nanogpt.train", *args, "max_iters=12", "optim.decay_iters=6", cwd=tmp_path)
    assert_one_line_error(changed, "holds a run with optim.decay_iters=4, and this command sets 6")


@pytest.mark.slow
def test_a_finished_sweep_is_extended_by_a_longer_max_iters(tmp_path):
    require_shakespeare()
    sweep = ["--multirun", "seed=1,2", *data_args(tmp_path), *TINY, "eval_interval=2", "hydra.sweep.dir=S"]
    first = run_cli("nanogpt.train", *sweep, "max_iters=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    extended = run_cli("nanogpt.train", *sweep, "max_iters=4", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr[-2000:]
    for job in ("0", "1"):
        run_dir = tmp_path / "S" / job
        config = resolved(run_dir)
        assert config["max_iters"] == 4 and config["optim"]["decay_iters"] == 2
        assert [m["step"] for m in metrics(run_dir) if m["kind"] == "train"] == [1, 2, 3, 4]
        assert (run_dir / ".hydra" / "resume-1" / "config.yaml").is_file()  # the first snapshot is kept
        assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["max_iters"] == 2


@pytest.mark.slow
def test_the_preview_shows_the_config_a_continued_run_would_use(tmp_path):
    require_shakespeare()
    run_dir = tmp_path / "runs" / "r"
    trained = run_cli("nanogpt.train", *data_args(tmp_path), *TINY, "max_iters=2", "eval_interval=2",
                      f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    lock_before = (run_dir / "run.lock").stat().st_mtime_ns

    for command in (["resume=runs/r", "max_iters=6"], ["hydra.run.dir=runs/r", "max_iters=6", *data_args(tmp_path), *TINY]):
        shown = run_cli("nanogpt.train", *command, "--cfg", "job", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        config = yaml.safe_load(shown.stdout)
        assert config["max_iters"] == 6 and config["optim"]["decay_iters"] == 2
        assert config["model"]["n_layer"] == 1 and config["data"]["source"] == str(SHAKESPEARE)
    hydra_part = run_cli("nanogpt.train", "resume=runs/r", "--cfg", "hydra", "--package", "hydra.run", cwd=tmp_path)
    assert yaml.safe_load(hydra_part.stdout.split("\n", 1)[1]) == {"dir": str(run_dir.relative_to(tmp_path))}
    refused = run_cli("nanogpt.train", "resume=runs/r", "model.n_layer=2", "--cfg", "job", cwd=tmp_path)
    assert_one_line_error(refused, "model.n_layer=2 would change resume=runs/r")
    assert (run_dir / "run.lock").stat().st_mtime_ns == lock_before  # a preview takes no lock, writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]
    sweep_preview = run_cli("nanogpt.train", "-m", "seed=1,2", "--cfg", "job", cwd=tmp_path)
    assert_one_line_error(sweep_preview, "drop -m")


SIGNAL_DURING_STARTUP = """
import os, signal, sys
import nanogpt.train as train
build = train.build_training
def build_then_signal(*args, **kwargs):  # the job's warning signal comes while the model is built
    built = build(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGUSR2)
    return built
train.build_training = build_then_signal
sys.argv[0] = "nanogpt-train"
train.main()
"""


@pytest.mark.slow
def test_start_up_is_measured_and_a_stop_before_the_first_step_says_so(tmp_path):
    require_shakespeare()
    args = [*data_args(tmp_path), *TINY, "max_iters=2", "eval_interval=2"]
    done = run_cli("nanogpt.train", *args, "hydra.run.dir=runs/ok", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [l for l in (tmp_path / "runs/ok/train.log").read_text().splitlines() if "start-up: " in l]
    assert "s since the process started (interpreter and config " in line and line.endswith("; training starts")
    startup = json.loads((tmp_path / "runs/ok/provenance.json").read_text())["startup_seconds"]
    assert list(startup) == ["interpreter and config", "checks and data", "run dir", "model and optimizer",
                             "first evaluation", "total"]
    assert 0 < startup["total"] == pytest.approx(sum(v for k, v in startup.items() if k != "total"), abs=0.05)

    stopped = subprocess.run([sys.executable, "-c", SIGNAL_DURING_STARTUP, *args, "hydra.run.dir=runs/early"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == 128 + 12, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    warning = next(l for l in stopped.stdout.splitlines() if "before this start trained a step" in l)
    assert "stopped by SIGUSR2 before this start trained a step (start-up: " in warning
    assert "model and optimizer" in warning and "starts over from step 0" in warning
    assert "'Time limits and start-up'" in warning
    record = json.loads((tmp_path / "runs/early/provenance.json").read_text())
    assert record["status"] == "preempted" and record["startup_seconds"]["total"] > 0


def test_a_continued_run_keeps_config_keys_that_hold_a_dot():
    """A search's trial records its search.space, whose keys are config keys (optim.lr): continuing
    it (a requeued worker, resume=auto) keeps them as keys, with the command's RESUMABLE values.
    Before, the flat name search.space.optim.lr.low was walked back as search.space.optim.lr ->
    {lr: ...}, and the trial's resume failed with "Key 'lr' not in 'ParamSpace'"."""
    from omegaconf import OmegaConf

    from conftest import compose
    from nanogpt.runs.resume import continued_config

    snapshot = OmegaConf.to_container(compose("train", ["search=lr_cpu", "max_iters=100"]), resolve=True,
                                      enum_to_str=True)
    command = compose("train", ["search=lr_cpu", "max_iters=200"])
    command = OmegaConf.masked_copy(command, [k for k in command if k != "hydra"])
    continued = continued_config(snapshot, command, "runs/trial-0000")
    assert continued["max_iters"] == 200 and continued["optim"]["decay_iters"] == 100  # derived: the run's
    assert continued["search"]["space"] == snapshot["search"]["space"]
    assert "optim.lr" in continued["search"]["space"] and "optim" not in continued["search"]["space"]
