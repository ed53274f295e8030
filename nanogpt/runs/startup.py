"""How long a start spends before its first step, phase by phase.

A SLURM or submitit job gets its warning signal (SIGUSR2) a set time before its limit
(`signal_delay_s`); the run then finishes its step, saves and is requeued. A start whose
start-up outlasts the time before that signal trains nothing, and its requeue starts over from
the same step. The run's log and provenance.json therefore say what start-up cost, and a stop
before the first step says so (docs/sweeps.md: how much head room a job needs).

No torch here: the clock starts before torch is imported.
"""

from __future__ import annotations

import os
import time


def process_start_time() -> float:
    """When this process started (seconds since the epoch): from /proc on Linux, else when this
    module was first imported (which misses the interpreter's own start, a fraction of a second)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the command
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


class StartupClock:
    """Seconds spent in each named phase of start-up, from the process's start."""

    def __init__(self) -> None:
        self.started = process_start_time()
        self.phases: dict[str, float] = {}
        self._last = self.started

    def restart(self) -> None:
        """Start counting again from now: the next job of a sweep that runs its jobs in one process."""
        self.started = self._last = time.time()
        self.phases = {}

    def mark(self, phase: str) -> None:
        """The phase that ends now (the time since the previous mark is its)."""
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self.started

    def seconds(self) -> dict[str, float]:
        """For provenance.json: each phase and the total, in seconds."""
        return {**{k: round(v, 2) for k, v in self.phases.items()}, "total": round(self.total, 2)}

    def describe(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        return f"{self.total:.1f} s since the process started ({parts})"


clock = StartupClock()  # this process's: the entrypoints mark its phases
