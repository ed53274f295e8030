"""nanogpt-dashboard (docs/search.md, "Watching a search"): optuna-dashboard over a search's study,
found from its sweep dir. Must-show 6: the dashboard serves the study, and its HTTP API on
localhost holds the trials with their states, params and reported val losses.

The studies are real Optuna studies, made as a search's driver makes them (the sweep dir's
multirun.yaml by launcher.make_sweep_dir, the study by search.open_study) and filled by real
ask-and-tell, without training; tests/test_search.py trains real trials into such studies. The
dashboard is a real server process, asked over real HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, compose, run_cli

optuna = pytest.importorskip("optuna", reason="the search extra: pip install -e '.[search]'")
pytest.importorskip("optuna_dashboard", reason="the search extra: pip install -e '.[search]'")

# (state, val losses it reports at steps 50, 100, ...) of each trial, in the order they are asked
TRIALS = [("complete", [3.1, 2.6, 2.4]), ("complete", [3.0, 2.5, 2.2]), ("pruned", [3.9]), ("failed", []),
          ("complete", [3.2, 2.9, 2.8]), ("running", [3.3])]


def make_search(sweep_dir: Path, *overrides: str) -> tuple["optuna.Study", list[dict]]:
    """A search=lr_cpu sweep dir as its driver leaves it, with TRIALS told to its study. Returns the
    study and each trial's number, state, params and reported values."""
    from optuna.trial import TrialState

    from nanogpt.runs.preflight import to_train_config
    from nanogpt.sweeps import launcher, search, space

    config = compose("train", ["search=lr_cpu", f"hydra.sweep.dir={sweep_dir}", *overrides], hydra=True)
    launcher.make_sweep_dir(config)  # multirun.yaml, with search.storage and the dir the search ran in
    settings = to_train_config(config).search
    # the space's values are not trained here, so the per-value config checks are skipped
    distributions = space.distributions(settings, config, check=lambda _: None)
    study = search.open_study(settings, distributions, sweep_dir, create=True)
    told = []
    for state, losses in TRIALS:
        trial = study.ask(distributions)
        for i, loss in enumerate(losses):
            trial.report(loss, 50 * (i + 1))
        if state == "complete":
            study.tell(trial, min(losses))
        elif state in ("pruned", "failed"):
            study.tell(trial, state=TrialState.PRUNED if state == "pruned" else TrialState.FAIL)
        told.append({"number": trial.number, "state": state, "params": trial.params, "losses": losses})
    return study, told


