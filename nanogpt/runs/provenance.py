"""What a run records about itself, so that six months later its numbers can be traced to code.

Every run dir gets, besides Hydra's `.hydra/` snapshot:
    config.resolved.yaml  the config exactly as the code uses it (interpolations resolved); a resumed
                          run rewrites it, and records what it changed in provenance.json
    provenance.json       code (git commit, branch, dirty flag, diff), command line, versions, host,
                          machine (CPU, cores, threads, GPUs), SLURM ids, seed, start/end time and
                          status: running | done | failed | preempted | pruned; each resume appended to
                          `resumes`; a reproduction's source run
    DONE                  written last, only when the run ended well
    PRUNED                instead of DONE, when a search's pruner ended the run (a trial, nanogpt/sweeps/search.py)

Environment variables are never recorded: API keys and tokens live there.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nanogpt import __version__
from nanogpt.config import PACKAGE_DIR
from nanogpt.runs.resume import flatten
from nanogpt.runs.runfiles import RunFileError, read_json, read_yaml, write_error

log = logging.getLogger("nanogpt")

PACKAGES = ("torch", "hydra-core", "omegaconf", "numpy", "tiktoken", "wandb", "submitit")
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_state(repo: Path = PACKAGE_DIR.parent) -> dict:
    """The checkout the code runs from: commit, branch, and uncommitted changes (the diff itself).
    Empty when the package is not in a git checkout (an installed wheel)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    diff = git("diff", "HEAD")
    untracked = git("ls-files", "--others", "--exclude-standard").split()
    return {
        "commit": commit,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD").strip(),
        "dirty": bool(diff or untracked),
        "diff": diff,
        "untracked": untracked,
    }


