"""How the processes of one training run start and meet.

    one process                 nanogpt.train calls train() itself
    one rank of torchrun/srun   train_as_rank: join the launcher's process group, train, leave it
    hardware.nproc_per_node>1   run_processes: after Hydra made the run dir, start the workers on
                                this machine through torch.distributed's elastic launcher (what
                                torchrun runs); each worker logs to its own file and trains as a rank
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

from nanogpt.config import TrainConfig
from nanogpt.errors import UserError
from nanogpt.parallel import distributed
from nanogpt.parallel.distributed import DistEnv

log = logging.getLogger("nanogpt")


def train_as_rank(train: Callable[..., dict], config: TrainConfig, run_dir: Path, data_meta: dict, resolved: dict,
                  resume_from, env: DistEnv) -> dict:
    """Join the run's process group, train as this rank, and leave the group, also on an error.
    `train(config, run_dir, data_meta, resolved, resume_from, env, device)` is the training loop
    (nanogpt.train passes its own: this package never imports an entrypoint)."""
    from nanogpt.parallel import hardware

    device = distributed.init_process_group(env, config.hardware.backend, hardware.resolve(config.hardware).device_type)
    try:
        return train(config, run_dir, data_meta, resolved, resume_from, env, device)
    finally:
        distributed.destroy_process_group()


def _log_to_rank_file(run_dir: Path, rank: int) -> None:
    """A spawned worker's logging: its own file in the run dir (rank 0: train.log, beside the
    launcher's lines), and rank 0's progress lines on stdout; other ranks print only warnings.
    The file also takes the Python stacks of a fatal signal."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    name = "train.log" if rank == 0 else f"train.rank{rank}.log"
    file = logging.FileHandler(run_dir / name)
    file.setFormatter(logging.Formatter(f"[%(asctime)s][%(levelname)s][rank {rank}] %(message)s"))
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.handlers = [file, console]
    # a crash (SIGSEGV, SIGABRT, ...) writes every thread's Python stack into this file, the one the
    # launcher's error names; on the shared stderr the ranks' traces interleave and get cut
    faulthandler.enable(file=file.stream, all_threads=True)


def _worker(train: Callable[..., dict], config: TrainConfig, run_dir: Path, data_meta: dict, resolved: dict,
            resume_from) -> dict:
    """One rank of a run that nanogpt-train started on this machine (hardware.nproc_per_node > 1)."""
    from nanogpt.parallel import hardware

    env = distributed.detect()
    _log_to_rank_file(run_dir, env.rank)
    try:
        if hardware.resolve(config.hardware).device_type == "cpu":  # share the cores, as torchrun's OMP_NUM_THREADS
            import torch

            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
        result = train_as_rank(train, config, run_dir, data_meta, resolved, resume_from, env)
    except BaseException as e:
        log.error(f"rank {env.rank} failed: {e.__class__.__name__}: {e}", exc_info=not isinstance(e, UserError))
        raise
    if result["stopped_by"] is not None:  # the launcher is shutting down: it reads no return value, exit
        sys.exit(128 + int(result["stopped_by"]))
    return result


def run_processes(train: Callable[..., dict], config: TrainConfig, run_dir: Path, data_meta: dict, resolved: dict,
                  resume_from) -> dict:
    """Start hardware.nproc_per_node workers on this machine, each running `train` as one rank
    (train_as_rank), and wait for them: rank 0's result. `train` and `resume_from` go to every
    worker by pickle: a module-level function, and what it resumes from (a checkpoint's path, not
    its tensors). A failed worker stops the others (the launcher's doing) and raises a one-line
    UserError."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    nproc = config.hardware.nproc_per_node
    log.info(f"starting {nproc} processes on this machine (ranks 0-{nproc - 1}); rank logs: train.log, "
             f"train.rank1.log, ... in {run_dir}")
    try:
        results = distributed.launch_local(nproc, _worker, train, config, run_dir, data_meta, resolved, resume_from)
    except SignalException as e:  # the launcher passed the signal on; the workers saved and stopped
        return {"step": None, "stopped_by": signal.Signals(e.sigval)}
    except ChildFailedError as e:
        rank, why = failed_first(run_dir, e.failures)
        raise UserError(f"rank {rank} failed ({why}) and the others were stopped: see {_rank_log(run_dir, rank)}") from None
    return results[0]


def _rank_log(run_dir: Path, rank: int) -> Path:
    return run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log")


# What a rank reports when it failed only because another one died under it, mid-collective
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "communicator was aborted")
FAILED_LINE = re.compile(r"^\[([\d:, -]+)\]\[ERROR\]\[rank (\d+)\] rank \d+ failed: (.*)$", re.M)


def failed_first(run_dir: Path, failures: dict) -> tuple[int, str]:
    """The rank that failed first and why, for a run whose workers the launcher stopped.

    A rank blocked in a collective fails the moment its peer dies, often before the dying rank's
    process has exited: the launcher may then record only that rank's failure, and it stamps
    failures to the whole second. The ranks' own logs say it to the millisecond (_worker logs every
    exception): the first logged error that is not a lost peer names the cause. A rank that died
    without an exception (a crash in native code) logs none: the launcher's record names it."""
    logged = []
    for log_file in sorted(run_dir.glob("train*.log")):
        try:
            logged += FAILED_LINE.findall(log_file.read_text(errors="replace"))
        except OSError:
            continue
    own = sorted((when, int(rank), error) for when, rank, error in logged if not any(w in error for w in PEER_GONE))
    if own:
        _, rank, error = own[0]
        return rank, error
    rank, failure = first_failure(failures)
    return rank, f"exit code {failure.exitcode}"


def first_failure(failures: dict) -> tuple[int, object]:
    """The rank to name from the launcher's own {rank: ProcessFailure}, where no log names a cause.
    Among the failures of the first second (give or take one: torch stamps them to the second), one
    that did not fail for want of its peer; else the lowest rank of them."""
    first = min(f.timestamp for f in failures.values())
    early = sorted(rank for rank, f in failures.items() if f.timestamp - first <= 1)
    own = [rank for rank in early if not any(words in str(failures[rank].message) for words in PEER_GONE)]
    rank = (own or early)[0]
    return rank, failures[rank]
