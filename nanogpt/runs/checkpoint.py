"""Our checkpoint files: what they hold, and how they are written, verified and read safely.

A checkpoint is one `torch.save`d dict of tensors and plain values (no pickled classes), so it
loads with `weights_only=True`:

    format          "nanogpt-checkpoint"      version   1
    model           the model's state dict    model_config  ModelConfig as a plain dict
    optimizer       optimizer state dict      scaler        GradScaler state dict (or {})
    step            optimizer steps done      best_val_loss  float
    data_meta       the dataset's meta.json (the tokenizer travels with the weights)
    config          the run's resolved config, as JSON text
    resume          what an exact resume needs besides: RNG states, the batch drawn for the next
                    step, skipped steps, the wandb and MLflow run ids (see nanogpt/train.py)

A run's `checkpoints/` dir holds `last.pt` (the newest), `best.pt` (lowest val loss) and the last
K `step-NNNNNNNN.pt`. They are names of files written once: each save writes one new file and
links the names to it, so `last.pt` and the newest step file cost no extra disk. Every file's
SHA-256 and size go to `checksums.json` before a name points to it, so a truncated or corrupt
file is found and named, and resuming falls back to the newest good one. A checkpoint is also a zip
whose every member carries its CRC-32: when checksums.json is missing or unreadable, that is what
checks a file (and what checks a checkpoint loaded by path, for sampling or init_from).

Writes go to a temp file in the same dir, are fsynced, then renamed over the target: a crash
mid-save leaves the previous files intact. Temp files are named after the host and process that
write them, so the next start removes those of a process that is gone, and only those.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.runs.runfiles import RunFileError, read_json

FORMAT = "nanogpt-checkpoint"
VERSION = 1
CHECKSUMS = "checksums.json"
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
# .NAME.HOST.PID.TAG.tmp: a temp file of a save (or of checksums.json), by the process that writes it
TEMP_FILE = re.compile(r"^\.(last\.pt|best\.pt|step-\d+\.pt|checksums\.json)\.(.+)\.(\d+)\.(\w+)\.tmp$")
LEGACY_TEMP_FILE = re.compile(r"^\.(last\.pt|best\.pt|step-\d+\.pt|checksums\.json)\.(\w+\.)?tmp$")  # before 0.x: no owner
STALE_AFTER_S = 600  # a temp file of another host untouched this long has no live writer
_WARNED: set[str] = set()  # dirs whose missing or unreadable checksums.json this process has named
_VERIFIED: set[tuple] = set()  # files whose SHA-256 this process checked: (path, inode, size, mtime)

log = logging.getLogger("nanogpt")


def model_config_to_dict(config: ModelConfig) -> dict:
    """Plain values only (enums as their names): checkpoints load with weights_only=True."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in dataclasses.asdict(config).items()}


def model_config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in known})


