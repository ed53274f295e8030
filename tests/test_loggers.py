"""The trackers beside metrics.jsonl, read back through their own libraries: TensorBoard's event
reader, and MlflowClient against a real `mlflow server` on localhost that these tests start. A run
and its resume after a kill are one tracker run with every step once; bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SHAKESPEARE, TINY, Training, assert_one_line_error, require_shakespeare, run_cli

pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install -e '.[dev]'")
pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install -e '.[dev]'")

CHECKPOINT_AT = 100  # the killed runs' checkpoint; the kill comes between it and the next one, at END
END = 2 * CHECKPOINT_AT
TIMINGS = ("ms_per_iter", "tokens_per_s", "mfu", "mfu_capped", "train_seconds", "peak_flops")  # differ run to run


def train_args(data_dir: Path, run_dir: str, *more: str) -> list[str]:
    return [f"data.source={SHAKESPEARE}", f"data.dir={data_dir}", *TINY, f"max_iters={END}",
            f"eval_interval={CHECKPOINT_AT}", "log_interval=1", f"hydra.run.dir={run_dir}", *more]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """tiny Shakespeare, prepared once for the module."""
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("data")
    result = run_cli("nanogpt.prepare", f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "data"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as trackers get it: tag <kind>/<name> -> [(step, value)], numbers only."""
    series: dict[str, list] = {}
    for r in records(run_dir):
        for key, value in r.items():
            if key not in ("step", "kind", "time") and isinstance(value, (int, float)):
                series.setdefault(f"{r['kind']}/{key}", []).append((r["step"], float(value)))
    return series


def checkpoint_step(run_dir: Path) -> int:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]


def kill_after_checkpoint(run: Training, run_dir: Path, logged: callable) -> None:
    """SIGKILL the run once it saved step CHECKPOINT_AT and logged(step) is true of a later step:
    a killed run whose tracker holds steps that its resume trains again."""
    step_file = run_dir / "checkpoints" / f"step-{CHECKPOINT_AT:08d}.pt"
    deadline = time.monotonic() + 300
    while not (step_file.exists() and logged()):
        assert run.proc.poll() is None and time.monotonic() < deadline, run.finish() and run.output
        time.sleep(0.05)  # logged() may ask the MLflow server: not so often that it slows the run
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    assert checkpoint_step(run_dir) == CHECKPOINT_AT, "killed after the next checkpoint: nothing left to resume over"


# --- TensorBoard -----------------------------------------------------------------------------------