class Dashboard:
    """nanogpt-dashboard <sweep dir> --port 0 in a subprocess, with the lines it printed before serving."""

    def __init__(self, sweep_dir: Path, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "nanogpt.sweeps.dashboard", str(sweep_dir), "--port", "0"],
                                     cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = []
        for line in self.proc.stdout:  # it prints its address once it listens, and serves after the last line
            self.lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C"):
                break
        else:
            raise AssertionError(f"nanogpt-dashboard exited {self.proc.wait()}: {self.proc.stderr.read()}")
        self.page = next(line.split()[1] for line in self.lines if line.startswith("dashboard: "))
        self.root = self.page.split("/dashboard/")[0]

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.root + path, timeout=30) as response:
            return response.status, response.read().decode()

    def api(self, path: str) -> dict:
        return json.loads(self.get(path)[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def dashboard():
    started = []

    def start(sweep_dir: Path, cwd: Path) -> Dashboard:
        started.append(Dashboard(sweep_dir, cwd))
        return started[-1]

    yield start
    for d in started:
        d.stop()


def assert_serves(d: Dashboard, told: list[dict]) -> None:
    """The study, as the dashboard's API gives it, holds the told trials: states, params, values."""
    (summary,) = d.api("/api/studies")["study_summaries"]
    assert summary["study_name"] == "search" and summary["directions"] == ["minimize"]
    study_id = summary["study_id"]
    assert d.page.endswith(f"/dashboard/studies/{study_id}")  # the printed address is this study's page
    status, html = d.get(f"/dashboard/studies/{study_id}")
    assert status == 200 and "<html" in html.lower()
    detail = d.api(f"/api/studies/{study_id}")
    trials = sorted(detail["trials"], key=lambda t: t["number"])
    states = {"complete": "Complete", "pruned": "Pruned", "failed": "Fail", "running": "Running"}
    assert [(t["number"], t["state"]) for t in trials] == [(t["number"], states[t["state"]]) for t in told]
    for served, mine in zip(trials, told):
        assert {p["name"]: p["param_internal_value"] for p in served["params"]} == pytest.approx(mine["params"])
        assert [(v["step"], v["value"]) for v in served["intermediate_values"]] == [
            (50 * (i + 1), pytest.approx(loss)) for i, loss in enumerate(mine["losses"])]
        if mine["state"] == "complete":
            assert served["values"] == [pytest.approx(min(mine["losses"]))]
    best = min((t for t in told if t["state"] == "complete"), key=lambda t: min(t["losses"]))
    assert [t["number"] for t in detail["best_trials"]] == [best["number"]]
    assert told[0]["params"] == {"optim.lr": 1e-3, "optim.warmup_iters": 100, "optim.weight_decay": 0.1}  # enqueued


def test_serves_the_study_in_the_sweep_dirs_journal(tmp_path, dashboard):
    """Must-show 6: the journal in the sweep dir, served; the API finds every trial as it was told,
    and a trial told after the server started shows up on the next request (a running search)."""
    sweep_dir = tmp_path / "multirun" / "2026-12-01" / "10-00-00"
    study, told = make_search(sweep_dir)
    d = dashboard(sweep_dir, cwd=tmp_path)
    assert d.lines[0] == f"study: {sweep_dir / 'study.journal'}: 6 trials (3 complete, 1 pruned, 1 failed, 1 running)"
    assert d.lines[2].startswith("from another machine: ssh -N -L ")
    assert_serves(d, told)
    study.tell(told[-1]["number"], 2.0)  # the running trial ends while the dashboard serves
    deadline = time.monotonic() + 30  # the dashboard keeps a study's trials for 2 s before it reads them again
    while True:
        detail = d.api("/api/studies/0")
        (last,) = [t for t in detail["trials"] if t["number"] == told[-1]["number"]]
        if last["state"] != "Running" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert last["state"] == "Complete" and last["values"] == [2.0]
    assert [t["number"] for t in detail["best_trials"]] == [told[-1]["number"]]


def test_finds_a_relative_sqlite_storage_from_multirun_yaml(tmp_path, dashboard, monkeypatch):
    """search.storage=sqlite:///search.db: the study is in the dir the search ran in, which
    multirun.yaml records; the dashboard, started from another dir, serves it from there and makes
    no empty database where it runs."""
    ran_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    ran_in.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(ran_in)
    sweep_dir = ran_in / "sweep"
    _, told = make_search(sweep_dir, "search.storage=sqlite:///search.db")
    assert (ran_in / "search.db").is_file() and not (sweep_dir / "study.journal").exists()
    d = dashboard(sweep_dir, cwd=elsewhere)
    assert d.lines[0].startswith(f"study: sqlite:///{ran_in / 'search.db'}: 6 trials")
    assert_serves(d, told)
    assert list(elsewhere.iterdir()) == []


def test_mistakes_are_one_line_each(tmp_path):
    """A file, a dir without a study, a damaged journal, a grid sweep's dir, a moved sqlite database,
    a bad port, a port in use: one line each, exit status 2, and nothing written."""
    study_dir = tmp_path / "search"
    make_search(study_dir)
    (tmp_path / "empty").mkdir()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    journal = (study_dir / "study.journal").read_text().splitlines(keepends=True)
    (damaged / "study.journal").write_text(journal[0] + "{cut off by a full dis\n" + "".join(journal[1:]))
    grid = tmp_path / "grid"
    from nanogpt.sweeps import launcher

    launcher.make_sweep_dir(compose("train", [f"hydra.sweep.dir={grid}"], hydra=True))
    moved = tmp_path / "moved"
    (tmp_path / "run-here").mkdir()
    launcher.make_sweep_dir(compose("train", ["search=lr_cpu", f"hydra.sweep.dir={moved}",
                                              "search.storage=sqlite:///gone.db"], hydra=True))
    before = sorted(tmp_path.rglob("*"))

    def dashboard_says(*args: str, fragments: tuple[str, ...]) -> None:
        assert_one_line_error(run_cli("nanogpt.sweeps.dashboard", *args, cwd=tmp_path / "run-here"), *fragments)

    dashboard_says(str(study_dir / "study.journal"), fragments=("is not a dir", "give a search's sweep dir"))
    dashboard_says(str(tmp_path / "empty"), fragments=("holds no study", "no study.journal", "search=NAME"))
    dashboard_says(str(damaged), fragments=(f"{damaged / 'study.journal'} is not an Optuna journal", "restore it"))
    dashboard_says(str(grid), fragments=("is the dir of a grid sweep", f"nanogpt-report {grid}"))
    dashboard_says(str(moved), fragments=("search.storage=sqlite:///gone.db", "does not exist"))
    dashboard_says(str(study_dir), "--port", "70000", fragments=("--port 70000 is not a port",))
    dashboard_says(str(study_dir), "--port", "eight", fragments=("invalid int value: 'eight'", "--help"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        dashboard_says(str(study_dir), "--port", port, fragments=(f"port {port} on 127.0.0.1 is in use", "--port 0"))
    assert sorted(tmp_path.rglob("*")) == before


def test_without_optuna_dashboard_it_says_what_to_install(tmp_path):
    """The search extra not installed: one line naming the pip command, before anything else."""
    make_search(tmp_path / "sweep")
    # sys.modules[name] = None makes `import name` raise ImportError, as an absent package does
    code = ("import sys; sys.modules['optuna_dashboard'] = None\n"
            "from nanogpt.sweeps.dashboard import main\n"
            f"main([{str(tmp_path / 'sweep')!r}])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_line_error(result, "optuna-dashboard, which is not installed", "pip install 'nanogpt[search]'")
