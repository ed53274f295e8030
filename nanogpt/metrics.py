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

from nanogpt.config import LoggerConfig, LoggerName, UserError

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, run_dir: Path, logger_cfg: LoggerConfig, config_dict: dict,
                 resumed_at: int | None = None, wandb_run_id: str | None = None):
        """resumed_at: the step a resumed run continues from (None: the run starts at step 0)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        _rewind(self.path, resumed_at)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: `tail -f` sees each record
        self._start = time.time()
        self._wandb_run = None
        self.wandb_run_id = wandb_run_id
        if logger_cfg.name == LoggerName.wandb:
            self._wandb_run = _start_wandb(Path(run_dir), logger_cfg, config_dict, wandb_run_id)
            self.wandb_run_id = self._wandb_run.id

    def log(self, step: int, kind: str, **values: float) -> None:
        record = {"step": step, "kind": kind, **values, "time": round(time.time() - self._start, 3)}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self._file.close()
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
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resumed_at:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
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
