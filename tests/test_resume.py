"""Runs you can trust: a stopped or killed run resumes bit for bit, a crash mid-save loses nothing,
a finished run reproduces exactly, and a bad checkpoint or a full disk is named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHAKESPEARE, Training, require_mount_namespace, require_shakespeare, run_cli

N = 60  # steps of every run here; stops land near N/2
LOGGED = ("step", "kind", "loss", "lr", "grad_norm", "skipped_steps", "train_loss", "val_loss")


def train_args(data_dir: Path, max_iters: int = N) -> list[str]:
    """nanoGPT's CPU model with dropout on (so the torch RNG matters), evaluated every 10 steps."""
    return [f"data.source={SHAKESPEARE}", f"data.dir={data_dir}", f"max_iters={max_iters}", "eval_interval=10",
            "eval_iters=2", "log_interval=1", "model.dropout=0.1", "hardware.peak_flops=1e11"]


def losses(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings: what must be identical between two runs."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in LOGGED} for r in records]


def final_weights(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == N
    return ckpt["model"]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name  # bit for bit
    assert losses(run_dir) == losses(reference)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A cwd with the dataset prepared once, and one run of N steps that never stopped."""
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("resume")
    data_dir = cwd / "data"
    result = run_cli("nanogpt.train", *train_args(data_dir), "hydra.run.dir=straight", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, data_dir, cwd / "straight"


@pytest.mark.slow
def test_stopped_by_sigterm_and_resumed_matches_the_run_that_never_stopped(workspace):
    cwd, data_dir, straight = workspace
    run = Training(cwd, *train_args(data_dir), "hydra.run.dir=sigterm")
    run.wait_for(f"iter {N // 2 - 5}:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.output
    stopped_at = torch.load(cwd / "sigterm" / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert N // 2 - 5 <= stopped_at < N, run.output
    assert json.loads((cwd / "sigterm" / "provenance.json").read_text())["status"] == "preempted"

    # continue the given run dir: its own config, from its checkpoint
    result = run_cli("nanogpt.train", f"resume={cwd / 'sigterm'}", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert f"resuming from {cwd / 'sigterm' / 'checkpoints' / 'last.pt'} (step {stopped_at})" in result.stdout
    assert_same_run(cwd / "sigterm", straight)
    record = json.loads((cwd / "sigterm" / "provenance.json").read_text())
    assert record["status"] == "done" and (cwd / "sigterm" / "DONE").is_file()
    assert [r["from_step"] for r in record["resumes"]] == [stopped_at]
    # the run's first snapshot is kept; the resume's sits beside it
    assert "resume=" not in (cwd / "sigterm" / ".hydra" / "overrides.yaml").read_text()
    assert "resume=" in (cwd / "sigterm" / ".hydra" / "resume-1" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_killed_after_a_checkpoint_and_rerun_resumes_by_itself(workspace):
    cwd, data_dir, straight = workspace
    args = [*train_args(data_dir), "hydra.run.dir=sigkill"]
    run = Training(cwd, *args)
    step_file = cwd / "sigkill" / "checkpoints" / "step-00000030.pt"
    deadline = time.monotonic() + 120
    while not step_file.exists():  # saved after step 30's evaluation; the run goes on training
        assert run.proc.poll() is None and time.monotonic() < deadline, run.finish() and run.output
        time.sleep(0.005)
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    last_logged = losses(cwd / "sigkill")[-1]["step"]
    assert last_logged < N  # killed mid-run: metrics may hold steps after the checkpoint

    # the same command again (what a requeued job does): resume=auto finds the checkpoint
    result = run_cli("nanogpt.train", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert_same_run(cwd / "sigkill", straight)  # metrics rewound to the checkpoint: no step twice


KILL_MID_SAVE = """
import os, signal, sys
import nanogpt.runs.checkpoint as checkpoint
from nanogpt.train import main

saves = []
write = checkpoint._HashingWriter.write

def write_then_die(self, data):  # the second save dies by SIGKILL halfway through its file
    if self not in saves:
        saves.append(self)
    if len(saves) == 2 and self.size > 4_000_000:
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, data)

checkpoint._HashingWriter.write = write_then_die
sys.argv = ["nanogpt-train", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_killed_while_saving_keeps_the_previous_checkpoint_and_resumes_from_it(workspace):
    from nanogpt.runs.checkpoint import CheckpointDir

    cwd, data_dir, straight = workspace
    args = [*train_args(data_dir), "hydra.run.dir=midsave"]
    run = Training(cwd, *args, python_code=KILL_MID_SAVE)
    assert run.finish() == -signal.SIGKILL, run.output
    checkpoints = CheckpointDir(cwd / "midsave" / "checkpoints")
    partial = list(checkpoints.path.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 4_000_000  # the half-written file
    last = checkpoints.path / "last.pt"
    assert checkpoints.verify(last) is None  # intact, and still the first save's
    assert torch.load(last, weights_only=True)["step"] == 10

    result = run_cli("nanogpt.train", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "(step 10)" in result.stdout and "left by a save that was interrupted" in result.stdout
    assert not list(checkpoints.path.glob(".*.tmp"))
    assert_same_run(cwd / "midsave", straight)


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(workspace):
    cwd, data_dir, straight = workspace
    run_dir = cwd / "corrupt"
    shutil.copytree(straight, run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*.pt")) == ["step-00000050.pt", "step-00000060.pt"]
    with open(ckpts / "last.pt", "r+b") as f:  # truncated, as by a copy that did not finish
        f.truncate(f.seek(0, 2) // 2)
    with open(ckpts / "step-00000060.pt", "r+b") as f:  # same size, one flipped byte in the middle
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    (ckpts / "best.pt").unlink()

    result = run_cli("nanogpt.train", f"resume={run_dir}", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "last.pt is unusable: it is" in result.stdout and "(truncated?)" in result.stdout
    assert "step-00000060.pt is unusable: its SHA-256 matches no checkpoint" in result.stdout
    assert "resuming from step-00000050.pt (step 50) instead" in result.stdout
    assert_same_run(run_dir, straight)


@pytest.mark.slow
def test_reproduce_trains_the_same_run_again_in_a_fresh_dir(workspace):
    cwd, data_dir, straight = workspace
    other_cwd = cwd / "elsewhere"  # a relative data.dir in the snapshot would point elsewhere; ours is absolute
    other_cwd.mkdir()
    result = run_cli("nanogpt.train", f"reproduce={straight}", cwd=other_cwd)
    assert result.returncode == 0, result.stderr
    (copy,) = [p for p in (other_cwd / "outputs").glob("*/*") if p.is_dir()]
    assert_same_run(copy, straight)
    record = json.loads((copy / "provenance.json").read_text())
    assert record["reproduced_from"]["run_dir"] == str(straight.resolve())
    assert record["reproduced_from"]["git_commit"] == json.loads((straight / "provenance.json").read_text())["git"].get("commit")
    assert record["reproduced_from"]["warnings"] == []  # same code

    # with an override on top of the snapshot: a fresh run, the source untouched
    shorter = run_cli("nanogpt.train", f"reproduce={straight}", "max_iters=20", "hydra.run.dir=shorter", cwd=cwd)
    assert shorter.returncode == 0, shorter.stderr
    assert losses(cwd / "shorter")[-1]["step"] == 20


def test_reproduce_warns_when_the_code_differs(workspace):
    cwd, data_dir, straight = workspace
    source = cwd / "older_code"
    shutil.copytree(straight, source)
    record = json.loads((source / "provenance.json").read_text())
    record["git"] = {"commit": "0" * 40, "branch": "main", "dirty": False, "diff": "", "untracked": []}
    (source / "provenance.json").write_text(json.dumps(record))
    result = run_cli("nanogpt.train", f"reproduce={source}", "max_iters=1", "hydra.run.dir=warned", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "warning: the code is at commit" in result.stdout and "the run used 000000000000" in result.stdout
    assert json.loads((cwd / "warned" / "provenance.json").read_text())["reproduced_from"]["warnings"]


@pytest.mark.slow
def test_extending_a_finished_run_keeps_its_schedule_and_appends_to_its_wandb_run(workspace):
    cwd, data_dir, _ = workspace
    args = ["hydra.run.dir=wandb_run", "logger=wandb", "logger.mode=offline"]
    first = run_cli("nanogpt.train", *train_args(data_dir, max_iters=20), *args, cwd=cwd)
    assert first.returncode == 0, first.stderr
    second = run_cli("nanogpt.train", *train_args(data_dir, max_iters=30), *args, cwd=cwd)
    assert second.returncode == 0, second.stderr
    run_dir = cwd / "wandb_run"
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 30
    config = json.loads(ckpt["config"])
    assert config["max_iters"] == 30 and config["optim"]["decay_iters"] == 20  # the schedule the run began with
    run_id = ckpt["resume"]["wandb_run_id"]
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2, offline_runs  # one per start ...
    for offline_run in offline_runs:  # ... both logging to the same wandb run
        assert offline_run.name.endswith(f"-{run_id}")
        assert (offline_run / f"run-{run_id}.wandb").is_file()
    assert [r["step"] for r in losses(run_dir) if r["kind"] == "eval"] == [0, 10, 20, 30]
    assert json.loads((run_dir / "provenance.json").read_text())["resumes"][-1]["changed"] == {"max_iters": [20, 30]}

    # resume=<run dir> starts from the run's latest config: 30 steps, all done
    again = run_cli("nanogpt.train", f"resume={run_dir}", cwd=cwd)
    assert again.returncode == 0, again.stderr
    assert "nothing to do: the run already reached max_iters=30" in again.stdout


@pytest.mark.slow
def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_previous_checkpoint(workspace):
    require_mount_namespace("mount a small tmpfs")
    cwd, data_dir, _ = workspace
    disk, copy = cwd / "full_disk", cwd / "full_disk_after"
    disk.mkdir()
    command = " ".join([sys.executable, "-m", "nanogpt.train", *train_args(data_dir), f"hydra.run.dir={disk}",
                        "keep_checkpoints=0"])
    # a 14 MB disk holds one checkpoint of this model (9.7 MB) but not a second beside it
    script = (f"mount -t tmpfs -o size=14m none {disk} && {{ {command}; echo \"exit $?\"; }}; "
              f"cp -a {disk} {copy}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert "exit 2" in result.stdout, result.stdout + result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not write the checkpoint of step 20") and "No space left on device" in error
    assert "the previous checkpoint is intact" in error and f"resume={disk}" in error
    from nanogpt.runs.checkpoint import CheckpointDir

    checkpoints = CheckpointDir(copy / "checkpoints")
    assert checkpoints.verify(checkpoints.path / "last.pt") is None
    assert torch.load(checkpoints.path / "last.pt", weights_only=True)["step"] == 10
    assert not list(checkpoints.path.glob(".*.tmp"))
    assert json.loads((copy / "provenance.json").read_text())["status"] == "failed"


def tiny_payload(step: int) -> dict:
    return {"model": {"w": torch.full((1000,), float(step))}, "step": step, "resume": {}}


def test_every_name_stays_checkable_when_a_save_dies_between_its_steps(tmp_path, monkeypatch):
    """A save that dies after last.pt was renamed but before its names were recorded (here: in
    the link of best.pt) leaves a dir whose every file still verifies, also after later saves
    have pruned checksums.json."""
    from nanogpt.runs import checkpoint
    from nanogpt.runs.checkpoint import CheckpointDir

    ckpts = CheckpointDir(tmp_path, keep_last=2)
    ckpts.save(tiny_payload(10), 10, best=True)
    link_as = checkpoint.link_as

    def die_at_best(source, target):
        if target.name == "best.pt":
            raise KeyboardInterrupt  # a second Ctrl-C
        link_as(source, target)

    monkeypatch.setattr(checkpoint, "link_as", die_at_best)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save(tiny_payload(20), 20, best=True)
    monkeypatch.setattr(checkpoint, "link_as", link_as)
    for step in (30, 40):  # later saves, neither of them best: best.pt keeps step 10's file
        ckpts.save(tiny_payload(step), step, best=False)
    names = {p.name: torch.load(p, weights_only=True)["step"] for p in ckpts.candidates()}
    assert names == {"last.pt": 40, "step-00000040.pt": 40, "step-00000030.pt": 30, "best.pt": 10}
    for path in ckpts.candidates():
        checkpoint._VERIFIED.clear()
        assert ckpts.verify(path) is None, path.name


def test_a_run_that_fell_back_replaces_the_step_files_of_its_abandoned_steps(tmp_path):
    from nanogpt.runs.checkpoint import CheckpointDir

    ckpts = CheckpointDir(tmp_path, keep_last=3)
    for step in (10, 20, 30):
        ckpts.save(tiny_payload(step), step, best=False)
    ckpts.save(tiny_payload(20), 20, best=False)  # resumed from step 10, evaluated again at 20
    assert [p.name for p in ckpts.step_files()] == ["step-00000020.pt", "step-00000010.pt"]
