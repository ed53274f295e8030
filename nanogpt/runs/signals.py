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


def hand_over(sig: signal.Signals) -> None:
    """After a run stopped on `sig` and saved, let the handler that was installed before ours have
    the signal. Under submitit that is what requeues a preempted or timed-out job (it resubmits
    the job into the same run dir, where it resumes from the checkpoint) and exits; elsewhere
    there is no such handler and this does nothing."""
    handler = signal.getsignal(sig)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(sig, None)
