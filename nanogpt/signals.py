"""Stop training cleanly on a signal: finish the step, save, and exit.

SIGINT (Ctrl-C), SIGTERM (what `kill`, SLURM and most schedulers send first) and SIGUSR1/2 (what
SLURM sends ahead of a time limit with --signal) only set a flag here; the training loop looks at
it at each step boundary, saves a checkpoint, and stops. A second Ctrl-C means "now": it raises
KeyboardInterrupt at once. Checkpoint writes are atomic, so even that leaves the last good file
intact.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("nanogpt")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Install with `with StopRequest() as stop:`; `stop.signal` is None until a signal arrives."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signal is None:
            self.signal = signal.Signals(signum)
            log.info(f"{self.signal.name} received: stopping after this step, with a checkpoint "
                     f"(Ctrl-C again to stop at once)")
