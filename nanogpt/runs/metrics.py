"""Where a run's numbers go: always `metrics.jsonl` in the run dir, and the trackers the logger
group turns on (wandb, TensorBoard, MLflow: nanogpt/runs/loggers.py).

Each line of metrics.jsonl is one JSON object with `step`, `kind` ("train" or "eval"), the
values, and `time` (seconds since this start of the run).

A resumed run rewinds metrics.jsonl to its checkpoint's step (a killed run may have logged steps
after its last checkpoint, which the resumed run logs again, identically) and continues the same
tracker runs (ids kept in the checkpoint), so none of them holds a step twice.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from nanogpt.config import LoggerConfig
from nanogpt.runs import loggers
from nanogpt.runs.runfiles import read_jsonl, write_error

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, run_dir: Path, logger_cfg: LoggerConfig, config_dict: dict,
                 resumed_at: int | None = None, wandb_run_id: str | None = None, mlflow_run_id: str | None = None):
        """resumed_at: the step a resumed run continues from (None: the run starts at step 0);
        wandb_run_id, mlflow_run_id: the tracker runs it logged to (kept also while that tracker is off)."""
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / "metrics.jsonl"
        try:
            _rewind(self.path, resumed_at)
            self._file = open(self.path, "a", buffering=1)  # line-buffered: `tail -f` sees each record
        except OSError as e:
            raise write_error(self.path, e, run_dir) from e
        self._failed = False
        self._start = time.time()
        self.run_ids = {"wandb": wandb_run_id, "mlflow": mlflow_run_id}
        try:
            self._trackers = loggers.start(self.run_dir, logger_cfg, config_dict, resumed_at, self.run_ids)
        except BaseException:
            self._file.close()
            raise
        self.run_ids.update({t.name: t.run_id for t in self._trackers if t.run_id is not None})

    @property
    def wandb_run_id(self) -> str | None:
        return self.run_ids["wandb"]

    @property
    def mlflow_run_id(self) -> str | None:
        return self.run_ids["mlflow"]

    def log(self, step: int, kind: str, **values: float) -> None:
        record = {"step": step, "kind": kind, **values, "time": round(time.time() - self._start, 3)}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # a full or read-only disk: the run stops with one line (its checkpoints are intact)
            self._failed = True
            raise write_error(self.path, e, self.run_dir) from e
        for tracker in self._trackers:
            tracker.log(step, kind, values)

    def close(self, status: str = "finished") -> None:
        """status: finished | stopped (by a signal, to be resumed) | failed, as the trackers mark the run."""
        trackers, self._trackers = self._trackers, []
        try:
            self._file.close()  # flushes: the disk may refuse what a failed write left in the buffer
        except OSError as e:
            if not self._failed:  # else that failure is the one being reported
                raise write_error(self.path, e, self.run_dir) from e
        finally:
            for tracker in trackers:
                tracker.close(status)


class NoMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's metrics)."""

    wandb_run_id = mlflow_run_id = None

    def log(self, step: int, kind: str, **values: float) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        pass


def _rewind(path: Path, resumed_at: int | None) -> None:
    """Keep the records of steps up to resumed_at (none for a run that starts at step 0)."""
    if not path.exists():
        return
    kept = []
    if resumed_at is not None:
        records = read_jsonl(path, fix=f"move it aside (the run's checkpoints are intact) and resume again; the "
                                      f"resumed run logs from step {resumed_at} on")
        kept = [json.dumps(r) + "\n" for r in records if isinstance(r.get("step"), int) and r["step"] <= resumed_at]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
