"""How a run that ended on an exception is reported: a second Ctrl-C, a full or read-only disk,
or too little memory are no bugs of ours and end in one line (nanogpt-train's _main maps them);
anything else keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

from nanogpt.config import TrainConfig
from nanogpt.errors import UserError
from nanogpt.parallel import memory
from nanogpt.runs.runfiles import DISK_ERRNOS, write_error


def _in_chain(exc: BaseException | None, wanted) -> BaseException | None:
    """The first exception in exc's chain (exc, its cause or context, ...) that wanted(e) accepts."""
    while exc is not None:
        if wanted(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def interrupted(exc: BaseException | None) -> bool:
    """Did a second Ctrl-C end the run? It may surface as another error: interrupting torch.save
    makes its zip writer raise a RuntimeError, with the KeyboardInterrupt as its context."""
    return _in_chain(exc, lambda e: isinstance(e, KeyboardInterrupt)) is not None


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))  # the CPU allocator's


def as_user_error(exc: BaseException, run_dir: Path, config: TrainConfig) -> UserError | None:
    """The one line for an error that ended a run but is no bug of ours: the machine ran out of
    memory, or the disk refused a write (full, quota, read-only). None for anything else."""
    if isinstance(exc, UserError):
        return exc
    if _in_chain(exc, _out_of_memory) is not None:
        return memory.out_of_memory_error(config, str(_in_chain(exc, _out_of_memory)))
    disk = _in_chain(exc, lambda e: isinstance(e, OSError) and e.errno in DISK_ERRNOS)
    if disk is not None:
        return write_error(disk.filename or run_dir, disk, run_dir)
    return None


def last_checkpoint_words(run_dir: Path) -> str:
    from nanogpt.runs.checkpoint import CheckpointDir

    step = CheckpointDir(run_dir / "checkpoints").last_step()
    return "no checkpoint was saved" if step is None else f"the last checkpoint is step {step}"
