"""What a run dir holds when things go wrong around it: corrupt or foreign checkpoints, damaged
run files, a full disk, temp files of dead saves, a second Ctrl-C, mistakes in where the run dir is
and how big a step is. Each ends in one line that names what is wrong and what to do, with the run's
status recorded, or is survived by checking the files another way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHAKESPEARE, TINY, require_mount_namespace, require_shakespeare, run_cli

STEPS = 20


def args(data_dir: Path, run_dir: Path | str, *more: str, steps: int = STEPS) -> list[str]:
    """A tiny model, evaluated (and saved) every 10 steps, the last two step files kept."""
    return [f"data.source={SHAKESPEARE}", f"data.dir={data_dir}", f"max_iters={steps}", "eval_interval=10",
            "log_interval=1", *TINY, f"hydra.run.dir={run_dir}", *more]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A cwd with the data prepared, and a finished run ("ours": checkpoints of steps 10 and 20)."""
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("run_files")
    result = run_cli("nanogpt.train", *args(cwd / "data", "ours"), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def copy_run(cwd: Path, name: str) -> Path:
    run_dir = cwd / name
    shutil.copytree(cwd / "ours", run_dir)
    return run_dir


def flip_a_bit_in_a_tensor(path: Path) -> None:
    """One bit in the middle of the largest tensor's bytes: the file stays a valid zip and loads."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(member.header_offset + 26)  # the local header's name and extra-field lengths
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        where = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x10]))
    torch.load(path, weights_only=True)  # still loads: only a checksum can tell


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr  # one line, no traceback
    return lines[0]


# --- corrupt and foreign checkpoints -------------------------------------------------------------


def test_an_unreadable_checksums_record_is_named_and_a_corrupt_checkpoint_still_found(runs):
    run_dir = copy_run(runs, "garbled_record")
    ckpts = run_dir / "checkpoints"
    (ckpts / "checksums.json").write_bytes(os.urandom(300))
    for name in ("last.pt", "step-00000020.pt"):  # one file under two names in a run; copies here
        flip_a_bit_in_a_tensor(ckpts / name)

    result = run_cli("nanogpt.train", *args(runs / "data", run_dir), cwd=runs)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert f"{ckpts / 'checksums.json'} is not valid JSON" in out
    assert "checking the checkpoints by the CRC-32 sums inside their zip files instead" in out
    assert "last.pt is unusable: the CRC-32 of" in out and "does not match (corrupt?)" in out
    assert "resuming from step-00000010.pt (step 10) instead" in out
    # the record was rebuilt: every file is checkable by its SHA-256 again, the corrupt one is gone
    from nanogpt.runs.checkpoint import CheckpointDir

    record = json.loads((ckpts / "checksums.json").read_text())
    assert {e["step"] for e in record["checksums"].values()} == {10, 20}
    for path in CheckpointDir(ckpts).candidates():
        assert CheckpointDir(ckpts).verify(path) is None, path


@pytest.mark.slow
def test_a_dir_without_checksums_says_so_and_checks_the_files_by_their_crc(runs):
    run_dir = copy_run(runs, "no_record")
    ckpts = run_dir / "checkpoints"
    (ckpts / "checksums.json").unlink()
    for name in ("last.pt", "step-00000020.pt"):
        flip_a_bit_in_a_tensor(ckpts / name)
    result = run_cli("nanogpt.train", *args(runs / "data", run_dir), cwd=runs)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert f"{ckpts} has no checksums.json: checking the checkpoints by the CRC-32 sums" in out
    assert "resuming from step-00000010.pt (step 10) instead" in out


@pytest.mark.slow
def test_a_checksums_entry_that_is_not_an_object_is_named_not_a_traceback(runs):
    run_dir = copy_run(runs, "bad_entry")
    path = run_dir / "checkpoints" / "checksums.json"
    record = json.loads(path.read_text())
    record["checksums"] = {sha: "not an object" for sha in record["checksums"]}
    path.write_text(json.dumps(record))
    for name in ("last.pt", "step-00000020.pt"):  # so that the record's entries are looked into
        flip_a_bit_in_a_tensor(run_dir / "checkpoints" / name)
    result = run_cli("nanogpt.train", *args(run_dir=run_dir, data_dir=runs / "data"), cwd=runs)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert f"{path} is not a record of checksums" in out and "CRC-32" in out
    assert "resuming from step-00000010.pt (step 10) instead" in out


def test_sample_and_init_from_refuse_a_bit_flipped_checkpoint(runs, tmp_path):
    run_dir = copy_run(runs, "flipped_best")
    best = run_dir / "checkpoints" / "best.pt"
    best.unlink()  # best.pt is a name of last.pt's file: give it its own to flip
    shutil.copyfile(run_dir / "checkpoints" / "step-00000010.pt", best)
    flip_a_bit_in_a_tensor(best)
    result = run_cli("nanogpt.sample", f"init_from={run_dir}", "max_new_tokens=5", cwd=runs)
    assert result.returncode == 2, result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"error: checkpoint {best} is unusable: its SHA-256 matches no checkpoint this run wrote")

    loose = tmp_path / "copied.pt"  # outside a run dir: its zip's CRC-32s check it
    shutil.copyfile(best, loose)
    result = run_cli("nanogpt.train", *args(runs / "data", tmp_path / "finetune", f"init_from={loose}"), cwd=runs)
    assert result.returncode == 2, result.stderr
    assert f"error: checkpoint {loose} is unusable: the CRC-32 of" in last_line(result.stderr)
    assert not (tmp_path / "finetune").exists()  # refused before the run dir exists


@pytest.mark.slow
def test_another_runs_checkpoint_among_the_step_files_is_skipped(runs):
    theirs = run_cli("nanogpt.train", *args(runs / "data", "theirs", "seed=2"), cwd=runs)
    assert theirs.returncode == 0, theirs.stderr
    run_dir = copy_run(runs, "foreign")
    ckpts = run_dir / "checkpoints"
    for name in ("last.pt", "step-00000020.pt", "checksums.json"):  # lost; a file of another run came instead
        (ckpts / name).unlink()
    shutil.copyfile(runs / "theirs" / "checkpoints" / "step-00000020.pt", ckpts / "step-00000020.pt")
    result = run_cli("nanogpt.train", *args(runs / "data", run_dir), cwd=runs)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "step-00000020.pt is unusable: it is another run's file (seed=2 there, 1337 in this run)" in out
    assert "resuming from step-00000010.pt (step 10) instead" in out


# --- temp files of interrupted saves -------------------------------------------------------------


KILL_IN_FIRST_SAVE = """
import os, signal, sys
import nanogpt.runs.checkpoint as checkpoint
from nanogpt.train import main

def die(self, data):  # the first save of the run dies by SIGKILL halfway through its file
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint._HashingWriter.write = die
sys.argv = ["nanogpt-train", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_save_killed_before_any_checkpoint_leaves_no_temp_file_for_good(runs):
    run_dir = runs / "killed_first_save"
    command = args(runs / "data", run_dir)
    killed = subprocess.run([sys.executable, "-c", KILL_IN_FIRST_SAVE, *command], cwd=runs, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    (partial,) = ckpts.glob(".last.pt.*.tmp")
    assert not (ckpts / "last.pt").exists()

    result = run_cli("nanogpt.train", *command, cwd=runs)
    assert result.returncode == 0, result.stderr
    assert f"removed {partial.name}, left by a save that was interrupted" in result.stdout
    assert not list(ckpts.glob(".*.tmp"))


def test_only_temp_files_of_a_writer_that_is_gone_are_removed(tmp_path):
    from nanogpt.runs.checkpoint import CheckpointDir

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".last.pt.{host}.{dead.pid}.k3j2h1g0.tmp": False,  # its process is gone
        f".best.pt.{host}.{os.getppid()}.link.tmp": True,  # a live process is writing it
        f".last.pt.{host}.{os.getpid()}.a1b2c3d4.tmp": True,  # ours
        f".last.pt.other-node.{dead.pid}.a1b2c3d4.tmp": True,  # another host's, touched just now
        ".notes.tmp": True,  # not ours
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = CheckpointDir(tmp_path).remove_partial_writes()
    assert [p.name for p in removed] == [n for n, kept in names.items() if not kept]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, kept in names.items() if kept)


# --- damaged run files -----------------------------------------------------------------------------


def test_a_binary_metrics_file_is_named_on_resume(runs):
    run_dir = copy_run(runs, "binary_metrics")
    (run_dir / "metrics.jsonl").write_bytes(os.urandom(200) + b"\n" + os.urandom(50))
    result = run_cli("nanogpt.train", *args(runs / "data", run_dir, steps=21), cwd=runs)
    assert result.returncode == 2, result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"error: {run_dir / 'metrics.jsonl'} line 1 is not JSON")
    assert "move it aside (the run's checkpoints are intact) and resume again" in line
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("damage", ["not: [yaml", "- a list\n- not a mapping\n"])
def test_a_broken_resolved_config_is_named_on_resume(runs, damage):
    run_dir = copy_run(runs, f"broken_resolved_{len(damage)}")
    (run_dir / "config.resolved.yaml").write_text(damage)
    for command in (args(runs / "data", run_dir), [f"resume={run_dir}"]):
        result = run_cli("nanogpt.train", *command, cwd=runs)
        assert result.returncode == 2, result.stderr
        line = last_line(result.stderr)
        assert line.startswith(f"error: {run_dir / 'config.resolved.yaml'} ")
        assert "restore it from a copy of the run" in line and f"reproduce={run_dir}" in line


def test_a_broken_hydra_snapshot_is_named_on_reproduce(runs):
    run_dir = copy_run(runs, "broken_snapshot")
    (run_dir / ".hydra" / "config.yaml").write_bytes(b"model: {n_layer: \xff\xfe")
    result = run_cli("nanogpt.train", f"reproduce={run_dir}", cwd=runs)
    assert result.returncode == 2, result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"error: {run_dir / '.hydra' / 'config.yaml'} is not UTF-8 text (byte 0xff")
    assert "config.resolved.yaml holds the config it ran with" in line


