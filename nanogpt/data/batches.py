"""Training batches: random windows of a token file, as nanoGPT's get_batch draws them.

The data order is defined globally, not per process: every process draws the offsets of a whole
global batch from one shared stream and reads only its own share. So with the same seed and the
same global batch, 1 process x 4 micro-steps, 2 processes x 2 and 4 x 1 train on the same
windows, and a run resumed on another number of processes continues the same data order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanogpt.errors import UserError


class RandomWindows:
    """Batches of `batch_size` windows of `block_size + 1` tokens at uniformly random offsets.

    Offsets are drawn `draw_size` at a time (the global batch: all processes' micro-steps of one
    optimizer step) from a torch.Generator: its own, seeded with `seed`, or a `generator` shared
    with other samplers (training shares one with evaluation, as nanoGPT's get_batch shares the
    global RNG). Each call takes the next `batch_size x world_size` drawn offsets and returns
    this rank's `batch_size` of them. `state_dict()` captures where the stream is, so a resumed
    run draws the same windows as one that never stopped.
    """

    def __init__(
        self,
        path_to_bin: str | os.PathLike,
        dtype: str,
        block_size: int,
        batch_size: int,
        device: str | torch.device,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        draw_size: int | None = None,
    ):
        if (seed is None) == (generator is None):
            raise ValueError("give RandomWindows either a seed or a generator")
        self.path = Path(path_to_bin)
        self.dtype = np.dtype(dtype)
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.draw_size = draw_size or batch_size * world_size
        if self.draw_size % (batch_size * world_size):
            raise ValueError("draw_size must be a multiple of batch_size x world_size")
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise UserError(f"cannot read {self.path} ({e.strerror}): prepare the dataset (nanogpt-prepare)") from e
        if size % self.dtype.itemsize:
            raise UserError(f"{self.path} is not a whole number of {self.dtype.name} tokens: re-prepare the dataset")
        self.num_tokens = size // self.dtype.itemsize
        if self.num_tokens <= block_size:
            raise UserError(
                f"{self.path.name} holds {self.num_tokens} tokens, fewer than block_size+1 = {block_size + 1}: "
                f"lower block_size or use more data"
            )
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self._drawn = torch.empty(0, dtype=torch.int64)  # offsets drawn and not yet handed out
        self._last = torch.empty(0, dtype=torch.int64)  # the offsets of the batch handed out last
        # Pinned host memory lets the copy to the GPU overlap with compute.
        self._pin = self.device.type == "cuda"

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch_size, block_size) int64 tokens and y, the same windows shifted by one token."""
        if len(self._drawn) == 0:
            self._drawn = torch.randint(self.num_tokens - self.block_size, (self.draw_size,), generator=self.generator)
        share = self.batch_size * self.world_size
        self._last, self._drawn = self._drawn[:share], self._drawn[share:]
        starts = self._last[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        # A fresh memmap per batch, as nanoGPT does: pages read through one long-lived memmap stay
        # charged to the process and look like a memory leak on large datasets.
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        windows = np.stack([data[i : i + self.block_size + 1] for i in starts.tolist()])
        del data
        x = torch.from_numpy(windows[:, :-1].astype(np.int64))
        y = torch.from_numpy(windows[:, 1:].astype(np.int64))
        if self._pin:
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self, include_last: bool = False) -> dict[str, Any]:
        """Where the stream is. include_last: the batch handed out last has not been used yet (the
        training loop draws each step's first batch ahead), so it is drawn again after a resume."""
        pending = torch.cat([self._last, self._drawn]) if include_last else self._drawn.clone()
        return {"generator": self.generator.get_state(), "pending": pending, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gen_state = state["generator"]
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8:
            raise UserError("the saved batch state is not a torch generator state: the checkpoint is corrupt")
        self.generator.set_state(gen_state)
        self._drawn = state.get("pending", torch.empty(0, dtype=torch.int64)).clone()
        self._last = torch.empty(0, dtype=torch.int64)


class RandomTokens:
    """Batches of uniformly random tokens: benchmarks without a dataset (bench.real_data=false), and
    batch_size=auto's trial steps (nanogpt/parallel/autobatch.py)."""

    def __init__(self, vocab_size: int, block_size: int, batch_size: int, device: str, generator):
        self.shape, self.vocab_size, self.device, self.generator = (batch_size, block_size), vocab_size, device, generator

    def next_batch(self):
        xy = torch.randint(self.vocab_size, (self.shape[0], self.shape[1] + 1), generator=self.generator)
        return xy[:, :-1].contiguous().to(self.device), xy[:, 1:].contiguous().to(self.device)
