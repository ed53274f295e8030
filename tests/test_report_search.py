"""nanogpt-report on a search's sweep dir: the trials table read from the real study (a journal
file, or a SQLite database) joined with the trials' run dirs, the best trial's reproduce command
run for real, the plots, a search reported while it runs, and a machine without Optuna."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SHAKESPEARE, assert_one_line_error, report_rows, run_cli
from test_search import RUN, data_dir, search, space, steps_saved, study, trial_rows  # noqa: F401 (a fixture)

optuna = pytest.importorskip("optuna", reason="the search extra: pip install -e '.[search]'")

pytestmark = pytest.mark.slow  # each test reports a real search, made by its workers' processes

# Five trials, their values enqueued so that each state comes out of a real run: two complete
# (lr 3e-3 beats 1e-3), one pruned at its first evaluation by the median of those two (lr 1e-5
# barely moves), one failed (lr 1e4 makes the loss NaN within 3 steps, and on_nonfinite=stop
# fails the run), and a fifth to replace the failed one (failed trials do not count).
# Each trial ends at the step its token budget is spent: max_tokens=1280 is 20 steps of 4 x 16
# tokens, the plan that the table's steps and pruning's saving count from (max_iters gives way).
MIXED = ["search=none", "max_tokens=1280", "optim.warmup_iters=0", "optim.min_lr=0",
         space(optim__lr="{low: 1.0e-5, high: 1.0e+4, log: true}", model__dropout="{choices: [0.0, 0.1]}"),
         "search.n_trials=4", "search.n_workers=1", "search.sampler.name=random", "search.pruner.name=median",
         "search.pruner.n_startup_trials=2",
         "search.enqueue=[{optim.lr: 3.0e-3, model.dropout: 0.0}, {optim.lr: 1.0e-3, model.dropout: 0.1}, "
         "{optim.lr: 1.0e-5, model.dropout: 0.0}, {optim.lr: 1.0e+4, model.dropout: 0.0}, "
         "{optim.lr: 2.0e-3, model.dropout: 0.0}]"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, data_dir):  # noqa: F811
    """A real search whose trials end complete, pruned and failed; its report."""
    cwd = tmp_path_factory.mktemp("mixed")
    started = time.monotonic()
    run = [a for a in RUN if not a.startswith("max_iters=")]  # a budget and max_iters on one command: refused
    result = run_cli("nanogpt.train", "--multirun", *run, f"data.source={SHAKESPEARE}", f"data.dir={data_dir}",
                     f"hydra.sweep.dir={cwd / 'sweep'}", *MIXED, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = run_cli("nanogpt.sweeps.report", str(cwd / "sweep"), cwd=cwd)
    assert report.returncode == 0, report.stderr[-3000:]
    print(f"\n[duration] the mixed search and its report: {time.monotonic() - started:.1f} s")
    return cwd / "sweep", report.stdout


def test_the_trials_table_is_the_study_best_first_then_the_others_by_number(mixed):
    sweep_dir, stdout = mixed
    trials = {t.number: t for t in study(sweep_dir).get_trials()}
    states = {t.state.name for t in trials.values()}
    assert states == {"COMPLETE", "PRUNED", "FAIL"}, states  # each state this search was built to show
    complete = sorted((t for t in trials.values() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    others = sorted(n for n, t in trials.items() if t.state.name != "COMPLETE")
    rows = trial_rows(stdout)
    assert [int(r[0]) for r in rows] == [t.number for t in complete] + others
    words = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    for row in rows:
        t = trials[int(row[0])]
        run_dir = sweep_dir / f"trial-{t.number:04d}"
        last_step = max(r["step"] for r in records(run_dir))
        number, state, value, lr, dropout, steps, saved = row[:7]
        assert state == words[t.state.name]
        assert value == (f"{t.value:.4f}" if t.state.name == "COMPLETE" else "-")
        assert (lr, dropout) == (f"{t.params['optim.lr']:.4g}", f"{t.params['model.dropout']:.4g}")
        assert steps == f"{last_step} of 20"  # what the run dir logged, of the step max_tokens ends at
        assert saved == (str(20 - last_step) if t.state.name == "PRUNED" else "-")
    # the CSV: the same trials in the same order, at full precision
    with open(sweep_dir / "report_trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in table] == [int(r[0]) for r in rows]
    for r in table:
        t = trials[int(r["trial"])]
        assert float(r["optim.lr"]) == t.params["optim.lr"] and float(r["model.dropout"]) == t.params["model.dropout"]
        assert (float(r["value"]) if r["value"] else None) == (t.value if t.state.name == "COMPLETE" else None)
    # the run-dir table follows, and a search's pruned and failed trials are not "not done"
    assert len(report_rows(stdout)) == len(trials)
    assert "not done:" not in stdout and "each setting ran once" not in stdout


def test_pruning_saved_counts_the_pruned_trials_only(mixed):
    """The line's steps are the pruned trials' planned ends (max_tokens' step) minus where they stopped;
    its share is of what all five trials would have run without pruning."""
    sweep_dir, stdout = mixed
    trials = study(sweep_dir).get_trials()
    last = {t.number: max(r["step"] for r in records(sweep_dir / f"trial-{t.number:04d}")) for t in trials}
    saved = sum(20 - last[t.number] for t in trials if t.state.name == "PRUNED")
    assert steps_saved(stdout) == saved > 0
    assert f"pruning saved {saved} steps ({100 * saved / (saved + sum(last.values())):.0f}% of " in stdout


def test_the_best_trial_command_trains_it_again_with_the_same_losses(mixed, tmp_path):
    """The report's best trial is the study's, and its reproduce command, run as printed, logs the
    trial's val losses bit for bit (CPU, the same thread count) in a fresh run dir."""
    sweep_dir, stdout = mixed
    best = study(sweep_dir).best_trial
    (line,) = [line for line in stdout.splitlines() if line.startswith("best: ")]
    assert line.startswith(f"best: trial {best.number}, best_val_loss {best.value:.4f}: ")
    assert f"optim.lr={best.params['optim.lr']!r}" in line
    (command,) = [line.removeprefix("reproduce it: ") for line in stdout.splitlines()
                  if line.startswith("reproduce it: ")]
    words = shlex.split(command)
    assert words[0] == "OMP_NUM_THREADS=1" and words[1] == "nanogpt-train", command
    started = time.monotonic()
    again = subprocess.run([sys.executable, "-m", "nanogpt.train", *words[2:], f"hydra.run.dir={tmp_path / 'again'}"],
                           cwd=sweep_dir.parent, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": words[0].split("=")[1]})
    print(f"\n[duration] the reproduce command: {time.monotonic() - started:.1f} s")
    assert again.returncode == 0, again.stderr[-3000:]

    def evals(run_dir: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["val_loss"]) for r in records(run_dir) if r.get("kind") == "eval"]

    trial_dir = sweep_dir / f"trial-{best.number:04d}"
    assert evals(tmp_path / "again") == evals(trial_dir)
    assert min(loss for step, loss in evals(tmp_path / "again") if step > 0) == best.value


def test_the_history_and_parameter_plots_are_written(mixed):
    sweep_dir, stdout = mixed
    for name in ("report_history.png", "report_params.png"):
        png = (sweep_dir / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
        assert name in stdout.splitlines()[-1]  # named in the list of what was written


def test_without_optuna_the_run_dirs_are_still_reported(mixed, tmp_path):
    """A sweep dir with a study, on a machine without the search extra: one line says what to
    install, and the run-dir tables print as for any sweep (exit 0)."""
    import shutil

    sweep_dir, _ = mixed
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("report*"))
    no_optuna = "import sys; sys.modules['optuna'] = None; from nanogpt.sweeps.report import main; main()"
    result = subprocess.run([sys.executable, "-c", no_optuna, str(copy)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optuna is not installed here: pip install 'nanogpt[search]'" in result.stdout
    assert len(report_rows(result.stdout)) == len(list(copy.glob("trial-*")))
    assert "| trial | state " not in result.stdout and not (copy / "report_trials.csv").exists()


def test_a_damaged_journal_is_one_line_naming_it(mixed, tmp_path):
    import shutil

    sweep_dir, _ = mixed
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy, ignore=shutil.ignore_patterns("report*"))
    lines = (copy / "study.journal").read_text().splitlines(keepends=True)
    lines[4] = '{"op_code": 5, "cut\n'  # a line in the middle: not a write that a kill cut short
    (copy / "study.journal").write_text("".join(lines))
    result = run_cli("nanogpt.sweeps.report", str(copy), cwd=tmp_path)
    assert_one_line_error(result, f"{copy / 'study.journal'} is not an Optuna journal that can be read",
                          "restore it from a copy")
    assert not list(copy.glob("report*"))  # nothing written


def test_a_running_search_lists_its_running_trial(tmp_path, data_dir):  # noqa: F811
    """Reported while a trial trains: the trial is listed as running, with the steps it has logged
    so far of its planned ones, and the report says how to continue the search."""
    started = time.monotonic()
    sweep_dir = tmp_path / "sweep"
    args = ["search=none", "max_iters=100000", "eval_interval=5", space(optim__lr="{low: 1.0e-4, high: 1.0e-2}"),
            "search.n_trials=2", "search.n_workers=1", "search.pruner.name=none"]
    command = [sys.executable, "-m", "nanogpt.train", "--multirun", *RUN,
               f"data.source={SHAKESPEARE}", f"data.dir={data_dir}", f"hydra.sweep.dir={sweep_dir}", *args]
    driver = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        metrics = sweep_dir / "trial-0000" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):  # past its first evals
            assert time.monotonic() < deadline and driver.poll() is None, "the search did not get going"
            time.sleep(0.2)
        result = run_cli("nanogpt.sweeps.report", str(sweep_dir), cwd=tmp_path)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = trial_rows(result.stdout)
    assert row[:3] == ["0", "running", "-"]
    steps, planned = row[4].split(" of ")
    assert int(steps) >= 5 and planned == "100000"
    assert float(row[6]) > 0  # wall time so far
    assert "best: none yet" in result.stdout and "pruning saved nothing" in result.stdout
    hint = result.stdout.strip().splitlines()[-1]
    assert hint.startswith("not done: 0 of 2 trials finished; to continue the search: nanogpt-train --multirun ")
    assert hint.endswith(f"hydra.sweep.dir={sweep_dir}")
    print(f"\n[duration] the running search and its report: {time.monotonic() - started:.1f} s")


def test_a_study_in_a_sqlite_database_is_read_from_the_url_multirun_yaml_records(tmp_path, data_dir):  # noqa: F811
    """search.storage=sqlite:///search.db (relative to the command's dir): the report, run from
    elsewhere, finds the database through the sweep dir's multirun.yaml and lists its trials."""
    started = time.monotonic()
    cwd = tmp_path / "here"
    cwd.mkdir()
    result = search(cwd, data_dir, "search=none", "max_iters=5", space(optim__lr="{choices: [1.0e-3, 3.0e-3]}"),
                    "search.n_trials=2", "search.n_workers=1", "search.pruner.name=none", "search.sampler.name=grid",
                    "search.storage=sqlite:///search.db")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (cwd / "search.db").is_file() and not (cwd / "sweep" / "study.journal").exists()
    report = run_cli("nanogpt.sweeps.report", str(cwd / "sweep"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    trials = optuna.load_study(study_name="search", storage=f"sqlite:///{cwd / 'search.db'}").get_trials()
    rows = trial_rows(report.stdout)
    assert [int(r[0]) for r in rows] == [t.number for t in sorted(trials, key=lambda t: t.value)]
    assert {r[1] for r in rows} == {"complete"}
    print(f"\n[duration] the SQLite search and its report: {time.monotonic() - started:.1f} s")