@pytest.mark.parametrize("line, what", [("[1, 2]", "line 2 holds a JSON list, not an object"),
                                        ("\x00\x01garbage", "line 2 is not JSON")])
def test_report_names_a_metrics_line_that_is_not_a_record(runs, tmp_path, line, what):
    sweep = tmp_path / "sweep"
    shutil.copytree(runs / "ours", sweep / "0")
    metrics = sweep / "0" / "metrics.jsonl"
    records = metrics.read_text().splitlines()
    metrics.write_text("\n".join([records[0], line, *records[1:]]) + "\n")
    result = run_cli("nanogpt.sweeps.report", str(sweep), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"error: {metrics} {what}")
    assert line.endswith("restore it from a copy of the run, or move it aside (the report then goes without it)")


def test_a_line_cut_short_at_the_end_is_left_out_and_any_other_is_named(tmp_path):
    from nanogpt.runs.runfiles import RunFileError, read_json, read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(RunFileError, match="line 2 is not JSON"):
        read_jsonl(path)
    (tmp_path / "p.json").write_text("[]")
    with pytest.raises(RunFileError, match="holds a JSON list, not an object"):
        read_json(tmp_path / "p.json")
    assert read_json(tmp_path / "missing.json", missing_ok=True) is None


# --- a full disk, a second Ctrl-C ------------------------------------------------------------------


