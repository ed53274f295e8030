"""The paths a GPU run takes, run on a CPU: fp16 autocast with the GradScaler, bf16 autocast,
fused AdamW, and torch.compile with DDP and gradient accumulation, with exact resume and with
FSDP2. PyTorch makes each of these calls on every device, and the code makes them the same way
on every device, so CI proves them without a GPU; what only a GPU has (nccl, flash kernels, the
datasheet peak) is nanogpt-gpu-check's.
"""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE, Training, compose, require_shakespeare, run_cli
from nanogpt.config import NonFinite
from nanogpt.data.batches import RandomWindows
from nanogpt.data.datasets import ensure_prepared
from nanogpt.optim import build_optimizer
from nanogpt.runs.preflight import to_train_config
from nanogpt.train import build_training, optimizer_step

SMALL = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=32", "hardware=cpu",
         "hardware.peak_flops=1e11", "eval_iters=2", "log_interval=1"]
N = 20  # steps of each run; a checkpoint every 10


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    require_shakespeare()
    cwd = tmp_path_factory.mktemp("device_paths")
    return cwd, [f"data.source={SHAKESPEARE}", f"data.dir={cwd / 'data'}", *SMALL]


def built(tmp_path: Path, *overrides: str):
    config = to_train_config(compose("train", [f"data.source={require_shakespeare()}", f"data.dir={tmp_path / 'data'}",
                                               *SMALL, *overrides]))
    meta = ensure_prepared(config.data)
    t = build_training(config, meta)
    batches = RandomWindows(Path(config.data.dir) / "train.bin", meta["dtype"], block_size=config.block_size,
                            batch_size=config.batch_size, device=t.hw.device, generator=t.data_rng)
    return t, batches, config


