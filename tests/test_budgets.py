"""Budgets (max_tokens, max_flops, max_time) end a run where they are spent, with the lr schedule's
horizon there; target_val_loss records the time to target, and stop_at_target ends the run at it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import SHAKESPEARE, TINY, assert_one_line_error, compose, require_shakespeare, run_cli
from nanogpt.config import seconds
from nanogpt.errors import ConfigError, UserError
from nanogpt.model import GPT
from nanogpt.optim import learning_rate, learning_rate_by_time
from nanogpt.runs import budgets
from nanogpt.runs.checkpoint import load_file
from nanogpt.runs.preflight import to_train_config

TOKENS_PER_STEP = 12 * 16  # TINY: batch_size 12 x block_size 16, one process


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("budgets")
    return cwd, [*TINY, f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}", "eval_interval=10", "log_interval=1"]


def train(workspace, name: str, *args: str) -> Path:
    cwd, base = workspace
    result = run_cli("nanogpt.train", *base, f"hydra.run.dir={name}", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / name


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def provenance(run_dir: Path) -> dict:
    return json.loads((run_dir / "provenance.json").read_text())


def tiny_config(*overrides: str):
    return to_train_config(compose("train", [*TINY, *overrides]))


def test_durations_parse_with_their_units():
    assert [seconds(d) for d in ("90", "90s", "1.5m", "2h", "1d", " 30S ")] == [90, 90, 90, 7200, 86400, 30]
    for bad in ("abc", "0", "-5s", "10x", "inf", "nan"):
        with pytest.raises(ConfigError, match="not a positive duration"):
            seconds(bad)


def test_a_token_or_flop_budget_resolves_to_the_last_whole_step_within_it():
    config = tiny_config("max_tokens=5000")
    assert budgets.resolve(config, TOKENS_PER_STEP, 1000.0).max_steps == 5000 // TOKENS_PER_STEP == 26
    config = tiny_config("max_flops=3e6")
    assert budgets.resolve(config, TOKENS_PER_STEP, 1000.0).max_steps == int(3e6 // (1000 * TOKENS_PER_STEP)) == 15
    with pytest.raises(UserError, match=r"max_tokens=100 is less than one optimizer step, which trains 192 tokens"):
        budgets.resolve(tiny_config("max_tokens=100"), TOKENS_PER_STEP, 1000.0)
    assert budgets.resolve(tiny_config(), TOKENS_PER_STEP, 1000.0) == budgets.Budget("max_iters", 2000, None, True)
    # a decay_iters set apart from max_iters is the user's: the budget ends the run, not the decay
    assert not budgets.resolve(tiny_config("max_tokens=5000", "optim.decay_iters=100"), TOKENS_PER_STEP, 1.0).decay_follows


def test_the_preflight_budget_counts_flops_as_mfu_does():
    """budgets.check builds the model on the meta device: the same FLOPs per token as the real one."""
    config = tiny_config("max_flops=1e9")
    real = GPT(replace(config.model, vocab_size=65)).flops_per_token(config.block_size)
    assert budgets.check(config, 65, 1).max_steps == int(1e9 // (real * TOKENS_PER_STEP))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_the_time_schedule_is_the_step_schedule_with_time_for_steps(schedule):
    """Under a time budget the decay follows the fraction of max_time spent as the step schedule
    follows step / decay_iters: at the same fractions, the same lr."""
    cfg = tiny_config(f"optim.schedule={schedule}", "optim.warmup_iters=20", "optim.decay_iters=200").optim
    for step in (0, 10, 19, 20, 50, 120, 170, 199, 200):
        by_time = learning_rate_by_time(step, step / 200, 20 / 200, cfg)
        assert by_time == pytest.approx(learning_rate(step, cfg), rel=1e-9, abs=1e-12), step
    assert learning_rate_by_time(500, 1.7, 0.1, cfg) == cfg.min_lr  # time over: min_lr, as past decay_iters


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["max_tokens", "max_flops"])
def test_a_budgeted_run_ends_at_its_exact_step_with_the_decay_there(workspace, budget):
    flops_per_token = GPT(replace(tiny_config().model, vocab_size=65)).flops_per_token(16)
    per_step = TOKENS_PER_STEP * (flops_per_token if budget == "max_flops" else 1)
    value = 26.5 * per_step  # half a step past 26: the run ends at step 26
    run_dir = train(workspace, budget, f"{budget}={value!r}", "optim.warmup_iters=5", "optim.min_lr=1e-5")

    trains = records(run_dir, "train")
    assert trains[-1]["step"] == 26 and records(run_dir, "eval")[-1]["step"] == 26
    assert trains[-1]["tokens"] == 26 * TOKENS_PER_STEP
    assert trains[-1]["flops"] == pytest.approx(26 * TOKENS_PER_STEP * flops_per_token)
    # the schedule's horizon is the budget's step, not max_iters=2000: the last step runs at the decay's end
    cfg = replace(tiny_config("optim.warmup_iters=5", "optim.min_lr=1e-5").optim, decay_iters=26)
    assert [r["lr"] for r in trains] == [learning_rate(r["step"] - 1, cfg) for r in trains]
    assert trains[-1]["lr"] < 2e-5
    assert provenance(run_dir)["ended_by"] == budget
    assert load_file(run_dir / "checkpoints" / "last.pt")["resume"]["decay_iters"] == 26


def assert_lr_followed_the_time(trains: list[dict], max_seconds: float) -> None:
    """Each step's lr is the cosine at the fraction of max_seconds trained before it (TINY has no
    warmup; every step is logged): the decay followed the time, whatever speed the machine ran at."""
    cfg = tiny_config().optim
    before = 0.0
    for record in trains:
        expected = learning_rate_by_time(record["step"] - 1, before / max_seconds, 0.0, cfg)
        # (seconds rounded to the millisecond move the cosine by at most ~3e-7 here)
        assert record["lr"] == pytest.approx(expected, rel=1e-3, abs=1e-6), record
        before = record["train_seconds"]


@pytest.mark.slow
def test_a_time_budget_ends_saves_and_a_bigger_one_continues_the_count(workspace):
    """The issue's max_time=30s then 60s, at a tenth of the scale (the full scale is in the closing note)."""
    run_dir = train(workspace, "timed", "max_time=3s", "eval_interval=1000000")
    first = provenance(run_dir)
    assert first["ended_by"] == "max_time" and first["status"] == "done"
    evals, trains = records(run_dir, "eval"), records(run_dir, "train")
    step = trains[-1]["step"]
    # ended after the step that spent the time (metrics.jsonl rounds seconds to the millisecond: 2.9996 reads 3.0)
    assert trains[-2]["train_seconds"] <= 3.0 <= trains[-1]["train_seconds"]
    assert evals[-1]["step"] == step  # evaluated at the end, and saved there
    assert load_file(run_dir / "checkpoints" / "last.pt")["step"] == step
    assert_lr_followed_the_time(trains, 3.0)

    train(workspace, "timed_resumed", f"resume={run_dir}", "max_time=6s")
    second = provenance(run_dir)
    trains = records(run_dir, "train")
    assert second["ended_by"] == "max_time" and len(second["resumes"]) == 1
    assert trains[-1]["step"] > step and trains[-2]["train_seconds"] <= 6.0 <= trains[-1]["train_seconds"]
    assert second["train_seconds"] == trains[-1]["train_seconds"]
    # the run kept the horizon it started with (3 s): the added time trains at min_lr
    assert {r["lr"] for r in trains if r["step"] > step} == {1e-4}


