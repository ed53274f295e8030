"""lm-eval tasks during training (eval_tasks=[...]): on rank 0, with an evaluation every
eval_tasks_interval steps and at the last step, on eval_tasks_limit examples per task. Their
numbers join that evaluation's metrics record (eval/hellaswag/acc_norm, ...), so metrics.jsonl,
the trackers and nanogpt-report see them as they see the val loss.

The checks (lm_eval installed, every task known) ran before the run dir was made
(runs/preflight.py); the task index they built is reused here.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from nanogpt.config import TrainConfig
from nanogpt.evals import harness

log = logging.getLogger("nanogpt")

FALLBACK_BATCH_SIZE = 8  # sequences per forward pass when batch_size=auto has not said


class TaskEvaluation:
    """`at(step, last)` runs the tasks when it is their step, returning {"TASK/METRIC": value} (else {})."""

    def __init__(self, config: TrainConfig, model, data_meta: dict, device: str, autocast: Callable,
                 is_main: bool = True):
        self.enabled = bool(config.eval_tasks) and is_main  # the other ranks wait at the next collective
        if not self.enabled:
            return
        from nanogpt.data import tokenizer

        self.config, self.model, self.device, self.autocast = config, model, device, autocast
        self.tokenizer = tokenizer.from_meta(data_meta)
        self.interval = config.eval_tasks_interval or config.eval_interval
        self.manager = harness.task_manager(config.eval_tasks, config.eval_tasks_include_path, "eval_tasks_include_path")
        self.batch_size = config.batch_size if isinstance(config.batch_size, int) else FALLBACK_BATCH_SIZE

    def at(self, step: int, last: bool) -> dict[str, float]:
        if not self.enabled or (step % self.interval and not last):
            return {}
        from nanogpt.evals.lm import GPTLM

        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()  # no dropout while scoring
        try:
            lm = GPTLM(self.model, self.tokenizer, self.device, self.batch_size, self.autocast)
            results = harness.evaluate(lm, self.config.eval_tasks, self.manager, limit=self.config.eval_tasks_limit,
                                       seed=self.config.seed)
        finally:
            self.model.train(was_training)
        found = harness.scores(results)
        log.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in found.items())
                 + f" ({time.perf_counter() - started:.1f} s)")
        return found
