"""batch_size=auto: the largest micro-batch that fits on this GPU, found by trying training steps.

memory.py estimates a step from the config, as a lower bound, before the run starts; only a real
step knows what the allocator, the kernels and autocast need. So on CUDA, `batch_size=auto` runs
whole training steps (forward, backward, optimizer step, on random tokens) at candidate sizes,
catches torch.OutOfMemoryError, and keeps the largest size that ran. Any other error propagates.

The rules:
- The candidates are the sizes that divide global_batch_size / processes, so that the global batch
  holds exactly: global_batch_size = batch_size x accumulation x processes. The largest size that
  fits AND divides wins (a GPU that fits 47 sequences of a 480 global batch on one process runs
  40 x 12, not 47 x 10.2). global_batch_size must therefore be given: auto changes how a step is
  computed, never what is trained.
- Fitting is monotone in the size, so after one step at the smallest size (which makes the
  optimizer's state, as a run's first step does) a binary search over the other candidates finds
  it: at most 1 + ceil(log2(candidates)) tries, 6 for the 24 divisors of 480.
- Between tries everything a try allocated is released: the OOM exception is dropped at once (its
  traceback holds the failed step's tensors), then gc and the CUDA caching allocator let go.
- Every rank searches alone (a collective in a step that OOMs on one rank would hang the others),
  then all ranks take the smallest size any of them found.

The training step itself is the training loop's (train.py hands it in as `try_size`): this
module never imports an entrypoint.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Callable

from nanogpt.config import AUTO, TrainConfig
from nanogpt.errors import ConfigError, UserError
from nanogpt.parallel import distributed
from nanogpt.parallel.distributed import DistEnv


@dataclass
class Search:
    size: int  # the largest candidate that ran a whole step; 0 if none did
    tries: list[tuple[int, bool]] = field(default_factory=list)  # (size, fitted), in the order tried


def candidate_sizes(global_batch_size: int, world_size: int) -> list[int]:
    """The micro-batches that keep global_batch_size exactly on world_size processes: the divisors
    of each process's share, smallest first. That share is also the search's cap: a micro-batch
    larger than one process's part of the global batch has nothing to run."""
    share = global_batch_size // world_size
    small = [d for d in range(1, math.isqrt(share) + 1) if share % d == 0]
    return sorted(set(small + [share // d for d in small]))


def largest_fitting(try_size: Callable[[int], None], sizes: list[int], after_oom: Callable[[], None] = lambda: None
                    ) -> Search:
    """The largest of sizes (ascending) for which try_size(size) runs without torch.OutOfMemoryError,
    assuming that what fits, fits at every smaller size. after_oom() tidies what a failed try left
    half done (gradients, the grad scaler's state) before the next one.

    The smallest size goes first: a first step allocates for good what every later step runs
    beside (the optimizer's state), so each try of the search proper runs as the run's steps do.
    If even it fails, nothing fits."""
    search = Search(0)
    if not sizes:
        return search
    fitted = _fits(try_size, sizes[0], after_oom)
    search.tries.append((sizes[0], fitted))
    if not fitted:
        return search
    search.size = sizes[0]
    low, high = 1, len(sizes)  # sizes[:low] are known to fit, sizes[high:] known not to
    while low < high:
        middle = (low + high) // 2
        fitted = _fits(try_size, sizes[middle], after_oom)
        search.tries.append((sizes[middle], fitted))
        if fitted:
            search.size, low = sizes[middle], middle + 1
        else:
            high = middle
    return search


def _fits(try_size: Callable[[int], None], size: int, after_oom: Callable[[], None]) -> bool:
    import torch

    try:
        try_size(size)
        fitted = True
    except torch.OutOfMemoryError:  # not kept (no `as`): its traceback holds the failed try's tensors
        fitted = False
    if not fitted:
        after_oom()
    release_memory()
    return fitted


def release_memory() -> None:
    """Give back what the last try allocated: Python's cycles first, then CUDA's cached blocks, so
    that the next try (and the run after the search) starts from the same free memory."""
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def agree(size: int, env: DistEnv) -> int:
    """The size every rank can run: the smallest that any rank found."""
    return min(distributed.gather_to_all(size, env))


def check_device(config: TrainConfig, device_type: str) -> None:
    """batch_size=auto is refused, before anything runs, where a failed allocation is not an
    OutOfMemoryError that leaves the process able to try again (a CPU: the kernel's OOM killer or
    swap; Apple's GPU: shared memory that swaps instead of failing)."""
    if config.batch_size == AUTO and device_type != "cuda":
        raise ConfigError(
            f"batch_size=auto finds the micro-batch that fits by trying steps on a CUDA GPU, and this run's device "
            f"is {device_type}, where running out of memory cannot be caught and retried: set batch_size to a number "
            f"(e.g. batch_size=12; the memory check before the run says how many fit)"
        )


def nothing_fits(config: TrainConfig, where: str) -> UserError:
    fsdp = (" (the search tries one process's whole model; with hardware.fsdp=true set batch_size by hand)"
            if config.hardware.fsdp else "")
    return UserError(
        f"batch_size=auto: not even one sequence of block_size={config.block_size} fits a training step on {where}"
        f"{fsdp}: lower block_size or the model size"
    )


def describe(search: Search, chosen: int, accumulation: int, global_batch_size: int, world_size: int) -> str:
    """The log line of the choice: what fitted, what runs, and how the global batch holds."""
    tried = ", ".join(f"{size} {'ok' if fitted else 'OOM'}" for size, fitted in search.tries)
    others = f"; the smallest any of the {world_size} processes found: {chosen}" if chosen != search.size else ""
    return (f"batch_size=auto: {chosen} sequences per micro-step x {accumulation} micro-steps x {world_size} "
            f"processes = global_batch_size {global_batch_size} (tried {tried}{others})")
