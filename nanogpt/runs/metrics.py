"""Where a run's numbers go: always `metrics.jsonl` in the run dir, and wandb when configured.

Each line of metrics.jsonl is one JSON object with `step`, `kind` ("train" or "eval"), the
values, and `time` (seconds since this start of the run).

A resumed run rewinds metrics.jsonl to its checkpoint's step (a killed run may have logged steps
after its last checkpoint, which the resumed run logs again, identically) and continues the same
wandb run (same id), so neither holds a step twice.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from nanogpt.config import LoggerConfig, LoggerName
from nanogpt.errors import UserError
from nanogpt.runs.runfiles import read_jsonl, write_error

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, run_dir: Path, logger_cfg: LoggerConfig, config_dict: dict,
                 resumed_at: int | None = None, wandb_run_id: str | None = None):
        """resumed_at: the step a resumed run continues from (None: the run starts at step 0)."""
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / "metrics.jsonl"
        try:
            _rewind(self.path, resumed_at)
            self._file = open(self.path, "a", buffering=1)  # line-buffered: `tail -f` sees each record
        except OSError as e:
            raise write_error(self.path, e, run_dir) from e
        self._failed = False
        self._start = time.time()
        self._wandb_run = None
        self.wandb_run_id = wandb_run_id
        if logger_cfg.name == LoggerName.wandb:
            self._wandb_run = _start_wandb(Path(run_dir), logger_cfg, config_dict, wandb_run_id)
            self.wandb_run_id = self._wandb_run.id

    def log(self, step: int, kind: str, **values: float) -> None:
        record = {"step": step, "kind": kind, **values, "time": round(time.time() - self._start, 3)}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # a full or read-only disk: the run stops with one line (its checkpoints are intact)
            self._failed = True
            raise write_error(self.path, e, self.run_dir) from e
        if self._wandb_run is not None:
            self._wandb_run.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        try:
            self._file.close()  # flushes: the disk may refuse what a failed write left in the buffer
        except OSError as e:
            if not self._failed:  # else that failure is the one being reported
                raise write_error(self.path, e, self.run_dir) from e
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


class NoMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's metrics)."""

    wandb_run_id = None

    def log(self, step: int, kind: str, **values: float) -> None:
        pass

    def close(self) -> None:
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


def _start_wandb(run_dir: Path, cfg: LoggerConfig, config_dict: dict, run_id: str | None):
    import wandb  # imported only when used: it takes a second

    try:
        return wandb.init(
            id=run_id,  # a resumed run logs to the wandb run it started
            resume="allow",
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or run_dir.name,
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
