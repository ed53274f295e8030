"""Our checkpoint files: what they hold, and how they are written and read safely.

A checkpoint is one `torch.save`d dict of tensors and plain values (no pickled classes), so it
loads with `weights_only=True`:

    format          "nanogpt-checkpoint"      version   1
    model           the model's state dict    model_config  ModelConfig as a plain dict
    optimizer       optimizer state dict      scaler        GradScaler state dict (or {})
    step            optimizer steps done      best_val_loss  float
    data_meta       the dataset's meta.json (the tokenizer travels with the weights)
    config          the run's resolved config, as JSON text

Writes go to a temp file in the same dir, are fsynced, then renamed over the target: a crash
mid-save leaves the previous file intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nanogpt.config import Activation, ModelConfig, UserError

FORMAT = "nanogpt-checkpoint"
VERSION = 1


def model_config_to_dict(config: ModelConfig) -> dict:
    d = dataclasses.asdict(config)
    d["activation"] = Activation(d["activation"]).value
    return d


def model_config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in known})


def save(payload: dict[str, Any], path: str | Path) -> None:
    """Atomically write payload to path (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def training_payload(t, step: int, best_val_loss: float, data_meta: dict, resolved_config: dict) -> dict:
    """What a checkpoint of a training run (a `train.Training`) holds, as the module doc lists."""
    return {
        "model": t.raw_model.state_dict(),
        "model_config": model_config_to_dict(t.raw_model.config),
        "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict(),
        "step": step,
        "best_val_loss": best_val_loss,
        "data_meta": data_meta,
        "config": json.dumps(resolved_config, default=str),
    }


def link_as(source: Path, target: Path) -> None:
    """Make target a second name of source's file, atomically: no second write of the same bytes.
    (The next save replaces source by a new file; target keeps this one.)"""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry, not only the file's bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse to fsync a directory
        pass
    finally:
        os.close(fd)


def load_file(path: str | Path) -> dict:
    """Load any .pt file with weights_only=True (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # mmap: tensors are paged in when used, so sampling does not read the optimizer state
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(
            f"cannot read checkpoint {path}: it is truncated, corrupt, not a PyTorch file, or holds pickled "
            f"objects (which are never loaded)"
        ) from e


def is_ours(payload: dict) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def find_in_run_dir(run_dir: str | Path, which: str = "best") -> Path:
    """The checkpoint file of a run dir: checkpoints/{best,last}.pt (best falls back to last)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    order = ["best", "last"] if which == "best" else [which]
    for name in order:
        candidate = ckpt_dir / f"{name}.pt"
        if candidate.is_file():
            return candidate
    raise UserError(f"{run_dir} holds no checkpoints/{which}.pt: is it a run dir of a run that saved?")