def versions() -> dict:
    from importlib import metadata  # not at the top: it costs nanogpt-train --cfg job 10 ms

    import torch

    found = {"python": platform.python_version(), "nanogpt": __version__}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["cuda"] = torch.version.cuda
    found["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    return found


def machine() -> dict:
    """What the run ran on, for numbers read next to others: the CPU, its cores, torch's threads, the GPUs."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() often gives only the architecture
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus}


def code_differences(then: dict, now: dict) -> list[str]:
    """How the code now differs from the code a run used (both git_state() dicts)."""
    if not then or not now:
        return [] if then == now else ["the code's git state is unknown for one of the two runs"]
    found = []
    if then.get("commit") != now.get("commit"):
        found.append(f"the code is at commit {str(now.get('commit'))[:12]}, the run used {str(then.get('commit'))[:12]}")
    if then.get("diff") != now.get("diff") or then.get("untracked") != now.get("untracked"):
        found.append("the uncommitted changes differ from the run's (see git.diff in both provenance.json)")
    return found


class RunRecord:
    """provenance.json of one run, kept up to date as the run goes (start, end, status).

    A run that continues in its dir (resume) keeps its record: the first start's fields stay,
    and each later start appends to `resumes`. A reproduced run names its source run."""

    def __init__(self, run_dir: Path, seed: int, resolved: dict, world_size: int = 1,
                 resumed_from: tuple[Path, int] | None = None, reproduced_from: str | None = None):
        try:
            self._start(run_dir, seed, resolved, world_size, resumed_from, reproduced_from)
        except OSError as e:  # a read-only or full run dir: one line, before the run starts
            raise write_error(e.filename or run_dir, e) from e

    def _start(self, run_dir, seed, resolved, world_size, resumed_from, reproduced_from) -> None:
        from omegaconf import OmegaConf

        self.run_dir = Path(run_dir)
        path = self.run_dir / "provenance.json"
        config_path = self.run_dir / "config.resolved.yaml"
        this_start = {
            "start_time": _now(),
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm": {k: os.environ[k] for k in SLURM_VARIABLES if k in os.environ},
            "git": git_state(),
        }
        try:
            previous = read_json(path, missing_ok=True)
        except RunFileError as e:  # unreadable: keep it for a person to look at, and start a new record
            aside = path.with_name(f"provenance.unreadable-{int(time.time())}.json")
            path.rename(aside)
            log.warning(f"warning: {str(e).rsplit(':', 1)[0]}: moved it to {aside.name}; this start writes a new one")
            previous = None
        if previous is not None:  # this dir's run continues (or restarts before its first checkpoint)
            warnings = code_differences(previous.get("git", {}), this_start["git"])
            before = {}
            if config_path.exists():
                before = flatten(OmegaConf.to_container(read_yaml(
                    config_path, fix="restore it from a copy of the run, or start the run again with reproduce=")))
            after = flatten(resolved)
            changed = {k: [before.get(k), after.get(k)] for k in sorted(before.keys() | after.keys())
                       if before.get(k) != after.get(k)}
            self.record = previous
            self.record.setdefault("resumes", []).append({
                **this_start,
                "from_checkpoint": str(resumed_from[0]) if resumed_from else None,
                "from_step": resumed_from[1] if resumed_from else 0,
                "changed": changed,  # config keys this start changed: {key: [before, now]}
                "world_size": world_size,
                "versions": versions(),
                "machine": machine(),
                "warnings": warnings,
            })
            self.record.update(status="running", end_time=None)
            for marker in ("DONE", "PRUNED"):
                (self.run_dir / marker).unlink(missing_ok=True)
        else:
            warnings = []
            self.record = {"status": "running", **this_start, "end_time": None, "world_size": world_size, "seed": seed,
                           "versions": versions(), "machine": machine()}
            if resumed_from is not None:  # a fresh dir that continues another run's checkpoint (a nanoGPT ckpt.pt)
                self.record["continues"] = {"checkpoint": str(resumed_from[0]), "step": resumed_from[1]}
            if reproduced_from is not None:
                source = _read_json(Path(reproduced_from) / "provenance.json")
                warnings = code_differences(source.get("git", {}), this_start["git"])
                self.record["reproduced_from"] = {
                    "run_dir": str(reproduced_from),
                    "git_commit": source.get("git", {}).get("commit"),
                    "warnings": warnings,
                }
        tmp = config_path.with_name(".config.resolved.yaml.tmp")  # the config the code uses from now on
        tmp.write_text(OmegaConf.to_yaml(resolved))
        os.replace(tmp, config_path)
        for warning in warnings:
            log.warning(f"warning: {warning}")
        self._wall_before = self.record.get("wall_seconds", 0.0)
        self._write()
        self._started = time.monotonic()

    def finish(self, status: str, outcome: dict | None = None, **this_start: Any) -> None:
        """Record how the run ended; outcome's fields (ended_by, target: what the run as a whole
        reached) go to the record itself, this_start's (e.g. startup_seconds) to this start's entry:
        the record itself for the first start, its last `resumes` entry for a later one."""
        wall = round(self._wall_before + time.monotonic() - self._started, 1)
        self.record.update(status=status, end_time=_now(), wall_seconds=wall)
        self.record.update({k: v for k, v in (outcome or {}).items() if v is not None})
        (self.record["resumes"][-1] if "resumes" in self.record else self.record).update(
            {k: v for k, v in this_start.items() if v is not None})
        try:
            self._write()
            if status in ("done", "pruned"):
                (self.run_dir / status.upper()).write_text(self.record["end_time"] + "\n")
        except OSError as e:
            raise write_error(e.filename or self.run_dir / "provenance.json", e, self.run_dir) from e

    def finish_after_error(self, status: str) -> None:
        """finish(status) for a run that is ending on an error: never raises, since the error that
        ended the run is the one to show. When the disk is full or read-only it says, in one log
        line, that the status could not be recorded."""
        try:
            self.finish(status)
        except Exception as e:  # noqa: BLE001 - whatever it was, the first error goes on
            log.warning(f"warning: the run's status ({status}) could not be recorded: {e}")

    def _write(self) -> None:
        path = self.run_dir / "provenance.json"
        text = json.dumps(self.record, indent=2) + "\n"
        tmp = path.with_name(".provenance.json.tmp")
        try:
            tmp.write_text(text)
        except OSError:  # a full disk has no room for a second file: rewrite the one there in place
            tmp.unlink(missing_ok=True)
            with open(path, "r+") as f:
                f.write(text)
                f.truncate()
            return
        os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    """Another run's provenance.json, or {} when it is missing or unreadable (it only adds warnings)."""
    try:
        return read_json(path, missing_ok=True) or {}
    except RunFileError as e:
        log.warning(f"warning: {e}")
        return {}
