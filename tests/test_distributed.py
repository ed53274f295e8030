"""Several processes on CPU with real gloo process groups: the same global batch gives the same
training however it is split, one run dir for all ranks, exact resume, and a failing rank stops
the run instead of hanging it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHAKESPEARE, require_shakespeare, run_cli

SMALL = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=32", "hardware.peak_flops=1e11",
         "eval_interval=5", "eval_iters=2", "log_interval=1"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("distributed")
    return cwd, [f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}", *SMALL]


def train(cwd: Path, base: list[str], name: str, *args: str, env: dict | None = None):
    result = run_ranks(*base, f"hydra.run.dir={name}", *args, cwd=cwd, env=env, fresh=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + rank_logs(cwd / name)
    return cwd / name, result


def run_ranks(*args: str, cwd: Path, env: dict | None = None, fresh: bool = False):
    """nanogpt-train, as a user runs it. A rank killed by a signal (a crash inside torch or gloo,
    which one CI run met in an FSDP checkpoint gather) is rerun once, with a warning that holds the
    crashed rank's stacks: a fresh run (its run dir moved aside) from the start, a resume
    from the checkpoint the crash left, which exact resume makes the same. A failure of our own
    code (an exception: exit code 1) is returned as it is."""
    result = run_cli("nanogpt.train", *args, cwd=cwd, env=env)
    crash = re.search(r"rank \d+ failed \(exit code -\d+\) and the others were stopped: see (\S+)\.", result.stderr)
    if crash:
        run_dir = Path(cwd, crash.group(1)).parent
        logs = rank_logs(run_dir)
        if fresh:
            run_dir.rename(run_dir.with_name(run_dir.name + ".crashed"))
        warnings.warn(f"{crash.group(0)} Rerunning it once. The crashed run's rank logs:{logs}")
        result = run_cli("nanogpt.train", *args, cwd=cwd, env=env)
    return result


def rank_logs(run_dir: Path) -> str:
    """The end of each worker's log, for a failed run's message: a crashed rank's stacks are there."""
    return "".join(f"\n--- {log.name}\n{log.read_text()[-4000:]}" for log in sorted(run_dir.glob("train*.log")))


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def logged(run_dir: Path) -> list[dict]:
    keep = ("step", "kind", "loss", "lr", "grad_norm", "train_loss", "val_loss")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in keep} for r in records]


