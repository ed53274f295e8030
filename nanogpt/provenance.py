"""What a run records about itself, so that six months later its numbers can be traced to code.

Every run dir gets, besides Hydra's `.hydra/` snapshot:
    config.resolved.yaml  the config exactly as the code used it (interpolations and env resolved)
    provenance.json       code (git commit, branch, dirty flag, diff), command line, versions, host,
                          SLURM ids, seed, start/end time and status: running | done | failed
    DONE                  written last, only when the run ended well

Environment variables are never recorded: API keys and tokens live there.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from nanogpt.cli import PACKAGE_DIR

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
    import torch

    from nanogpt import __version__

    found = {"python": platform.python_version(), "nanogpt": __version__}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["cuda"] = torch.version.cuda
    found["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    return found


class RunRecord:
    """provenance.json of one run, kept up to date as the run goes (start, end, status)."""

    def __init__(self, run_dir: Path, seed: int, resolved_yaml: str):
        self.run_dir = Path(run_dir)
        (self.run_dir / "config.resolved.yaml").write_text(resolved_yaml)
        self.record = {
            "status": "running",
            "start_time": _now(),
            "end_time": None,
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm": {k: os.environ[k] for k in SLURM_VARIABLES if k in os.environ},
            "world_size": 1,
            "seed": seed,
            "git": git_state(),
            "versions": versions(),
        }
        self._write()
        self._started = time.monotonic()

    def finish(self, status: str) -> None:
        self.record.update(status=status, end_time=_now(), wall_seconds=round(time.monotonic() - self._started, 1))
        self._write()
        if status == "done":
            (self.run_dir / "DONE").write_text(self.record["end_time"] + "\n")

    def _write(self) -> None:
        path = self.run_dir / "provenance.json"
        tmp = path.with_name(".provenance.json.tmp")
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(tmp, path)
