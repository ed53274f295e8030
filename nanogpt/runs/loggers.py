"""The experiment trackers a run's metrics go to besides metrics.jsonl: wandb, TensorBoard and
MLflow, any of them at once (logger=[wandb,tensorboard]; docs/logging.md).

Each tracker takes the records metrics.jsonl gets, tagged `<kind>/<name>` (train/loss,
eval/val_loss) at their step, and the run's resolved config. A resumed run continues the same
tracker run, and no tracker shows a step twice, although a killed run may have logged steps after
its last checkpoint that the resumed run logs again:

    wandb        the run id is kept in the checkpoint; wandb's resume keeps one value per step
    TensorBoard  the same dir; the resumed writer's purge_step hides the killed run's later
                 events from TensorBoard's reader
    MLflow       the run id is kept in the checkpoint; metrics are append-only there, so a resumed
                 run sends only the steps beyond those the MLflow run already holds, per metric

`check` runs before the run dir exists (nanogpt/runs/preflight.py): a missing package, a tracking
URI with a password in it, or an MLflow server that does not answer is one line, before any compute.
The libraries are imported only when a tracker starts: `--cfg job` stays fast.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import urllib.parse
from enum import Enum
from pathlib import Path

from nanogpt.config import LoggerConfig
from nanogpt.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# tracker -> (the module it needs, what to install for it)
PACKAGES = {"wandb": ("wandb", "pip install wandb"),
            "tensorboard": ("tensorboard", "pip install 'nanogpt[tensorboard]' (or: pip install tensorboard)"),
            "mlflow": ("mlflow", "pip install 'nanogpt[mlflow]' (or: pip install mlflow)")}
CHECK_TIMEOUT_S = 5.0  # how long preflight waits for an MLflow server's answer
FLUSH_EVERY_S = 5.0  # MLflow: pending train records are sent at least this often (and at each eval, and at the end)
FLUSH_AT_METRICS = 500  # ... or when this many values are pending (MLflow takes 1,000 a request)
MLFLOW_PARAM_MAX = 6000  # characters of an MLflow param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)


def check(cfg: LoggerConfig) -> None:
    """ConfigError unless every tracker the config turns on can start: its package is installed,
    and for MLflow the tracking URI holds no credentials and, for a server, answers."""
    for name in cfg.enabled():
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"logger.{name}=true needs the {module} package, which is not installed: {install}")
    if cfg.mlflow:
        if cfg.tracking_uri is not None and urllib.parse.urlsplit(cfg.tracking_uri).password is not None:
            raise ConfigError(
                f"logger.tracking_uri={redact(cfg.tracking_uri)} holds a password, which would be written into the run's "
                f"config: give the URI without it, and the credentials as MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
        uri = tracking_uri(cfg, run_dir=None)
        if uri is not None and uri.startswith(("http://", "https://")):
            check_server(uri, cfg.project)


def check_server(uri: str, experiment: str) -> None:
    """The MLflow server at uri answers an API call, with the environment's credentials."""
    import urllib.error
    import urllib.request  # here: it imports ssl, and every start of nanogpt-train imports this module

    query = urllib.parse.urlencode({"experiment_name": experiment})
    request = urllib.request.Request(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}",
                                     headers=_auth_headers())
    shown = redact(uri)
    try:
        with urllib.request.urlopen(request, timeout=CHECK_TIMEOUT_S):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ConfigError(f"the MLflow server at {shown} refused the credentials (HTTP {e.code}): set "
                              f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)") from None
        return  # it answers (404: no such experiment yet, which the run creates)
    except (urllib.error.URLError, OSError) as e:  # refused, unknown host, timed out
        reason = getattr(e, "reason", e)
        raise ConfigError(
            f"the MLflow server at {shown} does not answer ({reason}): start it (mlflow server --port N), correct "
            f"logger.tracking_uri, or set logger.tracking_uri=null for a SQLite store in the run dir") from None


