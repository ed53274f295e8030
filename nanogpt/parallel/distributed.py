"""Which process this is in a multi-process run, and the process group that joins the processes.

Rank, local rank and world size come from the first of these that applies:

    torchrun (or any env:// launcher)  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT
    a SLURM job step of several tasks  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the job's node
    (srun, submitit)                   list (parsed by submitit) for the master address
    nothing of the above               one process

`nanogpt-train hardware.nproc_per_node=N` on a single machine starts N workers itself, through
torch.distributed's elastic launcher (what torchrun runs); each worker then finds itself here as
under torchrun.

No torch at import: the config checks that run on every launch read the environment through here.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from nanogpt.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | slurm

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistEnv:
    """This process's place in the run, from the environment its launcher set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int("WORLD_SIZE")
        return DistEnv(
            rank=_int("RANK"),
            local_rank=_int("LOCAL_RANK", 0),
            world_size=world_size,
            local_world_size=_int("LOCAL_WORLD_SIZE", world_size),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int("MASTER_PORT", 29500),
            source="torchrun",
        )
    # A task of a job step (srun, or submitit's srun). The batch script itself is not a task of a
    # step and has no SLURM_STEP_ID: a single `python` there is a single process.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _int("SLURM_NTASKS", 1) > 1:
        from submitit.slurm.slurm import SlurmJobEnvironment

        job = SlurmJobEnvironment()
        nodes = max(1, job.num_nodes)
        return DistEnv(
            rank=job.global_rank,
            local_rank=job.local_rank,
            world_size=job.num_tasks,
            local_world_size=job.num_tasks // nodes,
            # the step's first node (a step may run on part of the job's nodes)
            master_addr=_first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")) or job.hostnames[0],
            # the same port on every task of the step without talking: from the job and step ids
            master_port=_int("MASTER_PORT", 20000 + (int(env.get("SLURM_JOB_ID", "0")) * 16
                                                     + _int("SLURM_STEP_ID", 0)) % 40000),
            source="slurm",
        )
    return DistEnv()


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[07-09,12],cpu3" -> "gpu07")."""
    if not nodelist:
        return ""
    head = nodelist.split(",")[0]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.split("-")[0].split(",")[0].rstrip("]")


def planned_world_size(hardware) -> int:
    """The number of processes of a run: the launcher's (torchrun, srun), or the ones nanogpt-train
    starts itself on this machine (hardware.nproc_per_node)."""
    env = detect()
    if env.is_distributed:
        return env.world_size
    if hardware.nnodes > 1:
        raise ConfigError(
            f"hardware.nnodes={hardware.nnodes} needs a launcher on every node: submit with the SLURM launcher, "
            f"or run torchrun on each node (docs/distributed.md)"
        )
    return hardware.nproc_per_node


def _int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"the environment variable {name} is missing: start the run with torchrun or srun")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"the environment variable {name}={value!r} is not a whole number: check the launcher") from None


def init_process_group(env: DistEnv, backend: str | None, device_type: str) -> str:
    """Join the run's process group: nccl on CUDA, gloo elsewhere (or `backend`). Returns the
    device this rank uses: on CUDA, the GPU of its local rank, made current without hiding the
    node's other GPUs (CUDA_VISIBLE_DEVICES is left alone)."""
    import datetime

    import torch
    import torch.distributed as dist

    device = "cpu" if device_type == "cpu" else device_type
    if device_type == "cuda" and torch.cuda.device_count() == 1:  # one GPU per task (--gpus-per-task=1)
        torch.cuda.set_device(0)
        device = "cuda:0"
    elif device_type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {env.local_rank} needs GPU {env.local_rank}, but this node has "
                f"{torch.cuda.device_count()}: start at most one process per GPU (hardware.nproc_per_node)"
            )
        torch.cuda.set_device(env.local_rank)
        device = f"cuda:{env.local_rank}"
    dist.init_process_group(
        backend or ("nccl" if device_type == "cuda" else "gloo"),
        store=shared_store(env),
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=30),  # rank 0 saving a large checkpoint keeps the others waiting
        **({"device_id": torch.device(device)} if device_type == "cuda" else {}),
    )
    return device


_store = None


def shared_store(env: DistEnv):
    """The run's key-value store (rank 0's, or torchrun's agent's), made once per process: the
    ranks agree on the run dir through it before the process group exists, and the process group
    is then built on it."""
    global _store
    if _store is None:
        import datetime

        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=datetime.timedelta(minutes=10)))
        # torchrun's store outlives a restart of the workers: keep each attempt's keys apart
        _store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return _store


def destroy_process_group() -> None:
    """Leave the process group, and let go of the store it was built on now, while the interpreter
    is whole: C++ objects with threads of their own left to interpreter shutdown can abort the
    process after the run has ended well ("terminate called without an active exception")."""
    import torch.distributed as dist

    global _store
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _store = None


SHUTDOWN_TIMEOUT_S = 120  # a stopping worker's time to finish its step and save before it is killed


def gather_to_all(value, env: DistEnv) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not env.is_distributed:
        return [value]
    import torch.distributed as dist

    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


def launch_local(nproc: int, worker, *args) -> dict:
    """Run worker(*args) in nproc processes on this machine, joined as ranks 0..nproc-1, through
    torch.distributed's elastic launcher (what torchrun runs): if one fails, the others are
    stopped. Returns {rank: worker's return value}."""
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    passed_on = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0, monitor_interval=0.1, start_method="spawn",
        # SLURM's warning signals too: passed on to the workers, which save and stop; they have
        # shutdown_timeout seconds for it before the launcher kills them
        signals_to_handle=",".join(passed_on), shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    # the launcher installs its own handlers and leaves them: put back the ones it found (under
    # submitit, the handler that requeues the job once the workers have saved)
    previous = {sig: signal.getsignal(sig) for sig in (getattr(signal, name) for name in passed_on)}
    try:
        return elastic_launch(config, worker)(*args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
