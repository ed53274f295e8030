"""Every random number generator a training step draws from, captured and restored as a whole.

Dropout draws from torch's generator of its device (CPU, CUDA or MPS), anything a user adds may draw from Python's
`random` or NumPy's global generator: an exact resume restores them all. (One process also draws its
batches from torch's CPU generator, as nanoGPT does: see train.build_training.) Nothing else may
draw from them between the seed and the end of training: a probe or a logger that needs random
numbers uses a torch.Generator of its own. The state is kept as
tensors and plain values, so it travels in a checkpoint that loads with `weights_only=True`.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture(device: str | torch.device) -> dict:
    """The state of every generator, with the CUDA one of `device` (each rank keeps its own)."""
    device = torch.device(device)
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore(state: dict, device: str | torch.device) -> None:
    device = torch.device(device)
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


def _as_tuples(value):
    """random.setstate wants the tuples it gave; a checkpoint may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
