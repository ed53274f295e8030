"""Where a run's numbers go: always `metrics.jsonl` in the run dir, and wandb when configured.

Each line of metrics.jsonl is one JSON object with `step`, `kind` ("train" or "eval"), the
values, and `time` (seconds since the run started).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from nanogpt.config import LoggerConfig, LoggerName, UserError

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, run_dir: Path, logger_cfg: LoggerConfig, config_dict: dict):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)  # line-buffered: `tail -f` sees each record
        self._start = time.time()
        self._wandb_run = None
        if logger_cfg.name == LoggerName.wandb:
            self._wandb_run = _start_wandb(Path(run_dir), logger_cfg, config_dict)

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


def _start_wandb(run_dir: Path, cfg: LoggerConfig, config_dict: dict):
    import wandb  # imported only when used: it takes a second

    try:
        return wandb.init(
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
