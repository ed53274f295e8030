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
        rank, failure = e.get_first_failure()
        where = run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log")
        raise UserError(f"rank {rank} failed (exit code {failure.exitcode}) and the others were stopped: see {where}") from None
    return results[0]