class _HashingWriter:
    """A file that hashes what is written through it, so a checksum costs no second read."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch.save reports a failed write as a RuntimeError

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _temp_prefix(name: str) -> str:
    """The start of the name of a temp file this process writes for `name` (see TEMP_FILE)."""
    return f".{name}.{socket.gethostname()}.{os.getpid()}."


def _write_temp(payload: dict[str, Any], directory: Path, name: str) -> tuple[Path, dict]:
    """Write payload to a fsynced temp file in directory. Returns it with its size and SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(name), suffix=".tmp", dir=directory)
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save({"format": FORMAT, "version": VERSION, **payload}, writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if writer is not None and writer.error is not None and not isinstance(e, OSError):
            raise writer.error from e  # the disk's own error (full, quota, I/O), not torch's wrapper
        raise
    return Path(tmp), {"bytes": writer.size, "sha256": writer.sha256.hexdigest()}


def save(payload: dict[str, Any], path: str | Path) -> dict:
    """Atomically write payload to path (temp file + fsync + rename). Returns its size and SHA-256."""
    path = Path(path)
    tmp, info = _write_temp(payload, path.parent, path.name)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return info


def link_as(source: Path, target: Path) -> None:
    """Make target a second name of source's file, atomically: no second write of the same bytes.
    (The next save replaces source by a new file; target keeps this one.)"""
    tmp = target.with_name(f"{_temp_prefix(target.name)}link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK):
            raise  # disk full, read-only, permissions: a copy would fail too
        shutil.copyfile(source, tmp)  # a filesystem without hard links
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


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{_temp_prefix(path.name)}json.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def zip_problem(path: Path) -> str | None:
    """None if every member of the checkpoint's zip matches the CRC-32 the writer stored for it
    (torch.save stores one per member; torch.load does not check them), else what is wrong."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"it is not a whole zip file ({e}; truncated?)"
    except (ValueError, RuntimeError, zipfile.LargeZipFile) as e:  # e.g. a corrupt header
        return f"its zip structure is damaged ({e})"
    if bad is not None:
        return f"the CRC-32 of {bad} inside it does not match (corrupt?)"
    return None


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions): the previous one is intact."""


class CheckpointDir:
    """A run's checkpoints/ dir: save a step under its names, and find the newest good checkpoint.

    checksums.json maps the SHA-256 of every checkpoint file to its size and step, and each name
    to the SHA-256 and inode of its file. A file's hash is recorded before any name points to it,
    so a file is good exactly when its own hash is recorded: a crash at any point of a save leaves
    every name checkable. The name map only decides which hashes are still needed; a name whose
    file changed behind its back (a crash mid-save, a copied run dir) is hashed again.
    """

    def __init__(self, path: str | Path, keep_last: int = 0):
        self.path = Path(path)
        self.keep_last = keep_last

    # --- writing ---------------------------------------------------------------------------

    def save(self, payload: dict[str, Any], step: int, best: bool) -> Path:
        """Write the checkpoint of `step` as last.pt, plus step-N.pt (when keep_last > 0) and
        best.pt (when `best`); keep the newest keep_last step files. Returns last.pt."""
        last = self.path / "last.pt"
        try:
            tmp, info = _write_temp(payload, self.path, last.name)
            try:
                record = self._record_to_extend()
                record["checksums"][info["sha256"]] = {"bytes": info["bytes"], "step": step}
                _write_json(self.path / CHECKSUMS, record)  # known before any name points to it
                os.replace(tmp, last)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.path)
            names = [last]
            if self.keep_last > 0:
                names.append(self.path / f"step-{step:08d}.pt")
                link_as(last, names[-1])
            if best:
                names.append(self.path / "best.pt")
                link_as(last, names[-1])
            for old in self._step_files_to_drop(step):
                old.unlink()
            for name in names:
                record["files"][name.name] = {"sha256": info["sha256"], "inode": last.stat().st_ino}
            self._forget_unused(record)
            _write_json(self.path / CHECKSUMS, record)
        except OSError as e:
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {step} to {self.path} ({e.strerror or e}); the previous "
                f"checkpoint is intact: free disk space or fix the permissions, then continue with "
                f"resume={self.path.parent}"
            ) from e
        return last

    def _step_files_to_drop(self, step: int) -> list[Path]:
        """Step files beyond the newest keep_last, and any of a later step than this one (left by a
        run that fell back to an older checkpoint: this run has replaced them)."""
        files = self.step_files()
        later = [p for p in files if _step_of(p) > step]
        kept = [p for p in files if _step_of(p) <= step][: self.keep_last]
        return [p for p in files if p in later or p not in kept]

    def _forget_unused(self, record: dict) -> None:
        """Drop the names that are gone and the hashes no name needs. A name whose inode changed
        since it was recorded is hashed again first, so no good file loses its hash."""
        files = {}
        for name in self.candidates():
            entry = record["files"].get(name.name)
            inode = name.stat().st_ino
            if not isinstance(entry, dict) or entry.get("inode") != inode:
                sha = _sha256_of(name)
                if sha not in record["checksums"]:
                    continue  # not one of ours, or corrupt: nothing to keep for it
                entry = {"sha256": sha, "inode": inode}
            files[name.name] = entry
        record["files"] = files
        needed = {entry["sha256"] for entry in files.values()}
        record["checksums"] = {k: v for k, v in record["checksums"].items() if k in needed}

    def _record_to_extend(self) -> dict:
        """checksums.json to add a save to. One that is missing or unreadable is rebuilt from the
        files that pass their zip's CRC-32 check, so that they stay checkable after this save."""
        record, problem = self._checksums()
        if problem is not None:
            for path in self._distinct_candidates():
                if zip_problem(path) is None:
                    record["checksums"][_sha256_of(path)] = {"bytes": path.stat().st_size, "step": _step_of(path)}
        return record

    def remove_partial_writes(self) -> list[Path]:
        """Delete the temp files that saves interrupted by a crash or a kill left, also of a run
        that had no checkpoint yet. Only our own files (TEMP_FILE), and only of a process that is
        gone: one of this host whose pid is not alive, or of another host untouched for
        STALE_AFTER_S. Every rank of a multi-process run may call this."""
        if not self.path.is_dir():
            return []
        removed = []
        for path in self.path.iterdir():
            if path.is_file() and _writer_is_gone(path):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    # --- reading ---------------------------------------------------------------------------

    def step_files(self) -> list[Path]:
        """step-N.pt files, newest first."""
        return sorted((p for p in self.path.glob("step-*.pt") if STEP_FILE.match(p.name)), key=_step_of, reverse=True)

    def candidates(self) -> list[Path]:
        """Every checkpoint file of the dir, in the order a resume tries them: last, steps, best."""
        names = [self.path / "last.pt", *self.step_files(), self.path / "best.pt"]
        return [p for p in names if p.is_file()]

    def verify(self, path: Path) -> str | None:
        """None if path's SHA-256 is one this run recorded, else what is wrong with it. When
        checksums.json is missing or unreadable (which is said, once), the CRC-32s inside the
        file's zip check it instead."""
        stat = path.stat()
        identity = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if identity in _VERIFIED:
            return None
        record, problem = self._checksums()
        if problem is not None:
            if str(self.path.resolve()) not in _WARNED:
                _WARNED.add(str(self.path.resolve()))
                log.warning(f"{problem}: checking the checkpoints by the CRC-32 sums inside their zip files instead")
            problem = zip_problem(path)
            if problem is not None:
                return problem
        elif _sha256_of(path) not in record["checksums"]:
            entry = record["files"].get(path.name)
            written = record["checksums"].get(entry["sha256"]) if entry is not None else None
            if written is not None and written["bytes"] != stat.st_size:
                return f"it is {stat.st_size:,} bytes but was written as {written['bytes']:,} (truncated?)"
            return "its SHA-256 matches no checkpoint this run wrote (corrupt, or another run's file?)"
        _VERIFIED.add(identity)
        return None

    def check_any_good(self) -> None:
        """A UserError naming what is wrong with each checkpoint, unless one passes its checks.
        (Preflight calls this; the hashes it computes are not computed again when the run loads.)"""
        problems = []
        for path in self._distinct_candidates():
            problem = self.verify(path)
            if problem is None:
                return
            problems.append(f"{path.name} is unusable: {problem}")
        raise self._none_usable(problems)

    def _none_usable(self, problems: list[str]) -> UserError:
        return UserError(f"no usable checkpoint in {self.path}: {'; '.join(problems)}; start the run again in a "
                         f"fresh dir (reproduce=<run dir>)")

    def _distinct_candidates(self) -> list[Path]:
        """candidates(), each file once (last.pt and the newest step-N.pt are one file)."""
        distinct, seen = [], set()
        for path in self.candidates():
            if path.stat().st_ino not in seen:
                seen.add(path.stat().st_ino)
                distinct.append(path)
        return distinct

    def load_latest_good(self, mmap: bool = False, belongs=None) -> tuple[dict, Path]:
        """The newest checkpoint that passes its checks and loads; says which ones it skipped.
        Read whole by default: all of it is used, and the file will be replaced while training.
        belongs(payload): None if the checkpoint is one of this run's, else why not (a file of
        another run copied in is skipped like a corrupt one)."""
        if not self.candidates():
            raise UserError(f"{self.path} holds no checkpoint (last.pt, step-N.pt or best.pt) to resume from")
        problems = []
        for path in self._distinct_candidates():
            problem = self.verify(path)
            if problem is None:
                try:
                    payload = load_file(path, mmap=mmap)
                except UserError as e:
                    problem = str(e)
                else:
                    if not is_ours(payload) or "resume" not in payload:
                        problem = "it is not a checkpoint of a nanogpt training run"
                    elif belongs is not None:
                        problem = belongs(payload)
            if problem is None:
                if problems:
                    log.warning(f"{'; '.join(problems)}; resuming from {path.name} (step {payload['step']}) instead")
                return payload, path
            problems.append(f"{path.name} is unusable: {problem}")
        raise self._none_usable(problems)

    def _checksums(self) -> tuple[dict, str | None]:
        """checksums.json, and None; or an empty record and why it cannot be used (missing, not
        JSON, not the layout it is written in)."""
        empty = {"files": {}, "checksums": {}}
        path = self.path / CHECKSUMS
        try:
            record = read_json(path, missing_ok=True)
        except RunFileError as e:
            return empty, str(e).rsplit(":", 1)[0]
        if record is None:
            return empty, f"{self.path} has no {CHECKSUMS}"
        files, sums = record.get("files"), record.get("checksums")
        if not (isinstance(files, dict) and isinstance(sums, dict)
                and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values())
                and all(isinstance(v, dict) and isinstance(v.get("bytes"), int) for v in sums.values())):
            return empty, f"{path} is not a record of checksums (an entry is not an object of the form it is written in)"
        if not sums:  # written by no save (saves record a file before naming it): nothing to check against
            return empty, f"{path} records no checksums"
        return record, None

    def last_step(self) -> int | None:
        """The step of last.pt (None: there is none), as checksums.json records it, else as the
        file says (memory-mapped: only its small values are read)."""
        last = self.path / "last.pt"
        if not last.is_file():
            return None
        record, _ = self._checksums()
        entry = record["files"].get("last.pt")
        if entry is not None and entry.get("inode") == last.stat().st_ino:
            written = record["checksums"].get(entry["sha256"])
            if written is not None and isinstance(written.get("step"), int):
                return written["step"]
        try:
            return int(load_file(last, mmap=True)["step"])
        except (UserError, KeyError, TypeError, ValueError):
            return None


