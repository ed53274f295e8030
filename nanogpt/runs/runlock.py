"""One live owner per run dir: the process that trains in it holds `run.lock`.

A second start in the same dir (the same command run twice, `resume=<dir>` while the run is alive)
would interleave train.log, overwrite checkpoints and lose metrics, so it is refused with a
line that names the owner. The lock is taken before anything is written to the dir and is held
until the process exits; the kernel releases it when the owner dies however it dies, so a
requeued SLURM job (or a rerun after a crash) takes the dir over by itself.

The lock is an advisory `flock` on `<run dir>/run.lock`, which also records the owner (pid, host,
start time, command) for the message. On a file system without locks (some cluster mounts) the
run goes on with a warning: two starts there are not detected.

No torch here: this runs on every launch.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from nanogpt.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirBusy(UserError):
    """Another live process owns the run dir."""


class RunLock:
    """The lock on one run dir, held by this process until `release` (or its exit)."""

    def __init__(self, run_dir: Path, file, made: list[Path]):
        self.run_dir, self._file, self._made = run_dir, file, made

    def release(self, remove_if_unused: bool = False) -> None:
        """Let go of the dir. remove_if_unused: if nothing but the lock was written to it (the
        start was refused after the lock was taken), remove the lock and the dirs it made."""
        if self._file is None:
            return
        path = self.run_dir / LOCK_NAME
        if remove_if_unused and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
            path.unlink(missing_ok=True)
            for made in reversed(self._made):  # innermost first; stops at a dir another process uses
                try:
                    made.rmdir()
                except OSError:
                    break
        else:
            self._file.truncate(0)  # no owner now: the record would name a process that is gone
        self._file.close()  # closing the descriptor releases the flock
        self._file = None


def acquire(run_dir: Path) -> RunLock:
    """Make run_dir if needed and take its lock. Raises RunDirBusy naming the live owner, or a
    UserError if the dir cannot be made."""
    import fcntl

    run_dir = Path(run_dir)
    made = _make_dirs(run_dir)
    path = run_dir / LOCK_NAME
    file = open(path, "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        owner = file.read()
        file.close()
        raise _busy(run_dir, owner) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        log.warning(f"the file system of {run_dir} does not support locks ({e.strerror}): a second start in this "
                    f"run dir would not be detected")
    file.seek(0)
    file.truncate()
    file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "argv": sys.argv}) + "\n")
    file.flush()
    return RunLock(run_dir, file, made)


_held: dict[Path, RunLock] = {}


def hold(run_dir: Path) -> RunLock:
    """Take run_dir's lock for the rest of this process (nanogpt-train's single run). At exit, a
    dir that the start made but never wrote to (a refused start) is removed again."""
    import atexit

    key = Path(run_dir).absolute()
    if key not in _held:
        _held[key] = acquire(key)
        atexit.register(_held[key].release, remove_if_unused=True)
    return _held[key]


def check_free(run_dir: Path) -> None:
    """RunDirBusy if a live process owns run_dir (a sweep checks its jobs' dirs before launching).
    Reads only: the dir and its lock file are left as they are."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return
    with open(path) as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:
            raise _busy(Path(run_dir), file.read()) from None
        except OSError:  # no locks on this file system: nothing to check
            pass


def _busy(run_dir: Path, owner_record: str) -> RunDirBusy:
    return RunDirBusy(f"{run_dir} is in use by {_describe(owner_record)}: two processes in one run dir would mix "
                      f"their logs and checkpoints; wait for it to end (or stop it), or pick another hydra.run.dir")


def _make_dirs(run_dir: Path) -> list[Path]:
    """mkdir -p, returning the dirs this call made (outermost first)."""
    missing = []
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"the run dir {run_dir} cannot be made: {parent} is a file; pick another "
                                f"hydra.run.dir")
            break
        missing.append(parent)
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
            made.append(path)
        except FileExistsError:  # another start made it in between: theirs, not ours to remove
            pass
        except OSError as e:
            raise UserError(f"the run dir {run_dir} cannot be made ({e.strerror} at {path}): pick a writable "
                            f"hydra.run.dir") from None
    return made


def _describe(owner_record: str) -> str:
    try:
        owner = json.loads(owner_record)
        command = " ".join([os.path.basename(owner["argv"][0]), *owner["argv"][1:]])
        return f"process {owner['pid']} on {owner['host']} since {owner['since']} ({command})"
    except (ValueError, KeyError, TypeError):  # taken a moment ago; its record is not written yet
        return "another process"