@pytest.mark.slow
def test_a_disk_that_fills_up_mid_run_ends_in_one_line_with_status_failed(runs, tmp_path):
    require_mount_namespace("mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir = disk / "run"
    command = " ".join([sys.executable, "-m", "nanogpt.train", *args(runs / "data", run_dir, steps=2000)])
    # the run starts on a 3 MB disk; after its first checkpoint a file takes all the room left
    script = (f"mount -t tmpfs -o size=3m none {disk} && {{ {command} 2>{tmp_path / 'err'} & "
              # any step file: on an idle machine step 10's is rotated away within a poll or two
              f"until ls {run_dir}/checkpoints/step-*.pt >/dev/null 2>&1; do sleep 0.05; done; "
              f"dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null; wait $!; echo \"exit $?\"; }}; "
              f"cp -a {run_dir} {tmp_path / 'copy'}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=runs, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert "exit 2" in result.stdout, result.stdout + result.stderr
    line = last_line((tmp_path / "err").read_text())
    # whichever write meets the full disk first: metrics.jsonl, train.log or a checkpoint
    assert line.startswith("error: could not write ") and f"{run_dir}/" in line, line
    assert "(No space left on device)" in line, line
    assert line.endswith(f"free disk space or fix the permissions, then continue with resume={run_dir}.")
    assert json.loads((tmp_path / "copy" / "provenance.json").read_text())["status"] == "failed"


SECOND_CTRL_C_DURING_THE_STOP_SAVE = """
import os, signal, sys
import nanogpt.runs.checkpoint as checkpoint
import nanogpt.optim as optim
from nanogpt.train import main

set_learning_rate, write = optim.set_learning_rate, checkpoint._HashingWriter.write
asked = []

def first_ctrl_c(optimizer, step, cfg):  # Ctrl-C during step 13: the run stops after it, with a save
    if step == 13:
        asked.append(step)
        os.kill(os.getpid(), signal.SIGINT)
    return set_learning_rate(optimizer, step, cfg)

def second_ctrl_c(self, data):  # ... and Ctrl-C again while that save writes
    if asked and asked.pop():
        os.kill(os.getpid(), signal.SIGINT)
    return write(self, data)

optim.set_learning_rate, checkpoint._HashingWriter.write = first_ctrl_c, second_ctrl_c
sys.argv = ["nanogpt-train", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_stop_save_says_which_checkpoint_is_left(runs):
    run_dir = runs / "ctrl_c"
    result = subprocess.run([sys.executable, "-c", SECOND_CTRL_C_DURING_THE_STOP_SAVE, *args(runs / "data", run_dir)],
                            cwd=runs, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            timeout=300)
    assert result.returncode == 128 + signal.SIGINT, result.stderr
    assert last_line(result.stderr) == f"interrupted; the last checkpoint is step 10: continue with resume={run_dir}"
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "preempted"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 10


# --- where the run dir is, how big a step is -------------------------------------------------------


@pytest.mark.parametrize("where, what", [("a_file", "is an existing file"),
                                         ("a_file/run", "cannot be made: {cwd}/a_file is a file"),
                                         ("/proc/no_such/run", "cannot be made in /proc (")])
def test_a_run_dir_that_cannot_be_made_is_one_line(runs, tmp_path, where, what):
    (tmp_path / "a_file").write_text("notes\n")
    result = run_cli("nanogpt.train", *args(runs / "data", where), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"error: the run dir hydra.run.dir={where} {what.format(cwd=tmp_path)}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_step_that_cannot_fit_in_memory_is_refused_before_the_run_dir_exists(runs, tmp_path):
    result = run_cli("nanogpt.train", *args(runs / "data", tmp_path / "huge"), "batch_size=100000000", cwd=runs)
    assert result.returncode == 2, result.stderr
    line = last_line(result.stderr)
    assert line.startswith("error: a training step needs at least ") and "GiB available: lower batch_size" in line
    assert "batch_size=100000000 x block_size=16" in line
    assert not (tmp_path / "huge").exists()


def test_running_out_of_memory_mid_run_is_one_line():
    from nanogpt.config import TrainConfig
    from nanogpt.runs.failures import as_user_error

    failure = RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 838860800000 bytes. Error code 12 (Cannot allocate memory)")
    error = as_user_error(failure, Path("run"), TrainConfig(batch_size=100000, block_size=64))
    assert "ran out of memory" in str(error) and "batch_size=100000" in str(error) and "lower batch_size" in str(error)


def test_a_log_file_the_disk_refuses_is_dropped_with_one_warning(tmp_path, capsys):
    import errno
    import logging

    from nanogpt.runs.runfiles import drop_failing_log_files

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    logger = logging.getLogger("test_run_files.drop")
    handler = logging.FileHandler(tmp_path / "train.log")
    logger.addHandler(handler)
    handler.stream.close()
    handler.stream = FullDisk()
    drop_failing_log_files(logger)
    logger.warning("first")
    logger.warning("second")
    assert handler not in logger.handlers
    assert capsys.readouterr().err == (f"warning: could not write {tmp_path / 'train.log'} (No space left on device): "
                                       f"the log goes on on the console only\n")
