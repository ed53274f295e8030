"""The trial a run belongs to, when a search trains it: who hears each evaluation, and may end the
run there (a search's pruner, nanogpt/sweeps/search.py).

A search's worker runs nanogpt-train's task through Hydra, which calls it with a config only, so
the worker hands the listener over here and train.py's entrypoint passes it to the loop:

    with trial.reporting_to(on_eval):   # on_eval(step, val_loss) -> True: end the run at this step
        run_job(...)

No Optuna here: the listener is a plain function.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

OnEval = Callable[[int, float], bool]  # (step, val loss) -> whether the run ends at this step

_listeners: list[OnEval] = []


@contextlib.contextmanager
def reporting_to(on_eval: OnEval) -> Iterator[None]:
    """Runs started inside the block report each evaluation to on_eval."""
    _listeners.append(on_eval)
    try:
        yield
    finally:
        _listeners.remove(on_eval)


def listener() -> OnEval | None:
    """The listener of the run starting now; None outside a search."""
    return _listeners[-1] if _listeners else None
