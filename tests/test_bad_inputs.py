"""A catalogue of user mistakes. Each must end in one line on stderr that names the problem and
the fix, exit status 2, before any training, with no file on disk lost or changed and no run dir
left behind."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHAKESPEARE, assert_one_line_error, require_mount_namespace, require_shakespeare, run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished run, and broken copies of it: no checkpoint, every checkpoint corrupt."""
    require_shakespeare()
    base = tmp_path_factory.mktemp("bad_inputs")
    data = base / "data"
    args = [f"data.source={SHAKESPEARE}", f"data.dir={data}", "max_iters=4", "eval_interval=2", "eval_iters=1",
            "hardware.peak_flops=1e11"]
    result = run_cli("nanogpt.train", *args, f"hydra.run.dir={base / 'finished'}", cwd=base)
    assert result.returncode == 0, result.stderr
    shutil.copytree(base / "finished", base / "no_checkpoint")
    shutil.rmtree(base / "no_checkpoint" / "checkpoints")
    shutil.copytree(base / "finished", base / "corrupt")
    for ckpt in (base / "corrupt" / "checkpoints").glob("*.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    (base / "not_a_run").mkdir()
    (base / "empty.txt").write_text("")
    (base / "tiny.txt").write_text(SHAKESPEARE.read_text()[:300])
    return base, args


def fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (id, command-line arguments ({base}: the fixture's dir; {cache}: a data cache, which preparing a
# dataset may fill before its size is known), what the one line must say: the problem, the fix)
CASES = [
    ("misspelled key", ["max_iter=10"], ["max_iter", "--cfg job lists every key"]),
    ("wrong type", ["batch_size=twelve"], ["batch_size", "twelve"]),
    ("unknown group option", ["model=gpt5"], ["gpt5", "gpt2-medium"]),  # lists the options
    ("unknown added key", ["+lrate=1e-3"], ["lrate", "--cfg job lists every key"]),
    ("nanoGPT's key", ["+learning_rate=1e-3"], ["learning_rate=1e-3 is nanoGPT's key: here it is optim.lr=1e-3"]),
    ("zero batch", ["batch_size=0"], ["batch_size=0 must be at least 1"]),
    ("context beyond the model", ["block_size=128"], ["block_size=128 exceeds model.block_size=64",
                                                      "lower block_size or raise model.block_size"]),
    ("heads do not divide the width", ["model.n_head=3"], ["model.n_embd=128 is not divisible by model.n_head=3",
                                                            "model.n_embd=129"]),
    ("negative learning rate", ["optim.lr=-1"], ["optim.lr=-1.0 must be positive"]),
    ("no Newton-Schulz steps", ["optim=muon", "optim.muon_ns_steps=0"], ["optim.muon_ns_steps=0 must be between 1 and 99"]),
    ("unknown nonfinite policy", ["on_nonfinite=maybe"], ["on_nonfinite", "stop, skip"]),
    ("negative checkpoints kept", ["keep_checkpoints=-1"], ["keep_checkpoints=-1 must be >= 0"]),
    ("a GPU that is not there", ["hardware.device=cuda"], ["no CUDA GPU is visible", "hardware=cpu"]),
    ("vocab smaller than the data's", ["model.vocab_size=10"], ["model.vocab_size=10 is smaller than the 65 tokens",
                                                                "model.vocab_size=null"]),
    ("empty dataset", ["data=text", "data.source={base}/empty.txt", "data.dir={cache}/empty"],
     ["empty.txt is empty", "point it at a text"]),
    ("block size larger than the data", ["data=text", "data.source={base}/tiny.txt", "data.dir={cache}/tiny"],
     ["block_size=64 needs more than 64 tokens per split", "lower block_size or use more data"]),
    ("init_from that does not exist", ["init_from={base}/nope"], ["init_from=", "nope", "that exists"]),
    ("resume of a dir that does not exist", ["resume={base}/nope"], ["no such run dir", "outputs/DATE/TIME-PID"]),
    ("resume of a dir that is not a run", ["resume={base}/not_a_run"], ["holds no config.resolved.yaml",
                                                                        "not a run dir"]),
    ("resume of a run without checkpoints", ["resume={base}/no_checkpoint"],
     ["holds no checkpoint to continue from", "reproduce="]),
    ("resume with a changed model shape", ["resume={base}/finished", "model.n_layer=8"],
     ["model.n_layer=8 would change", "model.n_layer=4", "init_from="]),
    ("resume of corrupt checkpoints", ["resume={base}/corrupt"],
     ["no usable checkpoint", "last.pt is unusable", "truncated?", "reproduce="]),
    ("resume and reproduce together", ["resume={base}/finished", "reproduce={base}/finished"], ["pick one"]),
    ("reproduce of a dir that is not a run", ["reproduce={base}/not_a_run"], ["holds no .hydra/config.yaml"]),
    ("reproduce with another experiment", ["reproduce={base}/finished", "experiment=gpt2_124m"],
     ["not experiment=gpt2_124m", "start a new run"]),
    ("a fresh start over a run's checkpoints", ["hydra.run.dir={base}/finished", "resume=never"],
     ["already holds a run", "resume=never would start another over it", "fresh hydra.run.dir"]),
    ("another run's dir with another config", ["hydra.run.dir={base}/finished", "model.n_embd=64"],
     ["holds a run with model.n_embd=128", "this command sets 64", "fresh dir"]),
    ("resume in a sweep", ["-m", "resume={base}/finished", "max_iters=8,16"], ["not a sweep", "drop -m"]),
    ("an override the grammar cannot parse", ["data.source=inp/a=b.txt"],
     ["cannot parse the override data.source=inp/a=b.txt at character 18 ('=')",
      """quote the value so that it is taken as a plain string: 'data.source="inp/a=b.txt"'"""]),
    ("a key the grammar cannot parse", ["max iters=5"], ["cannot parse the override max iters=5 at character 4 (' ')",
                                                         "a key is letters, digits"]),
    ("an interpolation that does not resolve", ["seed=${{oops}}"], ["seed: Interpolation key 'oops' not found"]),
    ("the working dir moved into the run dir", ["hydra.job.chdir=true"],
     ["hydra.job.chdir=true is not supported", "relative paths mean one thing", "drop hydra.job.chdir"]),
    ("the working dir moved in a sweep", ["-m", "hydra.job.chdir=true", "seed=1,2"],
     ["hydra.job.chdir=true is not supported"]),
]


@pytest.mark.parametrize("args, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_user_mistake_gets_one_line_and_changes_nothing(runs, tmp_path, args, fragments):
    base, good_args = runs
    before = fingerprint(base)
    args = [a.format(base=base, cache=base.parent / f"{base.name}_cache") for a in args]
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags come before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    result = run_cli("nanogpt.train", *flags, *good_args, *overrides, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert fingerprint(base) == before  # nothing lost, nothing overwritten, nothing added
    assert not list(tmp_path.iterdir())  # no run dir, no outputs/ or multirun/


def test_a_read_only_run_dir_is_refused_before_anything_runs(runs, tmp_path):
    require_mount_namespace("bind-mount a dir read-only")
    base, good_args = runs
    before = fingerprint(base)
    run_dir = base / "finished"
    command = " ".join([sys.executable, "-m", "nanogpt.train", f"resume={run_dir}", "max_iters=8"])
    result = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {run_dir} {run_dir} && {command}"],
                            cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert_one_line_error(result, "cannot be written (read-only file system", "pick a writable hydra.run.dir")
    assert fingerprint(base) == before


def test_an_unparsable_override_of_nanogpt_sample_names_the_character_and_the_quoting(tmp_path):
    result = run_cli("nanogpt.sample", "prompt=café", cwd=tmp_path)
    assert_one_line_error(result, "cannot parse the override prompt=café at character 11 ('é')", """'prompt="café"'""")
    assert not list(tmp_path.iterdir())