def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows of a dir (or one event file): tag -> [(step, value)] by its own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_float32(series: dict) -> dict:
    """TensorBoard keeps scalars as float32."""
    import numpy as np

    return {tag: [(step, float(np.float32(v))) for step, v in points] for tag, points in series.items()}


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_jsonl(data_dir, tmp_path):
    result = run_cli("nanogpt.train", *train_args(data_dir, "run", "max_iters=30", "eval_interval=10",
                                                  "logger=tensorboard"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    shown = scalars(run_dir / "tensorboard")
    assert shown == as_float32(expected_series(run_dir))
    assert [step for step, _ in shown["eval/val_loss"]] == [0, 10, 20, 30]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"n_embd": 32' in config_text and '"activation": "gelu"' in config_text


@pytest.mark.slow
def test_tensorboard_killed_and_resumed_run_shows_every_step_once(data_dir, tmp_path):
    args = train_args(data_dir, "run", "logger=tensorboard")
    run_dir = tmp_path / "run"
    run = Training(tmp_path, *args)
    # 30 train records past the checkpoint: well over the event writer's 8 KB file buffer, so on disk
    kill_after_checkpoint(run, run_dir, lambda: records(run_dir)[-1]["step"] >= CHECKPOINT_AT + 30)
    [killed_file] = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert max(step for step, _ in scalars(killed_file)["train/loss"]) > CHECKPOINT_AT  # the killed run's extra steps

    result = run_cli("nanogpt.train", *args, cwd=tmp_path)  # the same command: resumes from step 100
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one dir, one TensorBoard run
    shown = scalars(run_dir / "tensorboard")
    assert [step for step, _ in shown["train/loss"]] == list(range(1, END + 1))  # every step once
    assert shown == as_float32(expected_series(run_dir))  # the resumed run's values, where both logged a step


# --- MLflow -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free localhost port, with a SQLite store; its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"mlflow server did not come up: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    os.killpg(server.pid, signal.SIGTERM)  # the server and its workers (its own session: only them)
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:  # it waits for idle keep-alive connections: the tests are done with it
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of an MLflow run as MLflow holds it: key -> [(step, value)] in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


def assert_one_mlflow_run_per_step(uri: str, experiment: str, run_dir: Path):
    """One FINISHED MLflow run of run_dir, holding each metric of metrics.jsonl at each of its steps
    once, with its values (timings: the steps only; a killed run's own timings may stand for steps
    its resume trained again), and the resolved config as params."""
    from nanogpt.runs.loggers import flat_params

    [run] = mlflow_runs(uri, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["nanogpt.run_dir"] == str(run_dir.absolute())
    held, expected = history(uri, run.info.run_id), expected_series(run_dir)
    assert held.keys() == expected.keys()
    for key, points in expected.items():
        if key.split("/")[1] in TIMINGS:
            assert [s for s, _ in held[key]] == [s for s, _ in points], key
        else:
            assert held[key] == points, key
    assert run.data.params == flat_params(yaml.safe_load((run_dir / "config.resolved.yaml").read_text()))
    return run


@pytest.mark.slow
def test_mlflow_run_and_its_resume_after_a_kill_are_one_run_with_every_metric_once(data_dir, tmp_path, mlflow_server):
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    # credentials in the environment, as MLflow reads them: they reach neither the run dir nor MLflow
    secrets = {"MLFLOW_TRACKING_USERNAME": f"u{uuid.uuid4().hex}", "MLFLOW_TRACKING_PASSWORD": uuid.uuid4().hex}
    os.environ.update(secrets)  # Training passes os.environ on
    try:
        args = train_args(data_dir, "run", "logger=mlflow", f"logger.tracking_uri={mlflow_server}",
                          f"logger.project={experiment}", "logger.tags=[tiny]")
        run_dir = tmp_path / "run"
        run = Training(tmp_path, *args)

        def sent_past_checkpoint() -> bool:
            from mlflow.tracking import MlflowClient

            runs = mlflow_runs(mlflow_server, experiment)
            losses = MlflowClient(mlflow_server).get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
            return max((m.step for m in losses), default=0) > CHECKPOINT_AT

        kill_after_checkpoint(run, run_dir, sent_past_checkpoint)
        result = run_cli("nanogpt.train", *args, cwd=tmp_path)  # resumes from step 100, logs 101.. again
        assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr
    finally:
        for key in secrets:
            os.environ.pop(key)
    run = assert_one_mlflow_run_per_step(mlflow_server, experiment, run_dir)
    assert [s for s, _ in history(mlflow_server, run.info.run_id)["train/loss"]] == list(range(1, END + 1))
    assert run.data.tags["tiny"] == "true"
    stored = json.dumps({"params": run.data.params, "tags": run.data.tags})
    for path in (p for p in run_dir.rglob("*") if p.is_file()):
        assert not any(v.encode() in path.read_bytes() for v in secrets.values()), path
    assert not any(v in stored for v in secrets.values())


@pytest.mark.slow
def test_wandb_tensorboard_and_mlflow_at_once(data_dir, tmp_path):
    """logger=[...] turns each on; MLflow's default store is a SQLite file in the run dir."""
    result = run_cli("nanogpt.train", *train_args(data_dir, "run", "max_iters=20", "eval_interval=10",
                                                  "logger=[wandb,tensorboard,mlflow]", "logger.mode=offline"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    assert scalars(run_dir / "tensorboard") == as_float32(expected_series(run_dir))
    assert_one_mlflow_run_per_step(f"sqlite:///{run_dir / 'mlflow.db'}", "nanogpt", run_dir)
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside the run dir


# --- bad input: one line, before the run dir ------------------------------------------------------


def test_an_mlflow_server_that_does_not_answer_is_one_line_before_training(data_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    result = run_cli("nanogpt.train", *train_args(data_dir, "run", "logger=mlflow", f"logger.tracking_uri={url}"),
                     cwd=tmp_path)
    assert_one_line_error(result, f"the MLflow server at {url} does not answer", "logger.tracking_uri=null")
    assert not (tmp_path / "run").exists()


def test_a_tracking_uri_with_a_password_is_refused_without_showing_it(data_dir, tmp_path):
    password = uuid.uuid4().hex
    result = run_cli("nanogpt.train", *train_args(data_dir, "run", "logger=mlflow",
                                                  f"logger.tracking_uri=http://me:{password}@127.0.0.1:5000"), cwd=tmp_path)
    assert_one_line_error(result, "holds a password", "MLFLOW_TRACKING_PASSWORD", "http://***@127.0.0.1:5000")
    assert password not in result.stdout + result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("tracker, extra", [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_tracker_package_names_the_install(data_dir, tmp_path, tracker, extra):
    # sys.modules[name] = None is Python's own way to make a package unimportable
    code = (f"import sys; sys.modules[{extra!r}] = None; sys.argv[0] = 'nanogpt-train'; "
            f"from nanogpt.train import main; main()")
    result = subprocess.run([sys.executable, "-c", code, *train_args(data_dir, "run", f"logger={tracker}")],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert_one_line_error(result, f"logger.{tracker}=true needs the {extra} package", f"pip install 'nanogpt[{extra}]'")
    assert not (tmp_path / "run").exists()


# --- run dirs from before the switches ------------------------------------------------------------


@pytest.mark.slow
def test_a_run_from_before_the_switches_resumes_and_reproduces_with_its_logger(data_dir, tmp_path):
    """A run dir whose config says logger.name: wandb (as every run did before logger=[...]) is
    continued and reproduced with logger.wandb=true."""
    result = run_cli("nanogpt.train", *train_args(data_dir, "old", "max_iters=2", "eval_interval=2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for snapshot in (tmp_path / "old" / "config.resolved.yaml", tmp_path / "old" / ".hydra" / "config.yaml"):
        config = yaml.safe_load(snapshot.read_text())
        config["logger"] = {"name": "wandb", "project": "p", "entity": None, "run_name": None, "mode": None, "tags": []}
        snapshot.write_text(yaml.safe_dump(config))
    for how in ("resume=old", "reproduce=old"):
        shown = run_cli("nanogpt.train", how, "--cfg", "job", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        logger = yaml.safe_load(shown.stdout)["logger"]
        assert (logger["wandb"], logger["tensorboard"], logger["mlflow"], logger["project"]) == (True, False, False, "p")
    # continued in place (resume=auto, as a rerun sweep job is), with the command's logger: it fits this version
    extended = run_cli("nanogpt.train", *train_args(data_dir, "old", "max_iters=4", "eval_interval=2"), cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert json.loads((tmp_path / "old" / "provenance.json").read_text())["resumes"][0]["from_step"] == 2