def assert_one_run_dir(cwd: Path) -> Path:
    """A 2-process run left exactly one run dir: one snapshot, one metrics.jsonl, two rank logs."""
    (run_dir,) = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["train.log", "train.rank1.log"]
    assert len(list(run_dir.rglob("config.yaml"))) == 1 and len(list(run_dir.rglob("metrics.jsonl"))) == 1
    record = json.loads((run_dir / "provenance.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "done"
    steps = [r["step"] for r in logged(run_dir) if r["kind"] == "train"]
    assert steps == list(range(1, steps[-1] + 1))  # logged once, by rank 0
    return run_dir


# --- the global batch ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch", [4, 2], ids=["2x1 vs 1x2", "2x2 vs 1x4"])
def test_the_global_batch_trains_the_same_however_it_is_split(workspace, micro_batch):
    cwd, base = workspace
    split = [f"batch_size={micro_batch}", "global_batch_size=8", "max_iters=10"]
    run_cwd = cwd / f"documented_{micro_batch}"  # the README's command, in a dir of its own
    run_cwd.mkdir()
    result = run_cli("nanogpt.train", *base, "hardware=ddp", "hardware.nproc_per_node=2", *split, cwd=run_cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    two = assert_one_run_dir(run_cwd)
    one, _ = train(cwd, base, f"one_{micro_batch}", *split)
    accum_two, accum_one = 8 // (micro_batch * 2), 8 // micro_batch
    assert f"{micro_batch} x 32 x {accum_two} micro-steps x 2 processes" in result.stdout
    diff = max_diff(weights(two), weights(one))
    print(f"\n[equivalence] 2 processes x {micro_batch} x {accum_two} vs 1 x {micro_batch} x {accum_one}, "
          f"10 steps: max |weight diff| = {diff:.2e}")
    assert diff < 1e-5


def test_a_torchrun_launch_leaves_one_run_dir(workspace):
    """torchrun starts every rank through Hydra, each with its own clock and pid: rank 0 picks the
    run dir and the others take it, write no snapshot, and log to their own file."""
    cwd, base = workspace
    run_cwd = cwd / "torchrun"
    run_cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "nanogpt.train",
         *base, "batch_size=4", "global_batch_size=8", "max_iters=4"],
        cwd=run_cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_one_run_dir(run_cwd)
    assert "4 x 32 x 1 micro-steps x 2 processes" in result.stdout


def test_global_batch_that_does_not_divide_is_refused(workspace, tmp_path):
    _, base = workspace
    result = run_cli("nanogpt.train", *base, "hardware=ddp", "hardware.nproc_per_node=2", "batch_size=4",
                     "global_batch_size=12", cwd=tmp_path)
    assert result.returncode == 2
    assert "global_batch_size=12 is not a multiple of batch_size x processes = 4 x 2 = 8" in result.stderr
    assert not list(tmp_path.iterdir())


# --- stop and resume -----------------------------------------------------------------------


DDP_40 = ["hardware=ddp", "hardware.nproc_per_node=2", "batch_size=4", "global_batch_size=8", "max_iters=40"]


@pytest.fixture(scope="module")
def ddp_straight(workspace):
    """40 steps on 2 processes that never stopped: what the resumed runs must match."""
    cwd, base = workspace
    return train(cwd, base, "ddp_straight", *DDP_40)[0]


@pytest.mark.slow
def test_a_stopped_two_process_run_resumes_exactly(workspace, ddp_straight):
    cwd, base = workspace
    args, straight = DDP_40, ddp_straight

    proc = subprocess.Popen([sys.executable, "-m", "nanogpt.train", *base, "hydra.run.dir=ddp_stopped", *args],
                            cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("iter 15:"):
            proc.send_signal(signal.SIGTERM)  # to the launcher: it passes the signal to both ranks
            break
    seen.append(proc.stdout.read())
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(seen)
    stopped = cwd / "ddp_stopped"
    ckpt = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    stopped_at = ckpt["step"]
    # both ranks stopped after the same step, and that step was saved (not only the last evaluation's)
    assert f"stopped by SIGTERM after step {stopped_at}; checkpoint in" in "".join(seen)
    assert f"stopped by SIGTERM after step {stopped_at}" in (stopped / "train.rank1.log").read_text()
    assert 15 <= stopped_at < 40 and json.loads((stopped / "provenance.json").read_text())["status"] == "preempted"
    assert len(ckpt["resume"]["rng"]) == 2  # each rank's RNG states

    import shutil

    on_one = cwd / "ddp_stopped_then_one_process"
    shutil.copytree(stopped, on_one)

    resumed = run_ranks(f"resume={stopped}", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr + rank_logs(stopped)
    assert all(torch.equal(a, b) for a, b in zip(weights(stopped).values(), weights(straight).values()))
    assert logged(stopped) == logged(straight)

    # the same stopped run continued on one process: twice the accumulation, the same global batches
    # in the same order, so the same weights up to float summation order
    single = run_cli("nanogpt.train", f"resume={on_one}", "hardware.nproc_per_node=1", cwd=cwd)
    assert single.returncode == 0, single.stderr
    assert "4 x 32 x 2 micro-steps x 1 processes" in single.stdout
    diff = max_diff(weights(on_one), weights(straight))
    print(f"\n[resume] 2 processes stopped at step {stopped_at}, continued on 1: max |weight diff| at step 40 = {diff:.2e}")
    assert diff < 1e-5



# --- failures ------------------------------------------------------------------------------

FAIL_ON_RANK_1 = '''
import os, signal
from nanogpt.data.batches import RandomWindows

next_batch = RandomWindows.next_batch
calls = []

def failing_next_batch(self):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 12:
        {failure}
    return next_batch(self)

RandomWindows.next_batch = failing_next_batch
'''

FAILURES = {  # how rank 1 fails: why the launcher's error says it failed, and what its log then holds
    "exception": ('raise RuntimeError("injected failure on rank 1")', "RuntimeError: injected failure on rank 1",
                  "RuntimeError: injected failure on rank 1"),
    # a crash in native code (torch, gloo): faulthandler writes the Python stacks into the rank's log
    "segfault": ("os.kill(os.getpid(), signal.SIGSEGV)", "exit code -11", "Fatal Python error: Segmentation fault"),
}


@pytest.mark.slow
@pytest.mark.parametrize("failure", FAILURES)
def test_a_failure_on_one_rank_stops_every_rank_quickly(workspace, tmp_path, failure):
    cwd, base = workspace
    statement, why, in_log = FAILURES[failure]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_ON_RANK_1.format(failure=statement))  # imported by every process
    started = time.monotonic()
    run_dir = cwd / f"failing_{failure}"
    result = run_cli("nanogpt.train", *base, f"hydra.run.dir={run_dir.name}", "hardware=ddp", "hardware.nproc_per_node=2",
                     "batch_size=4", "global_batch_size=8", "max_iters=1000", cwd=cwd,
                     env={"PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}, timeout=120)
    elapsed = time.monotonic() - started
    print(f"\n[failure] rank 1 failed ({failure}) in its 12th batch: the run ended in {elapsed:.1f} s (process start included)")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"rank 1 failed ({why}) and the others were stopped" in result.stderr.strip().splitlines()[-1]
    rank_log = (run_dir / "train.rank1.log").read_text()
    assert in_log in rank_log
    assert "failing_next_batch" in rank_log  # the stack says where
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "failed"


def test_the_rank_named_for_a_failure_is_the_cause_not_a_peer_left_waiting():
    """torch stamps failures to the second: rank 0, blocked in an all-reduce when rank 1 raised,
    fails in the same second with a connection reset, and is not the one to name."""
    from types import SimpleNamespace

    from nanogpt.parallel.launch import first_failure

    gloo = "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:28584: Connection reset by peer."
    failures = {0: SimpleNamespace(timestamp=100, message=gloo),
                1: SimpleNamespace(timestamp=100, message="RuntimeError: injected failure on rank 1"),
                2: SimpleNamespace(timestamp=101, message=gloo)}
    assert first_failure(failures)[0] == 1
    failures[1] = SimpleNamespace(timestamp=101, message="Signal 11 (SIGSEGV) received by PID 4242")  # no error file
    assert first_failure(failures)[0] == 1
    failures[1] = SimpleNamespace(timestamp=100, message=gloo)  # every rank lost its peer: the lowest
    assert first_failure(failures)[0] == 0
    assert first_failure({3: SimpleNamespace(timestamp=90, message="OOM"), 1: SimpleNamespace(timestamp=99, message="x")})[0] == 3


def test_the_ranks_logs_name_the_cause_even_when_the_launcher_recorded_only_a_waiting_peer(tmp_path):
    """The launcher may record only rank 0, which lost its peer before rank 1's process exited:
    the ranks' own logs, to the millisecond, name rank 1 and its error."""
    from types import SimpleNamespace

    from nanogpt.parallel.launch import failed_first

    gloo = "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:28584: Connection reset by peer."
    (tmp_path / "train.log").write_text(f"[2026-12-01 05:06:53,061][INFO][rank 0] iter 5\n"
                                        f"[2026-12-01 05:06:53,062][ERROR][rank 0] rank 0 failed: {gloo}\n")
    (tmp_path / "train.rank1.log").write_text("[2026-12-01 05:06:53,069][ERROR][rank 1] rank 1 failed: "
                                              "RuntimeError: injected failure on rank 1\nTraceback ...\n")
    launcher = {0: SimpleNamespace(timestamp=100, message=gloo, exitcode=1)}
    assert failed_first(tmp_path, launcher) == (1, "RuntimeError: injected failure on rank 1")
    (tmp_path / "train.rank1.log").write_text("Fatal Python error: Segmentation fault\n")  # a crash logs no error line
    launcher[1] = SimpleNamespace(timestamp=100, message="Signal 11 (SIGSEGV) received by PID 4242", exitcode=-11)
    assert failed_first(tmp_path, launcher) == (1, "exit code -11")


# --- where a process finds its rank ---------------------------------------------------------

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST",
                      "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NUM_NODES", "SLURM_NODEID",
                      "SLURM_JOB_NODELIST", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_ARRAY_JOB_ID")


@pytest.fixture
def launcher_env(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def test_a_plain_process_is_rank_0_of_1(launcher_env):
    from nanogpt.parallel.distributed import DistEnv, detect

    assert detect() == DistEnv()


def test_torchrun_variables(launcher_env):
    from nanogpt.parallel.distributed import DistEnv, detect

    # what `torchrun --nnodes 2 --nproc_per_node 4` gives the second process of the second node
    launcher_env(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4, MASTER_ADDR="node07", MASTER_PORT=29400,
                 SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_STEP_ID=0)  # torchrun inside a SLURM job: torchrun decides
    assert detect() == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4, master_addr="node07",
                               master_port=29400, source="torchrun")


def test_slurm_one_node(launcher_env):
    from nanogpt.parallel.distributed import detect

    launcher_env(SLURM_JOB_ID=4242, SLURM_STEP_ID=0, SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_LOCALID=1,
                 SLURM_JOB_NUM_NODES=1, SLURM_NODEID=0, SLURM_JOB_NODELIST="gpu-a17")
    env = detect()
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (1, 1, 2, 2)
    assert env.master_addr == "gpu-a17" and env.source == "slurm"
    assert env.master_port == 20000 + (4242 * 16 + 0) % 40000  # the same on every task of the step, unspoken


def test_slurm_several_nodes(launcher_env):
    from nanogpt.parallel.distributed import detect

    # task 6 of 8 on the second of two nodes: the master is the first node of the list
    launcher_env(SLURM_JOB_ID=91, SLURM_STEP_ID=0, SLURM_PROCID=6, SLURM_NTASKS=8, SLURM_LOCALID=2,
                 SLURM_JOB_NUM_NODES=2, SLURM_NODEID=1, SLURM_JOB_NODELIST="node[03-04]", MASTER_PORT=31000)
    env = detect()
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (6, 2, 8, 4)
    assert (env.master_addr, env.master_port) == ("node03", 31000)
    # a step on part of the job's nodes: its own first node is the master
    launcher_env(SLURM_STEP_NODELIST="node[04,07-08]")
    assert detect().master_addr == "node04"


def test_a_slurm_batch_script_or_a_single_task_is_one_process(launcher_env):
    from nanogpt.parallel.distributed import DistEnv, detect

    launcher_env(SLURM_JOB_ID=7, SLURM_PROCID=0, SLURM_NTASKS=4, SLURM_JOB_NODELIST="n1")  # no step: the batch script
    assert detect() == DistEnv()
    launcher_env(SLURM_STEP_ID=0, SLURM_NTASKS=1)  # srun with one task
    assert detect() == DistEnv()


def test_a_broken_launcher_variable_is_named(launcher_env):
    from nanogpt.errors import ConfigError
    from nanogpt.parallel.distributed import detect

    launcher_env(RANK="one", WORLD_SIZE=2)
    with pytest.raises(ConfigError, match="RANK='one' is not a whole number"):
        detect()


# --- FSDP2 ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_trains_like_one_process_and_its_checkpoint_loads_without_it(workspace):
    cwd, base = workspace
    split = ["batch_size=4", "global_batch_size=8", "max_iters=10"]
    sharded, result = train(cwd, base, "fsdp_10", "hardware=fsdp", *split)
    assert "x 2 processes" in result.stdout
    one, _ = train(cwd, base, "one_4", *split) if not (cwd / "one_4").exists() else (cwd / "one_4", None)
    ckpt = torch.load(sharded / "checkpoints" / "last.pt", weights_only=True)
    assert isinstance(ckpt["optimizer"]["param_groups"][0]["params"][0], str)  # whole, keyed by parameter name
    diff = max_diff(ckpt["model"], weights(one))
    print(f"\n[fsdp] 2 sharded processes x 4 vs 1 x 4 x 2, 10 steps: max |weight diff| = {diff:.2e}")
    assert diff < 1e-5
    sampled = run_cli("nanogpt.sample", f"init_from={sharded}", "num_samples=1", "max_new_tokens=20", cwd=cwd)
    assert sampled.returncode == 0 and len(sampled.stdout) > 20, sampled.stderr


@pytest.mark.slow
def test_fsdp_and_plain_checkpoints_continue_each_other(workspace, ddp_straight):
    """20 steps sharded on 2 processes, 10 more on 1 plain process, 10 more sharded again: the
    data order is global, the optimizer state crosses both ways (names <-> numbers), and the run
    matches 40 DDP steps."""
    cwd, base = workspace
    args = ["batch_size=4", "global_batch_size=8", "optim.decay_iters=40"]
    run_dir, _ = train(cwd, base, "fsdp_plain_fsdp", "hardware=fsdp", *args, "max_iters=20")
    plain = run_cli("nanogpt.train", f"resume={run_dir}", "max_iters=30", "hardware.nproc_per_node=1",
                    "hardware.fsdp=false", cwd=cwd)
    assert plain.returncode == 0, plain.stderr
    # on one process the same global batch takes two micro-steps: the same batches, in the same order
    assert "4 x 32 x 2 micro-steps x 1 processes" in plain.stdout
    assert "dropout masks start anew" in plain.stdout  # 2 ranks' RNG states, 1 process
    sharded = run_ranks(f"resume={run_dir}", "max_iters=40", "hardware.nproc_per_node=2", "hardware.fsdp=true", cwd=cwd)
    assert sharded.returncode == 0, sharded.stdout[-2000:] + sharded.stderr[-2000:] + rank_logs(run_dir)
    diff = max_diff(weights(run_dir), weights(ddp_straight))
    print(f"\n[fsdp] 20 sharded + 10 plain + 10 sharded vs 40 DDP steps: max |weight diff| = {diff:.2e}")
    assert diff < 1e-5
    ours, theirs = logged(run_dir), logged(ddp_straight)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (a, b)
