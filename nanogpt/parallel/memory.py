"""How much memory a training step needs, and whether the machine has it: checked before the run
dir exists, so that `batch_size=100000` is one line and not an out-of-memory trace from the first
step (and a failed run dir).

The estimate is a lower bound, so that it never refuses a run that would fit:
    weights, gradients and AdamW's two moments  16 bytes per parameter (all float32)
    activations kept for the backward pass      per layer and token, at least 16 x n_embd values
                                                (block input and both norms' outputs, q/k/v, the
                                                attention output, the MLP's 4 x n_embd twice), in
                                                the autocast dtype (float32 without autocast)
    logits and their gradient                   2 x vocab_size float32 values per token
Real steps need more (temporaries, the allocator's slack), so a run the check lets through may
still run out; that ends in one line too (`out_of_memory_error`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanogpt.config import AUTO, Position, TrainConfig
from nanogpt.errors import ConfigError, UserError

GIB = 1024**3


@dataclass
class StepMemory:
    state: int  # bytes of weights, gradients and optimizer state
    activations: int  # bytes of what one micro-batch keeps for backward

    @property
    def total(self) -> int:
        return self.state + self.activations


def parameters(config: TrainConfig, vocab_size: int) -> int:
    """The model's parameter count, from its config (as GPT builds it, biases and norms included)."""
    m = config.model
    d, blocks = m.n_embd, m.n_layer
    per_block = 12 * d * d + (13 * d if m.bias else 0) + 4 * d  # attention and MLP matrices, biases, two norms
    embeddings = vocab_size * d + (m.block_size * d if m.position == Position.learned else 0)
    head = 0 if m.tie_embeddings else vocab_size * d
    return blocks * per_block + embeddings + head + 2 * d


def estimate(config: TrainConfig, vocab_size: int, dtype_bytes: int) -> StepMemory:
    """The least memory one process needs for a training step of config (see the module doc)."""
    tokens = config.batch_size * config.block_size  # one micro-batch: accumulation frees the previous one's
    per_token = config.model.n_layer * 16 * config.model.n_embd * dtype_bytes + 2 * vocab_size * 4
    return StepMemory(state=16 * parameters(config, vocab_size), activations=tokens * per_token)


def available(device: str) -> tuple[int, str] | None:
    """Bytes this process may still allocate on device, and the device in words; None if unknown."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, f"the GPU ({torch.cuda.get_device_name(torch.device(device))})"
    if device != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_room()
    if free is None and limit is None:
        return None
    return min(x for x in (free, limit) if x is not None), "this machine's RAM"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """What a container's memory limit (cgroup v2) leaves, if there is one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def fitting_batch_size(config: TrainConfig, step: StepMemory, room: int) -> int:
    per_sequence = step.activations // config.batch_size
    return max(0, (room - step.state) // per_sequence) if per_sequence else config.batch_size


def _advice(config: TrainConfig, fits: int, auto: bool = False) -> str:
    if fits < 1:
        return "the model itself does not fit: pick a smaller model (or more devices with hardware.fsdp=true)"
    search = " (on a GPU, batch_size=auto finds the largest that fits by trying steps)" if auto else ""
    return (f"lower batch_size (at most about {fits} fit{search}), and keep the global batch with global_batch_size, "
            f"which accumulates gradients over micro-batches; or lower block_size")


def check_fits(config: TrainConfig, vocab_size: int, device: str, dtype_bytes: int, processes: int = 1) -> None:
    """A ConfigError when one training step cannot fit in what the device has available.
    processes: how many processes of the run share this device's memory (CPU processes do)."""
    room = available(device)
    if room is None:
        return
    free, where = room
    step = estimate(config, vocab_size, dtype_bytes)
    share = free // processes
    if step.total <= share:
        return
    each = f" for each of the {processes} processes" if processes > 1 else ""
    raise ConfigError(
        f"a training step needs at least {step.total / GIB:.1f} GiB{each} ({step.state / GIB:.2f} GiB of weights, "
        f"gradients and optimizer state, {step.activations / GIB:.1f} GiB of activations for batch_size="
        f"{config.batch_size} x block_size={config.block_size}), and {where} has {free / GIB:.1f} GiB available: "
        + _advice(config, fitting_batch_size(config, step, share), auto=device.startswith("cuda"))
    )


def out_of_memory_error(config: TrainConfig, detail: str) -> UserError:
    """The one line for a step that ran out of memory although the estimate let it through."""
    first = detail.strip().splitlines()[0] if detail.strip() else "out of memory"
    if config.batch_size == AUTO:  # the trial steps fitted, the run did not (fragmentation, evaluation)
        return UserError(
            f"the run ran out of memory ({first[:200]}) with the micro-batch batch_size=auto picked (its log names "
            f"it) x block_size={config.block_size}: set batch_size to a number below it (global_batch_size keeps "
            f"the global batch)"
        )
    return UserError(
        f"the run ran out of memory ({first[:200]}) with batch_size={config.batch_size} x block_size="
        f"{config.block_size}: lower batch_size, and keep the global batch with global_batch_size (it "
        f"accumulates gradients over micro-batches); or lower block_size or the model size"
    )
