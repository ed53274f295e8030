"""End to end, as a user runs it: train, sample, bench, finetune, wandb; and mistakes that stop early."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from conftest import assert_one_line_error, require_shakespeare, run_cli

FAST = ["max_iters=20", "eval_interval=10", "eval_iters=2", "log_interval=5"]


def only_run_dir(cwd: Path) -> Path:
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, request):
    """One short run of the default recipe, shared by the tests that read its run dir."""
    shakespeare = require_shakespeare()
    cwd = tmp_path_factory.mktemp("char_run")
    result = run_cli("nanogpt.train", f"data.source={shakespeare}", *FAST, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, only_run_dir(cwd), result


def test_default_recipe_trains_and_leaves_a_run_dir(char_run):
    cwd, run_dir, result = char_run
    assert "model: 0.80M parameters" in result.stdout
    assert "iter 20: loss" in result.stdout and "ms/iter" in result.stdout and "mfu" in result.stdout
    assert "step 20: train loss" in result.stdout
    for path in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "metrics.jsonl",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / path).is_file(), path
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, 10, 20]  # the final step is evaluated too
    assert [r["step"] for r in trains] == [5, 10, 15, 20]
    assert {"loss", "lr", "ms_per_iter", "tokens_per_s", "mfu"} <= set(trains[0])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert (cwd / "data" / "shakespeare_char" / "meta.json").is_file()  # prepared on the fly


def test_run_dir_records_what_ran(char_run):
    import subprocess

    from omegaconf import OmegaConf

    cwd, run_dir, _ = char_run
    resolved = OmegaConf.load(run_dir / "config.resolved.yaml")
    assert resolved.data.dir == "data/shakespeare_char" and resolved.optim.decay_iters == 20  # no ${...} left
    record = json.loads((run_dir / "provenance.json").read_text())
    assert record["status"] == "done" and record["end_time"] and (run_dir / "DONE").is_file()
    assert record["seed"] == 1337 and record["world_size"] == 1 and "max_iters=20" in record["argv"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a checkout: the record names its commit
        assert record["git"]["commit"] == head.stdout.strip() and "diff" in record["git"]
    assert record["versions"]["torch"] and record["versions"]["hydra-core"]


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_their_own_dirs(tmp_path, shakespeare_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    args = [sys.executable, "-m", "nanogpt.train", f"data.source={shakespeare_path}", "max_iters=1", "eval_iters=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_cli("nanogpt.prepare", f"data.source={shakespeare_path}", cwd=tmp_path)  # both find the data ready
    procs = [subprocess.Popen([*args, f"seed={seed}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read() for p in procs]
    runs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(runs) == 2
    assert sorted(json.loads((r / "provenance.json").read_text())["seed"] for r in runs) == [1, 2]


def test_checkpoint_holds_what_resume_and_sampling_need(char_run):
    import torch

    _, run_dir, _ = char_run
    # val loss fell at steps 10 and 20: best.pt is the last one, as a second name of the same file
    assert (run_dir / "checkpoints/best.pt").samefile(run_dir / "checkpoints/last.pt")
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["format"] == "nanogpt-checkpoint"
    assert ckpt["model_config"]["n_layer"] == 4 and ckpt["data_meta"]["vocab_size"] == 65
    assert {"model", "optimizer", "scaler", "best_val_loss", "config"} <= set(ckpt)
    assert json.loads(ckpt["config"])["model"]["n_embd"] == 128


@pytest.mark.slow
def test_sample_from_a_run_dir_is_seeded(char_run):
    cwd, run_dir, _ = char_run
    args = [f"init_from={run_dir}", "prompt=ROMEO:", "num_samples=2", "max_new_tokens=40"]
    first = run_cli("nanogpt.sample", *args, cwd=cwd)
    assert first.returncode == 0, first.stderr
    samples = first.stdout.split("---------------\n")
    assert len([s for s in samples if s.strip()]) == 2 and all(s.startswith("ROMEO:") for s in samples if s.strip())
    assert run_cli("nanogpt.sample", *args, "kv_cache=false", cwd=cwd).stdout == first.stdout  # same tokens, slower
    assert run_cli("nanogpt.sample", *args, "seed=2", cwd=cwd).stdout != first.stdout
    assert sorted(p.name for p in cwd.iterdir()) == ["data", "outputs"]  # sampling wrote nothing


@pytest.mark.slow
def test_sample_prompt_from_file_and_missing_file(char_run, tmp_path):
    cwd, run_dir, _ = char_run
    (tmp_path / "prompt.txt").write_text("JULIET:\n")
    ok = run_cli("nanogpt.sample", f"init_from={run_dir}", f"prompt_file={tmp_path / 'prompt.txt'}",
                 "num_samples=1", "max_new_tokens=10", cwd=cwd)
    assert ok.returncode == 0 and ok.stdout.startswith("JULIET:\n"), ok.stderr
    missing = run_cli("nanogpt.sample", f"init_from={run_dir}", "prompt_file=nope.txt", cwd=cwd)
    assert_one_line_error(missing, f"prompt_file=nope.txt ({cwd / 'nope.txt'}) does not exist")


@pytest.mark.slow
def test_finetune_from_our_run_dir(char_run, shakespeare_path):
    cwd, run_dir, _ = char_run
    result = run_cli("nanogpt.train", f"init_from={run_dir}", f"data.source={shakespeare_path}", "max_iters=5", "eval_interval=5", "eval_iters=2",
                     "optim.warmup_iters=0", "hydra.run.dir=outputs/finetune/run", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert f"initialised from {run_dir}/checkpoints/best.pt" in result.stdout
    # it starts from the trained weights: its first eval (same eval batches as the source run's
    # first, untrained one) is as low as where the source run ended
    first = lambda path: json.loads(path.read_text().splitlines()[0])  # noqa: E731
    source_start = first(run_dir / "metrics.jsonl")["val_loss"]
    assert first(cwd / "outputs/finetune/run/metrics.jsonl")["val_loss"] < source_start - 0.3
    mismatch = run_cli("nanogpt.train", f"init_from={run_dir}", f"data.source={shakespeare_path}", "model.n_layer=2",
                       cwd=cwd)
    assert_one_line_error(mismatch, "set model.n_layer=4")
    assert not (cwd / "outputs" / "finetune" / "run2").exists()

    # another char vocabulary: every id would mean another character
    other = cwd / "other.txt"
    other.write_text("Zebras quietly jumped over lazy dogs!\n" * 2000)
    refused = run_cli("nanogpt.train", f"init_from={run_dir}", "data=text", f"data.source={other}",
                      "data.dir=data/other", cwd=cwd)
    assert_one_line_error(refused, "was trained with another characters")


@pytest.mark.slow
def test_bench_prints_speed_and_mfu(char_run, tmp_path, shakespeare_path):
    cwd, _, _ = char_run
    real = run_cli("nanogpt.bench", f"data.source={shakespeare_path}", "bench.steps=3", "bench.warmup_steps=1", cwd=cwd)
    assert real.returncode == 0, real.stderr
    assert "ms/iter" in real.stdout and "tokens/s" in real.stdout and "MFU" in real.stdout
    synthetic = run_cli("nanogpt.bench", "bench.real_data=false", "bench.steps=2", "bench.warmup_steps=1",
                        "bench.profile=true", "bench.trace_dir=trace", "data.dir=/nonexistent", cwd=tmp_path)
    assert synthetic.returncode == 0, synthetic.stderr
    assert "random data" in synthetic.stdout
    assert json.loads((tmp_path / "trace" / "trace.json").read_text())["traceEvents"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]


@pytest.mark.slow
def test_gpt2_bpe_data_and_wandb_offline(tmp_path, shakespeare_path, gpt2_tiktoken):
    args = ["data=shakespeare", f"data.source={shakespeare_path}", "model.n_layer=1", "model.n_embd=32",
            "model.n_head=2", "logger=wandb", "logger.mode=offline", *FAST]
    result = run_cli("nanogpt.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    assert "vocab 50257" in result.stdout
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "wandb wrote no offline run"


def test_missing_data_without_network_writes_nothing(tmp_path):
    result = run_cli("nanogpt.train", "data.source=http://127.0.0.1:9/input.txt", cwd=tmp_path, timeout=120)
    assert_one_line_error(result, "could not download http://127.0.0.1:9/input.txt", "data.source")
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == [] and not (tmp_path / "outputs").exists()


def test_vocab_smaller_than_the_data_is_refused(tmp_path, shakespeare_path):
    result = run_cli("nanogpt.train", f"data.source={shakespeare_path}", "model.vocab_size=50", cwd=tmp_path)
    assert_one_line_error(result, "model.vocab_size=50 is smaller than the 65 tokens")
    assert not (tmp_path / "outputs").exists()


def test_nanogpt_checkpoint_samples_with_its_meta_pkl(tmp_path):
    """A user migrating from nanoGPT: its ckpt.pt and its dataset's meta.pkl, sampled as is."""
    import torch

    from nanogpt.config import ModelConfig
    from nanogpt.model import GPT

    chars = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"))
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False, vocab_size=len(chars), dropout=0.0)
    model = GPT(ModelConfig(**args))
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "model_args": args,
                "iter_num": 100, "best_val_loss": torch.tensor(2.0), "optimizer": {},
                "config": {"dataset": "shakespeare_char"}}, tmp_path / "ckpt.pt")
    meta_dir = tmp_path / "data" / "shakespeare_char"
    meta_dir.mkdir(parents=True)
    with open(meta_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    result = run_cli("nanogpt.sample", f"init_from={tmp_path / 'ckpt.pt'}", "prompt=First", "num_samples=1",
                     "max_new_tokens=30", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout.split("---------------")[0]
    assert text.startswith("First") and set(text.strip("\n")) <= set(chars)


@pytest.fixture
def tiny_hf_gpt2_dir(tmp_path):
    """A randomly initialised GPT-2 with the real vocabulary, saved as the hub's files would be."""
    transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf-gpt2")
    return tmp_path / "hf-gpt2"


@pytest.mark.slow
def test_eval_gpt2_recipe_on_local_weights(tmp_path, tiny_hf_gpt2_dir, shakespeare_path, gpt2_tiktoken):
    """The eval_gpt2 experiment, offline: local HF weights instead of the hub, Shakespeare instead of OWT."""
    result = run_cli("nanogpt.train", "experiment=eval_gpt2", f"init_from={tiny_hf_gpt2_dir}", "data=shakespeare",
                     f"data.source={shakespeare_path}", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                     "model.block_size=64", "eval_iters=2", "batch_size=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"initialised from {tiny_hf_gpt2_dir}" in result.stdout and "step 0: train loss" in result.stdout
    run_dir = only_run_dir(tmp_path)
    assert not (run_dir / "checkpoints").exists()  # evaluation only: nothing to save
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["eval"]

    sampled = run_cli("nanogpt.sample", f"init_from={tiny_hf_gpt2_dir}", "prompt='Hello, world'", "num_samples=1",
                      "max_new_tokens=5", cwd=tmp_path)
    assert sampled.returncode == 0 and sampled.stdout.startswith("Hello, world"), sampled.stderr


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_the_run_dir(tmp_path, shakespeare_path):
    import uuid

    # made at run time: a literal here would sit in the git diff that provenance.json records
    secrets = {"WANDB_API_KEY": uuid.uuid4().hex + uuid.uuid4().hex[:8], "HF_TOKEN": f"hf_{uuid.uuid4().hex}"}
    for max_iters in (2, 4):  # a run, then its continuation (resume=auto, same dir)
        result = run_cli("nanogpt.train", f"data.source={shakespeare_path}", f"max_iters={max_iters}", "eval_iters=1",
                         "eval_interval=2", "logger=wandb", "logger.mode=offline", "hydra.run.dir=outputs/secret",
                         cwd=tmp_path, env=secrets)
        assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert any(p.name == "provenance.json" for p in files) and any("wandb" in p.parts for p in files)
    for path in files:
        content = path.read_bytes()
        assert not any(value.encode() in content for value in secrets.values()), path


def start_training(tmp_path, shakespeare_path, *args):
    """A training subprocess, and a function that waits until it has printed a given line start."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    run_cli("nanogpt.prepare", f"data.source={shakespeare_path}", cwd=tmp_path)  # so training starts at once
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanogpt.train", f"data.source={shakespeare_path}", "max_iters=100000",
         "eval_interval=100000", "eval_iters=1", *args],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )

    def wait_for(prefix: str) -> list[str]:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(prefix):
                return seen
        raise AssertionError(f"the run ended before printing {prefix!r}:\n{''.join(seen)}")

    return proc, wait_for


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, shakespeare_path):
    import signal

    import torch

    proc, wait_for = start_training(tmp_path, shakespeare_path)
    wait_for("iter 5:")
    proc.send_signal(signal.SIGTERM)
    rest = "".join(wait_for("stopped by SIGTERM after step")) + proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, rest
    run_dir = only_run_dir(tmp_path)
    record = json.loads((run_dir / "provenance.json").read_text())
    assert record["status"] == "preempted" and not (run_dir / "DONE").exists()
    last_logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == last_logged["step"] >= 5  # the step it finished, no later
    assert not (run_dir / "checkpoints" / "best.pt").exists()  # no evaluation ranked it


def test_a_second_ctrl_c_stops_at_once_and_corrupts_nothing(tmp_path, shakespeare_path):
    import signal
    import time

    import torch

    proc, wait_for = start_training(tmp_path, shakespeare_path, "eval_interval=3")
    wait_for("iter 4:")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.stdout.read()
    assert proc.wait(timeout=30) != 0
    run_dir = only_run_dir(tmp_path)
    assert json.loads((run_dir / "provenance.json").read_text())["status"] == "preempted"
    for ckpt in (run_dir / "checkpoints").glob("*.pt"):  # whatever was saved is whole
        assert torch.load(ckpt, weights_only=True)["step"] >= 3
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


@pytest.fixture
def tiny_training(tmp_path, shakespeare_path, monkeypatch):
    """train() in this process on a tiny model, with hooks that can poison a step: returns
    (run, poison, run_dir) where poison(kind, at_step) makes that training step's loss NaN
    ("loss") or the weights NaN after it ("weights")."""
    import torch
    from conftest import compose

    from nanogpt import train as train_module
    from nanogpt.runs.preflight import check_data_and_vocab, to_train_config

    poisoned = {}
    build_training = train_module.build_training

    def build_with_hooks(*args, **kwargs):
        t = build_training(*args, **kwargs)
        forwards = {"n": 0}

        def nan_loss(module, args, output):
            if not module.training:
                return output
            forwards["n"] += 1
            if poisoned.get("loss") == forwards["n"]:  # one micro-step per step here
                return output[0], output[1] * float("nan")
            return output

        def nan_weights(optimizer, args, kwargs):
            if poisoned.get("weights") == optimizer.state[next(iter(optimizer.state))]["step"].item():
                with torch.no_grad():
                    t.raw_model.lm_head.weight.fill_(float("nan"))

        t.raw_model.register_forward_hook(nan_loss)
        t.optimizer.register_step_post_hook(nan_weights)
        return t

    monkeypatch.setattr(train_module, "build_training", build_with_hooks)

    def run(*overrides: str):
        cfg = compose("train", [f"data.source={shakespeare_path}", f"data.dir={tmp_path / 'data'}", "hardware=cpu",
                                "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
                                "batch_size=4", "max_iters=8", "eval_interval=2", "eval_iters=1",
                                "hardware.peak_flops=1e11", *overrides])
        config = to_train_config(cfg)
        from omegaconf import OmegaConf

        resolved = OmegaConf.to_container(cfg, resolve=True)
        return train_module.train(config, run_dir, check_data_and_vocab(config), resolved)

    def poison(kind: str, at_step: int) -> None:
        poisoned[kind] = at_step

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run, poison, run_dir


def saved_step(run_dir: Path) -> int:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]


def test_a_nan_loss_stops_the_run_by_default_without_applying_the_step(tiny_training):
    from nanogpt.train import NonFiniteStep

    run, poison, run_dir = tiny_training
    poison("loss", 3)
    with pytest.raises(NonFiniteStep, match=r"step 3: the loss is nan \(the step was not applied; the last checkpoint "
                                             r"is step 2\): lower optim.lr .* on_nonfinite=skip"):
        run()
    assert saved_step(run_dir) == 2


def test_a_nan_loss_is_skipped_and_counted_with_on_nonfinite_skip(tiny_training, caplog):
    run, poison, run_dir = tiny_training
    poison("loss", 3)
    result = run("on_nonfinite=skip")
    assert result["step"] == 8 and result["stopped_by"] is None
    assert "step 3: non-finite loss or gradient, step skipped (1 skipped so far)" in caplog.text
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in trains] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert saved_step(run_dir) == 8


def test_nan_weights_are_never_saved(tiny_training):
    from nanogpt.train import NonFiniteStep

    run, poison, run_dir = tiny_training
    poison("weights", 3)  # after step 3 the weights are NaN; step 4 is skipped; its checkpoint is refused
    with pytest.raises(NonFiniteStep, match="the weights are not finite at step 4; nothing was saved"):
        run("on_nonfinite=skip")
    assert saved_step(run_dir) == 2
    from nanogpt.runs.checkpoint import CheckpointDir

    assert CheckpointDir(run_dir / "checkpoints").verify(run_dir / "checkpoints" / "last.pt") is None