@pytest.mark.slow
def test_time_to_target_is_recorded_and_stop_at_target_ends_there(workspace):
    run_dir = train(workspace, "target", "max_iters=60", "target_val_loss=3.6")
    evals = records(run_dir, "eval")
    first = next(e for e in evals if e["val_loss"] <= 3.6)
    assert 0 < first["step"] < 60 and first["reached_target"] is True
    assert [e for e in evals if e.get("reached_target")] == [first]  # the first time only
    target = provenance(run_dir)["target"]
    assert target == {k: first[k] for k in ("step", "tokens", "flops", "train_seconds")}
    assert evals[-1]["step"] == 60 and provenance(run_dir)["ended_by"] == "max_iters"  # recorded, not stopped

    stopped = train(workspace, "stopped", "max_iters=60", "target_val_loss=3.6", "stop_at_target=true")
    assert records(stopped, "eval")[-1]["step"] == first["step"]
    assert provenance(stopped)["ended_by"] == "target"
    assert provenance(stopped)["target"]["step"] == first["step"]
    assert load_file(stopped / "checkpoints" / "last.pt")["step"] == first["step"]


@pytest.mark.slow
def test_two_processes_agree_on_the_time_and_end_together(workspace):
    run_dir = train(workspace, "timed_ddp", "hardware=ddp", "hardware.nproc_per_node=2", "batch_size=6",
                    "global_batch_size=12", "eval_iters=2", "max_time=2s", "eval_interval=1000000")
    record = provenance(run_dir)
    assert record["status"] == "done" and record["ended_by"] == "max_time"
    trains = records(run_dir, "train")
    assert 2.0 <= trains[-1]["train_seconds"] and records(run_dir, "eval")[-1]["step"] == trains[-1]["step"]


@pytest.mark.parametrize("args, fragments", [
    (["max_iters=100", "max_tokens=1e5"], ["max_iters and max_tokens both set the length of the run", "drop max_iters"]),
    (["max_tokens=1e5", "max_time=30s"], ["max_tokens=100000 and max_time=30s each end the run", "give one"]),
    (["max_flops=-1"], ["max_flops=-1 must be positive"]),
    (["max_time=soon"], ["max_time=soon is not a positive duration", "max_time=30m"]),
    (["max_tokens=100"], ["max_tokens=100 is less than one optimizer step, which trains 192 tokens", "raise max_tokens"]),
    (["stop_at_target=true"], ["stop_at_target=true needs a target", "target_val_loss"]),
    (["target_val_loss=0"], ["target_val_loss=0.0 must be a positive loss"]),
], ids=["max_iters beside a budget", "two budgets", "negative budget", "no duration", "under one step",
        "stop without a target", "zero target"])
def test_a_budget_mistake_gets_one_line_before_any_run_dir(workspace, tmp_path, args, fragments):
    _, base = workspace
    result = run_cli("nanogpt.train", *base, *args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.iterdir())


def test_max_iters_from_a_config_file_gives_way_to_a_budget():
    """An experiment's max_iters is the recipe's length: a budget on the command line replaces it;
    max_iters on the same command line asks for two lengths."""
    from nanogpt.runs.preflight import refuse_max_iters_beside_a_budget

    refuse_max_iters_beside_a_budget(compose("train", ["experiment=shakespeare_char", "max_tokens=1e6"], hydra=True))
    with pytest.raises(ConfigError, match="max_iters and max_tokens both set"):
        refuse_max_iters_beside_a_budget(compose("train", ["experiment=shakespeare_char", "max_tokens=1e6",
                                                           "max_iters=10"], hydra=True))
