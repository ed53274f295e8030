"""Downstream tasks through EleutherAI's lm-evaluation-harness: which tasks exist, running them on
a GPT, and what a run keeps of the results.

lm_eval is an optional extra (`pip install 'nanogpt[eval]'`), imported only inside these
functions: `require_lm_eval` turns its absence into one line. Task names are checked against
lm_eval's task index (its own tasks, plus the YAML task configs under `include_path`) before any
model is built.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from nanogpt.errors import ConfigError, UserError

log = logging.getLogger(__name__)

INSTALL = "pip install 'nanogpt[eval]'"


def require_lm_eval() -> str:
    """lm_eval's version; a UserError saying what to install when it is missing."""
    try:
        import lm_eval
    except ImportError as e:
        raise UserError(f"downstream evaluation needs EleutherAI's lm-evaluation-harness: {INSTALL}") from e
    return getattr(lm_eval, "__version__", "unknown")


def check_request(tasks: Sequence[str], limit: int | None, key: str = "tasks", limit_key: str = "limit") -> None:
    """What can be checked without lm_eval: some tasks, and a limit that is a positive number of examples."""
    if not tasks:
        raise ConfigError(f"{key} is empty: name at least one lm-eval task, e.g. {key}=[hellaswag]")
    if limit is not None and limit <= 0:
        raise ConfigError(f"{limit_key}={limit} must be a positive number of examples per task, or null for all")


def task_manager(tasks: Sequence[str], include_path: str | None = None, path_key: str = "tasks_include_path"):
    """lm_eval's TaskManager that knows every task in `tasks`, or a ConfigError naming those it does
    not know (with the close matches). Tasks found under include_path alone skip indexing lm_eval's
    own thousands of task configs (seconds). path_key: the config key of include_path, as the
    errors name it (nanogpt-eval's tasks_include_path, training's eval_tasks_include_path)."""
    require_lm_eval()
    key = (tuple(tasks), include_path)
    if key not in _MANAGERS:  # the preflight check and the run share one process: index once
        _MANAGERS[key] = _task_manager(tasks, include_path, path_key)
    return _MANAGERS[key]


_MANAGERS: dict = {}


def _task_manager(tasks: Sequence[str], include_path: str | None, path_key: str):
    from lm_eval.tasks import TaskManager

    paths = None
    if include_path is not None:
        where = Path(include_path).expanduser()
        if not where.is_dir():
            raise ConfigError(f"{path_key}={include_path}: no such directory (of lm-eval task YAML files)")
        paths = str(where)
        local = TaskManager(include_path=paths, include_defaults=False)
        if not _unknown(local, tasks):
            return local
    manager = TaskManager(include_path=paths)
    unknown = _unknown(manager, tasks)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
            hints.append(f"{name} (did you mean {', '.join(close)}?)" if close else name)
        raise ConfigError(f"lm-eval knows no task {'; '.join(hints)}: `lm-eval ls tasks` lists them; a task of "
                          f"your own is a YAML file under {path_key}=DIR")
    return manager


def _unknown(manager, tasks: Sequence[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known]


def evaluate(lm, tasks: Sequence[str], manager, limit: int | None = None, num_fewshot: int | None = None,
             bootstrap_iters: int = 0, seed: int = 1234) -> dict:
    """lm_eval.simple_evaluate on our model: its results dict (results, groups, configs, versions,
    n-shot, n-samples, ...), without the per-example samples. limit: examples per task (None: all).
    bootstrap_iters: resamples for the standard errors (0: none, which is fast).

    lm_eval seeds Python's, NumPy's and torch's global generators; they are put back afterwards, so
    that evaluating inside a training run leaves its random stream where it was."""
    from lm_eval import evaluator

    with _rng_kept():
        results = evaluator.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    return results


@contextlib.contextmanager
def _rng_kept():
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # manual_seed seeds CUDA too
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def scores(results: dict) -> dict[str, float]:
    """The results' numbers as flat metric names: {"hellaswag/acc_norm": 0.31, ...} (lm_eval's
    "acc_norm,none" drops its filter when it is "none"; standard errors, the alias and the
    sample count are left out)."""
    flat = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")
            if not comma or "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            flat[f"{task}/{name}" + (f"/{filt}" if filt and filt != "none" else "")] = float(value)
    return flat


def table(results: dict) -> str:
    """lm_eval's own Markdown table of the results (and of the groups, if any)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def write_results(out_dir: Path, results: dict, provenance: dict[str, Any]) -> tuple[Path, Path]:
    """<out_dir>/results_<tasks>_<time>.json (lm_eval's results dict with our provenance under
    "nanogpt") and the table beside it as .md. Returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = "-".join(provenance.get("tasks", []))[:80] or "tasks"
    stem = f"results_{tasks}_{time.strftime('%Y%m%d-%H%M%S')}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = {**{k: v for k, v in results.items() if k != "samples"}, "nanogpt": provenance}
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(table(results))
    return json_path, md_path