def weights(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == N
    return ckpt["model"]


def train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def numbers(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings: what an exact resume repeats."""
    keep = ("step", "kind", "loss", "lr", "grad_norm", "skipped_steps", "train_loss", "val_loss")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in keep} for r in records]


def stopped_and_resumed(cwd: Path, base: list[str], name: str, *args: str) -> Path:
    """A run stopped by SIGTERM after its first checkpoint (it saves at the step boundary), then
    continued with resume=<its dir>."""
    run = Training(cwd, *base, f"max_iters={N}", "eval_interval=10", f"hydra.run.dir={name}", *args)
    run.wait_for("iter 13:")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=600) == 128 + signal.SIGTERM, run.output
    assert 13 <= torch.load(cwd / name / "checkpoints" / "last.pt", weights_only=True)["step"] < N, run.output
    result = run_cli("nanogpt.train", f"resume={cwd / name}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / name


def straight(cwd: Path, base: list[str], name: str, *args: str) -> Path:
    result = run_cli("nanogpt.train", *base, f"max_iters={N}", "eval_interval=10", f"hydra.run.dir={name}", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / name


def one_block(base: list[str]) -> list[str]:
    """base with a model of one transformer block: torch.compile's time grows with the graph, and one
    block holds every op the model has, and FSDP2 still shards it and then the root (the gradients
    of one or two blocks fit one of DDP's 25 MB buckets alike: one compiled graph either way)."""
    return [arg for arg in base if not arg.startswith("model.n_layer=")] + ["model.n_layer=1"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- fp16 with the GradScaler, bf16 ----------------------------------------------------------


def test_fp16_grad_scaler_skips_an_overflowing_step_and_goes_on(tmp_path):
    """fp16's gradients overflow now and then; the scaler must skip that step, halve the scale and
    go on, never stop the run (on_nonfinite=stop is for a loss that is not finite)."""
    reference, _, _ = built(tmp_path)  # float32, from the same seed: the same initial weights
    t, batches, _ = built(tmp_path, "hardware.dtype=float16")
    assert t.hw.dtype == torch.float16 and t.scaler.is_enabled()
    batch = batches.next_batch()
    exact = optimizer_step(reference, batches, batch, 1, 1.0, NonFinite.stop)
    step = optimizer_step(t, batches, batch, 1, 1.0, NonFinite.stop)
    assert step.applied
    # the gradients were unscaled before clipping and the norm: fp16's norm is float32's, not 65536 times it
    assert float(step.grad_norm) == pytest.approx(float(exact.grad_norm), rel=2e-2)
    scale = t.scaler.get_scale()
    param = t.raw_model.transformer.h[0].mlp.c_fc.weight
    before = param.detach().clone()
    hook = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # one overflowing gradient
    step = optimizer_step(t, batches, step.next_batch, 1, 1.0, NonFinite.stop)
    hook.remove()
    assert not step.applied and torch.equal(param, before)  # skipped: no weight moved
    assert t.scaler.get_scale() == scale / 2
    step = optimizer_step(t, batches, step.next_batch, 1, 1.0, NonFinite.stop)
    assert step.applied and not torch.equal(param, before)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_reduced_precision_run_trains_and_resumes_exactly(workspace, dtype):
    cwd, base = workspace
    precision = [f"hardware.dtype={dtype}", "optim.warmup_iters=0"]
    reference = straight(cwd, base, f"{dtype}_straight", *precision)
    resumed = stopped_and_resumed(cwd, base, f"{dtype}_resumed", *precision)
    assert f"cpu, {dtype}, compile=off" in (reference / "train.log").read_text()
    losses = [r["loss"] for r in train_records(reference)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3  # it learns
    scaler = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert (scaler.get("scale") is not None) == (dtype == "float16")  # the GradScaler's state travels
    assert_bitwise_equal(weights(resumed), weights(reference))
    assert numbers(resumed) == numbers(reference)


# --- fused AdamW -----------------------------------------------------------------------------


def test_fused_adamw_is_the_default_on_a_cpu_and_steps_like_foreach(tmp_path):
    t, _, config = built(tmp_path)
    assert t.optimizer.defaults["fused"] is True  # the default everywhere PyTorch has the kernel
    assert not build_optimizer(t.raw_model, replace(config.optim, fused=False), "cpu").defaults.get("fused")
    # the same update, up to float32 rounding: one fused expression against a chain of foreach ops
    torch.manual_seed(0)
    params = [torch.randn(64, 64, requires_grad=True) for _ in range(3)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(10):
        for p, c in zip(params, copies):
            p.grad = torch.randn_like(p)
            c.grad = p.grad.clone()
        fused.step()
        plain.step()
    # Rounding, not the update: the two kernels' float32 results drift apart by up to a few 1e-6
    # over the 10 steps (2.9e-6 in one full-suite run on a 2-core Xeon; 1e-8 to 1e-7 alone),
    # while a slightly wrong update (weight decay 0.09 for 0.1) is 4e-3 away after them.
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, rtol=1e-5, atol=1e-5)


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_with_ddp_and_gradient_accumulation_trains_like_one_process(workspace):
    """2 processes x micro-batch 2 x 2 micro-steps against 1 x 2 x 4: the same global batch, compiled
    both times (DDP over gloo splits the compiled graph at its gradient buckets)."""
    cwd, base = workspace[0], one_block(workspace[1])
    split = ["batch_size=2", "global_batch_size=8", "hardware.compile=true"]
    two = straight(cwd, base, "compile_ddp", *split, "hardware.nproc_per_node=2")
    one = straight(cwd, base, "compile_one", *split)
    log = (two / "train.log").read_text()
    assert "2 x 32 x 2 micro-steps x 2 processes" in log and "compile=on" in log
    diff = max((a - b).abs().max().item() for a, b in zip(weights(two).values(), weights(one).values()))
    print(f"\n[equivalence] compiled, 2 processes x 2 x 2 vs 1 x 2 x 4, {N} steps: max |weight diff| = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly(workspace):
    """The checkpoint holds the plain model's weights (never the compiled wrapper's `_orig_mod.`
    names), and a resumed process compiles the same kernels: bit for bit the run that never stopped."""
    cwd, base = workspace
    compiled = ["hardware.compile=true", "model.dropout=0.1"]  # dropout inside the compiled graph: its RNG too
    reference = straight(cwd, base, "compile_straight", *compiled)
    resumed = stopped_and_resumed(cwd, base, "compile_resumed", *compiled)
    assert "compile=on" in (reference / "train.log").read_text()
    assert not any(name.startswith("_orig_mod.") for name in weights(reference))
    assert_bitwise_equal(weights(resumed), weights(reference))
    assert numbers(resumed) == numbers(reference)


@pytest.mark.slow
def test_compile_with_fsdp2_trains_like_one_process(workspace):
    cwd, base = workspace[0], one_block(workspace[1])
    split = ["batch_size=4", "global_batch_size=8", "hardware.compile=true"]
    two = straight(cwd, base, "compile_fsdp", *split, "hardware.fsdp=true", "hardware.nproc_per_node=2")
    one = straight(cwd, base, "compile_fsdp_one", *split)
    assert "compile=on" in (two / "train.log").read_text()
    diff = max((a - b).abs().max().item() for a, b in zip(weights(two).values(), weights(one).values()))
    print(f"\n[equivalence] compiled, FSDP2 2 processes x 4 vs 1 x 4 x 2, {N} steps: max |weight diff| = {diff:.2e}")
    assert diff < 1e-5


def test_compile_without_a_cpp_compiler_trains_uncompiled_and_says_so_once(tmp_path):
    """TorchInductor builds CPU kernels with a C++ compiler; without one, one warning line and an
    uncompiled run, not a traceback from inside the first step."""
    require_shakespeare()
    result = run_cli("nanogpt.train", f"data.source={SHAKESPEARE}", f"data.dir={tmp_path / 'data'}", *SMALL,
                     "max_iters=2", "eval_interval=2", "hardware.compile=true", "hydra.run.dir=run",
                     cwd=tmp_path, env={"CXX": str(tmp_path / "no-such-compiler")})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("no C++ compiler for torch.compile's CPU kernels") == 1, output
    assert "compile=off" in (tmp_path / "run" / "train.log").read_text()
