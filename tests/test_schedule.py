"""The learning-rate schedule against the run's length: a warmup or a decay that does not fit in
max_iters is warned about, once, in the run's log, before it trains (and in each job of a sweep)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, compose, run_cli
from nanogpt.optim import schedule_warnings
from nanogpt.runs.preflight import to_train_config

EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
# a tiny model with the default optimizer (warmup_iters=100): what the warnings are about
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "eval_iters=1",
        "hardware=cpu", "hardware.peak_flops=1e11", "save_checkpoints=false"]


def warnings_for(*overrides: str) -> list[str]:
    config = to_train_config(compose("train", list(overrides)))
    return schedule_warnings(config.optim, config.max_iters)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_fits_its_schedule_in_its_run(experiment):
    assert warnings_for(f"experiment={experiment}") == []


@pytest.mark.parametrize("overrides", [
    [],  # the default recipe: 100 warmup steps, cosine to step 2000
    ["max_iters=101", "optim.decay_iters=100"],  # the decay ends with the run's last step
    ["max_iters=8", "optim.warmup_iters=0", "optim.decay_iters=4"],  # extended past its decay: min_lr, by design
    ["optim=adamw_constant", "max_iters=3"],
    ["optim=muon", "max_iters=30"],
], ids=["default", "decay-at-the-end", "extended", "constant", "wsd"])
def test_schedules_that_fit_are_not_warned_about(overrides):
    assert warnings_for(*overrides) == []


def test_a_warmup_longer_than_the_run_is_named_with_the_lr_it_reaches():
    (warning,) = warnings_for("max_iters=30")
    assert warning.startswith("optim.warmup_iters=100 is not shorter than the run (max_iters=30): the lr never "
                              "reaches optim.lr=0.001 and ends at 0.000297 (30% of it)")
    assert "set optim.warmup_iters below max_iters (e.g. optim.warmup_iters=1" in warning


@pytest.mark.parametrize("overrides, expected", [
    (["optim.decay_iters=50"], "optim.decay_iters=50 ends the decay no later than the warmup of optim.warmup_iters=100: "
                               "the lr climbs towards optim.lr=0.001, then drops at once to optim.min_lr=0.0001 at iter 101"),
    (["optim=muon", "optim.warmup_iters=100", "max_iters=150"],
     "optim.decay_iters=150 starts its cooldown (the last optim.cooldown_fraction=0.4 of it) at step 90, before the "
     "warmup of optim.warmup_iters=100 ends: the lr climbs towards optim.lr=0.003, then drops at once to 0.0025 at "
     "iter 101; set optim.decay_iters to at least 167"),
    (["optim.decay_iters=5000"], "optim.decay_iters=5000 is beyond the run's end (max_iters=2000): the lr never decays "
                                 "to optim.min_lr=0.0001 and ends at 0.000706; set optim.decay_iters=2000"),
], ids=["cosine-decay-inside-warmup", "wsd-cooldown-inside-warmup", "decay-beyond-the-run"])
def test_a_decay_that_does_not_fit_is_named(overrides, expected):
    (warning,) = warnings_for(*overrides)
    assert warning.startswith(expected), warning


def test_a_run_shorter_than_its_warmup_warns_once_in_its_log_before_training(tmp_path, shakespeare_path):
    result = run_cli("nanogpt.train", f"data.source={shakespeare_path}", f"data.dir={tmp_path / 'data'}", *TINY,
                     "max_iters=30", "eval_interval=30", "log_interval=30", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = "optim.warmup_iters=100 is not shorter than the run (max_iters=30)"
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count(expected) == 1 and (result.stdout + result.stderr).count(expected) == 1
    assert log.index(expected) < log.index("step 0: train loss")
    assert "[WARNING]" in next(line for line in log.splitlines() if expected in line)


@pytest.mark.slow
def test_each_job_of_a_sweep_over_lr_warns_in_its_own_log(tmp_path, shakespeare_path):
    result = run_cli("nanogpt.train", "--multirun", f"data.source={shakespeare_path}", f"data.dir={tmp_path / 'data'}",
                     *TINY, "max_iters=2", "eval_interval=2", "optim.lr=1e-3,2e-3", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logs = sorted((tmp_path / "sweep").glob("*/train.log"))
    assert len(logs) == 2
    for log, lr in zip(logs, ("0.001", "0.002")):
        assert log.read_text().count(f"optim.warmup_iters=100 is not shorter than the run (max_iters=2): the lr never "
                                     f"reaches optim.lr={lr} and ends at") == 1, log


@pytest.mark.slow
def test_a_resumed_run_is_not_warned_again(tmp_path, shakespeare_path):
    """Its first start warned in the same log; the continued run keeps that schedule."""
    args = [f"data.source={shakespeare_path}", f"data.dir={tmp_path / 'data'}", *TINY, "save_checkpoints=true",
            "eval_interval=2", "hydra.run.dir=run"]
    first = run_cli("nanogpt.train", *args, "max_iters=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    extended = run_cli("nanogpt.train", *args, "max_iters=4", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr
    assert "resuming from" in extended.stdout + extended.stderr
    assert (tmp_path / "run" / "train.log").read_text().count("optim.warmup_iters=100 is not shorter") == 1
    assert "optim.warmup_iters" not in extended.stdout + extended.stderr