def _step_of(step_file: Path) -> int | None:
    match = STEP_FILE.match(step_file.name)
    return int(match.group(1)) if match else None


def _writer_is_gone(path: Path) -> bool:
    """Is path a temp file of ours whose writer is no longer alive? (see remove_partial_writes)"""
    match = TEMP_FILE.match(path.name)
    if match is None:
        return LEGACY_TEMP_FILE.match(path.name) is not None and _untouched_for(path, STALE_AFTER_S)
    host, pid = match.group(2), int(match.group(3))
    if host != socket.gethostname():
        return _untouched_for(path, STALE_AFTER_S)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _untouched_for(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def load_file(path: str | Path, mmap: bool = True) -> dict:
    """Load any .pt file with weights_only=True (tensors and plain containers only). mmap: tensors
    are paged in when used, so sampling does not read the optimizer state."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(
            f"cannot read checkpoint {path}: it is truncated, corrupt, not a PyTorch file, or holds pickled "
            f"objects (which are never loaded)"
        ) from e


def check_file(path: str | Path) -> None:
    """A UserError if a checkpoint file is corrupt: checked against its run's checksums.json when it
    sits in a checkpoints/ dir of ours, else by the CRC-32s inside its zip (a nanoGPT ckpt.pt, a
    copied file). A file this process checked already is not read again."""
    path = Path(path)
    if path.is_file():
        problem = _file_problem(path)
        if problem is not None:
            raise UserError(f"checkpoint {path} is unusable: {problem}: load another checkpoint of the run "
                            f"(a step-N.pt in its checkpoints/, or the run's last.pt or best.pt)")


def load_verified(path: str | Path, mmap: bool = True) -> dict:
    """load_file, after check_file."""
    check_file(path)
    return load_file(path, mmap=mmap)


def _file_problem(path: Path) -> str | None:
    if (path.parent / CHECKSUMS).exists() or path.parent.name == "checkpoints":
        return CheckpointDir(path.parent).verify(path)
    if not zipfile.is_zipfile(path):  # torch's legacy format, or not a checkpoint: torch.load says which
        return None
    stat = path.stat()
    identity = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity in _VERIFIED:
        return None
    problem = zip_problem(path)
    if problem is None:
        _VERIFIED.add(identity)
    return problem


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
