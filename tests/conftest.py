"""Shared fixtures: the repo's shared/ folder (real data and tiktoken files), and Hydra composition."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"

# Real tiktoken, offline: its cache dir holds the hash-checked GPT-2 files.
if TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
os.environ.setdefault("WANDB_MODE", "offline")


def require_shakespeare() -> Path:
    """The real tiny Shakespeare, or a skip that says why (for module-scoped fixtures too)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"needs the real tiny Shakespeare at {SHAKESPEARE} (shared/ is absent)")
    return SHAKESPEARE


def require_mount_namespace(what: str) -> None:
    """Skip, saying why, unless `unshare -m` works here (root with CAP_SYS_ADMIN, as in CI)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip(f"needs `unshare -m` (root with CAP_SYS_ADMIN) to {what}")


@pytest.fixture
def shakespeare_path() -> Path:
    return require_shakespeare()


@pytest.fixture
def gpt2_tiktoken():
    if not TIKTOKEN_CACHE.is_dir():
        pytest.skip(f"needs tiktoken's GPT-2 files in {TIKTOKEN_CACHE} (shared/ is absent)")


def compose(config_name: str = "train", overrides: list[str] | None = None, hydra: bool = False):
    """Compose a config exactly as the entrypoints do (schemas and experiments registered)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nanogpt.config import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [], return_hydra_config=hydra)


def report_rows(stdout: str) -> list[list[str]]:
    """The rows of the per-run Markdown table nanogpt-report prints first (the tables of groups
    follow it), each as its stripped cells (job, overrides, status, best_val_loss, final_val_loss, ...)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| job "))
    rows = []
    for line in lines[start + 2:]:  # past the header and its rule, to the table's end
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def assert_one_line_error(result, *fragments: str) -> str:
    """A user mistake's answer: exit status 2 and one line on stderr, "error: ...", holding each
    fragment. Returns the line."""
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600):
    """Run an entrypoint as a user would (python -m nanogpt.X ...), from cwd."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


# A model small enough that a sweep job is mostly process start-up: for tests of the sweep machinery.
class Training:
    """nanogpt-train in a subprocess whose progress lines can be waited for."""

    def __init__(self, cwd: Path, *args: str, python_code: str | None = None):
        command = ["-c", python_code, *args] if python_code else ["-m", "nanogpt.train", *args]
        self.proc = subprocess.Popen(
            [sys.executable, *command], cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.seen: list[str] = []

    def wait_for(self, prefix: str) -> None:
        for line in self.proc.stdout:
            self.seen.append(line)
            if line.startswith(prefix):
                return
        raise AssertionError(f"the run ended before printing {prefix!r}:\n{''.join(self.seen)}")

    def finish(self, timeout: float = 120) -> int:
        self.seen.append(self.proc.stdout.read())
        return self.proc.wait(timeout=timeout)

    @property
    def output(self) -> str:
        return "".join(self.seen)


TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "eval_iters=1",
        "optim.warmup_iters=0", "hardware=cpu", "hardware.cpus_per_process=1", "hardware.peak_flops=1e11"]

CLUSTER_SCRIPT = REPO / ".ci" / "slurm-cluster"


def _slurm_answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return "is UP" in ping.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM cluster on this machine: one already up is used as it is; otherwise
    .ci/slurm-cluster brings one up for the session and takes it down after."""
    if _slurm_answers():
        yield
        return
    if shutil.which("slurmctld") is None or os.geteuid() != 0:
        pytest.skip("needs the SLURM daemons and root: run `.ci/slurm-cluster install` (CI does)")
    try:
        up = subprocess.run([str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=300)
        failure = None if up.returncode == 0 else up.stderr[-2000:]
    except subprocess.TimeoutExpired as timeout:  # stop what it had started, as for any other failure
        said = timeout.stderr or b""  # bytes on POSIX even with text=True
        said = said.decode(errors="replace") if isinstance(said, bytes) else said
        failure = f"'up' did not finish in {timeout.timeout:.0f} s: {said[-2000:]}"
    if failure is not None:
        subprocess.run([str(CLUSTER_SCRIPT), "down"], capture_output=True, timeout=120)
        pytest.fail(f"could not bring up the local SLURM cluster: {failure}")
    try:
        yield
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "down"], capture_output=True, timeout=120)