def _auth_headers() -> dict:
    """MLflow's own credential variables, as its client sends them."""
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        import base64

        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def redact(uri: str) -> str:
    """uri without the user:password@ part, for messages and logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")))


def tracking_uri(cfg: LoggerConfig, run_dir: Path | None) -> str | None:
    """logger.tracking_uri, else $MLFLOW_TRACKING_URI, else a SQLite store in the run dir (None
    before the run dir is known)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return None if run_dir is None else f"sqlite:///{(Path(run_dir) / 'mlflow.db').absolute()}"


def start(run_dir: Path, cfg: LoggerConfig, config_dict: dict, resumed_at: int | None,
          run_ids: dict[str, str | None]) -> list:
    """The trackers the config turns on, started; run_ids: the ids a resumed run logged to (by tracker)."""
    check(cfg)  # preflight did, unless the caller is not nanogpt-train: the same one line then
    config_dict = plain(config_dict)
    starters = {"wandb": lambda: Wandb(run_dir, cfg, config_dict, run_ids.get("wandb")),
                "tensorboard": lambda: TensorBoard(run_dir, config_dict, resumed_at),
                "mlflow": lambda: MLflow(run_dir, cfg, config_dict, run_ids.get("mlflow"))}
    started = []
    try:
        for name in cfg.enabled():
            started.append(starters[name]())
    except BaseException:
        for tracker in started:
            tracker.close("failed")
        raise
    return started


def plain(value):
    """The config with its enums as their values (gelu, not Activation.gelu), as config.resolved.yaml has them."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value.value if isinstance(value, Enum) else value


def numeric(values: dict) -> dict[str, float]:
    """The values TensorBoard and MLflow take: numbers (a bool as 0/1); None and text are left out."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


class Wandb:
    name = "wandb"

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: dict, run_id: str | None):
        import wandb  # imported only when used: it takes a second

        try:
            self.run = wandb.init(
                id=run_id,  # a resumed run logs to the wandb run it started
                resume="allow",
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.run_name or Path(run_dir).name,
                tags=list(cfg.tags),
                mode=cfg.mode,
                dir=str(run_dir),
                config=config_dict,
            )
        except Exception as e:  # e.g. online mode without an API key or network
            raise UserError(
                f"wandb could not start ({str(e).splitlines()[0] if str(e) else e.__class__.__name__}): "
                f"run `wandb login`, or set logger.mode=offline"
            ) from e
        self.run_id = self.run.id

    def log(self, step: int, kind: str, values: dict) -> None:
        self.run.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self, status: str) -> None:
        self.run.finish()  # a stopped run is continued by id, whatever wandb marks it


class TensorBoard:
    """Event files in <run dir>/tensorboard/. A resumed run writes more files there with
    purge_step = the checkpoint's step + 1: TensorBoard's reader drops the events at and after it
    that earlier files hold (a killed run's steps after its checkpoint), so each step shows once."""

    name = "tensorboard"
    run_id = None  # the dir is the run

    def __init__(self, run_dir: Path, config_dict: dict, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / "tensorboard"
        fresh = not any(self.dir.glob("events.out.tfevents.*"))
        # a run that starts at step 0 purges everything an earlier start in this dir wrote, as metrics.jsonl does
        self.writer = SummaryWriter(str(self.dir), purge_step=0 if resumed_at is None else resumed_at + 1)
        if resumed_at is None or fresh:  # the config once, in the Text tab (a resume keeps the first start's)
            self.writer.add_text("config", "```\n" + json.dumps(config_dict, indent=2, default=str) + "\n```",
                                 global_step=resumed_at or 0)

    def log(self, step: int, kind: str, values: dict) -> None:
        for key, value in numeric(values).items():
            self.writer.add_scalar(f"{kind}/{key}", value, global_step=step)
        if kind == "eval":  # a checkpoint follows: what it covers must be on disk, the purge hides the rest
            self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per run dir: the resolved config as params (flattened keys), the metrics at
    their steps. Records are sent in batches: at each evaluation (before its checkpoint), every
    FLUSH_EVERY_S seconds or FLUSH_AT_METRICS values, and at the end. A batch MLflow refuses mid-run
    (the server went away) is a warning, and training goes on."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config_dict: dict, run_id: str | None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg, run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.logged: dict[str, int] = {}  # metric -> the last step the MLflow run holds (a resumed run's)
        try:
            self.run_id = self._start(run_dir, cfg, config_dict, run_id)
        except Exception as e:  # e.g. a deleted experiment of that name, a tag MLflow does not take
            raise UserError(f"mlflow could not start a run in {redact(self.uri)} "
                            f"({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from e
        self.pending: list = []
        self.last_flush = time.monotonic()
        self.warned = False
        log.info(f"mlflow: run {self.run_id} in {redact(self.uri)}")

    def _start(self, run_dir: Path, cfg: LoggerConfig, config_dict: dict, run_id: str | None) -> str:
        """The MLflow run's id: run_id's run continued, or a new one, with the config as params."""
        from mlflow.entities import Param

        run = self._existing_run(run_id)
        if run is None:
            run = self.client.create_run(self._experiment_id(cfg, run_dir), run_name=cfg.run_name or Path(run_dir).name,
                                         tags={"nanogpt.run_dir": str(Path(run_dir).absolute()),
                                               **{tag: "true" for tag in cfg.tags}})
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            for key in run.data.metrics:
                self.logged[key] = max(m.step for m in self.client.get_metric_history(run.info.run_id, key))
        # params are immutable in MLflow: a resume adds the keys the run lacks and keeps the first start's values
        # (a continued run may change only max_iters, logger.* and the like: config.resolved.yaml has this start's)
        params = [Param(k, v) for k, v in flat_params(config_dict).items() if k not in run.data.params]
        self.client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def _existing_run(self, run_id: str | None):
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:  # logger.tracking_uri changed since: a new MLflow run in that store
            log.warning(f"mlflow: the run's MLflow run {run_id} is not in {redact(self.uri)}; logging to a new one")
            return None

    def _experiment_id(self, cfg: LoggerConfig, run_dir: Path) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(cfg.project)
        if experiment is not None:
            return experiment.experiment_id
        # the default store keeps its (unused) artifact root in the run dir too, not in the launch dir
        local = cfg.tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI")
        try:
            return self.client.create_experiment(
                cfg.project, artifact_location=(Path(run_dir) / "mlartifacts").absolute().as_uri() if local else None)
        except MlflowException:  # another job of a sweep created it just now
            return self.client.get_experiment_by_name(cfg.project).experiment_id

    def log(self, step: int, kind: str, values: dict) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        for key, value in numeric(values).items():
            name = f"{kind}/{key}"
            if step > self.logged.get(name, -1):
                self.pending.append(Metric(name, value, now_ms, step))
        if kind == "eval" or len(self.pending) >= FLUSH_AT_METRICS or time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        pending, self.pending, self.last_flush = self.pending, [], time.monotonic()
        try:
            self.client.log_batch(self.run_id, metrics=pending)
        except Exception as e:  # the server went away: the run's metrics.jsonl still has them
            if not self.warned:
                log.warning(f"mlflow: could not log to {redact(self.uri)} ({str(e).splitlines()[0] if str(e) else e!r}); "
                            f"training goes on, and metrics.jsonl keeps every record")
            self.warned = True

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))


def flat_params(config_dict: dict) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as JSON text (strings as they
    are), cut to MLflow's length limit (config.resolved.yaml in the run dir has them whole)."""
    from nanogpt.runs.resume import flatten

    params = {}
    for key, value in flatten(config_dict).items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        params[key] = text if len(text) <= MLFLOW_PARAM_MAX else text[:MLFLOW_PARAM_MAX - 15] + "... (truncated)"
    return params
