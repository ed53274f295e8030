"""Our training loop against nanoGPT's own: the same numbers, and how fast (printed).

The reference is the essence of nanoGPT's train.py for the CPU recipe, written out here: seed the
global RNG, build the model, draw every batch (training and evaluation) from the global RNG,
evaluate every eval_interval steps, and step: forward, backward, clip, AdamW, zero grads, read the
loss. Our loop must give the same train and eval losses, step for step. The speeds are measured in
the same process, alternating, and printed as a ratio (never asserted: the machine is noisy).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose
from nanogpt.data.datasets import ensure_prepared
from nanogpt.model import GPT
from nanogpt.runs.preflight import to_train_config
from nanogpt.train import train

STEPS = 40
ROUNDS = 3  # alternating ours/nanoGPT's; the machine's speed drifts by 20% between rounds


def nanogpt_lr(it: int, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000) -> float:
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def nanogpt_loop(config, meta, steps: int, eval_interval: int, eval_iters: int):
    train_data = np.memmap(Path(config.data.dir) / "train.bin", dtype=np.uint16, mode="r")
    val_data = np.memmap(Path(config.data.dir) / "val.bin", dtype=np.uint16, mode="r")
    B, T = config.batch_size, config.block_size

    def get_batch(split):
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in ("train", "val"):
            out[split] = sum(model(*get_batch(split))[1].item() for _ in range(eval_iters)) / eval_iters
        model.train()
        return out

    torch.manual_seed(config.seed)
    model = GPT(replace(config.model, vocab_size=meta["vocab_size"]))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99)
    )
    losses, evals, times = [], [], []
    X, Y = get_batch("train")
    for it in range(steps + 1):
        if it % eval_interval == 0:
            evals.append(estimate_loss())
        if it == steps:
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it)
        _, loss = model(X, Y)
        X, Y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return losses, evals, times


def our_loop(config, meta, run_dir: Path):
    run_dir.mkdir(parents=True)
    train(config, run_dir, meta, {})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train"]
    evals = [{"train": r["train_loss"], "val": r["val_loss"]} for r in records if r["kind"] == "eval"]
    return [r["loss"] for r in trains], evals, [r["ms_per_iter"] / 1e3 for r in trains]


def cpu_recipe(tmp_path: Path, shakespeare_path: Path, steps: int, eval_interval: int, eval_iters: int, *overrides: str):
    """nanoGPT's CPU recipe (our default), run for `steps` of its 2,000-step schedule, with the AdamW
    kernel nanoGPT uses on a CPU (foreach: it fuses on CUDA only), so that the two loops are
    compared bit for bit; overrides may give ours its own defaults back (optim.fused=null)."""
    config = to_train_config(compose("train", [
        f"data.source={shakespeare_path}", f"data.dir={tmp_path / 'data'}", "hardware=cpu",
        f"max_iters={steps}", f"eval_interval={eval_interval}", f"eval_iters={eval_iters}", "log_interval=1",
        "save_checkpoints=false", "hardware.peak_flops=1e11", "optim.fused=false", *overrides,
    ]))
    config = replace(config, optim=replace(config.optim, decay_iters=2000))  # the recipe's schedule
    return config, ensure_prepared(config.data)


def test_our_loop_reproduces_nanogpt_with_dropout(tmp_path, shakespeare_path):
    """On a CPU, dropout draws from the global RNG between nanoGPT's batch draws: the same masks
    need the same order of draws (one process, one micro-step per step, as the recipe has)."""
    steps, eval_interval, eval_iters = 4, 2, 2
    config, meta = cpu_recipe(tmp_path, shakespeare_path, steps, eval_interval, eval_iters, "model.dropout=0.1",
                              "hardware.peak_flops=null")  # measuring the peak draws nothing either
    ref_losses, ref_evals, _ = nanogpt_loop(config, meta, steps, eval_interval, eval_iters)
    our_losses, our_evals, _ = our_loop(config, meta, tmp_path / "run")
    assert our_losses == ref_losses
    assert our_evals == [pytest.approx(ref, rel=1e-6) for ref in ref_evals]  # means summed in another order
    no_dropout, _, _ = nanogpt_loop(replace(config, model=replace(config.model, dropout=0.0)), meta, 1, 1, 1)
    assert our_losses[0] != no_dropout[0]  # the masks were drawn


@pytest.mark.slow
def test_our_loop_reproduces_nanogpt_and_prints_the_speed_ratio(tmp_path, shakespeare_path, capsys):
    eval_interval, eval_iters = 20, 3
    config, meta = cpu_recipe(tmp_path, shakespeare_path, STEPS, eval_interval, eval_iters)

    ratios = []
    for round_ in range(ROUNDS):
        ref_losses, ref_evals, ref_times = nanogpt_loop(config, meta, STEPS, eval_interval, eval_iters)
        our_losses, our_evals, our_times = our_loop(config, meta, tmp_path / f"run{round_}")
        # same init, same batches (one RNG stream, in nanoGPT's order), same schedule, clip and step
        assert our_losses == ref_losses
        assert len(our_evals) == len(ref_evals) == STEPS // eval_interval + 1
        for ours, ref in zip(our_evals, ref_evals):
            assert ours == pytest.approx(ref, rel=1e-6)  # means summed in another order
        ratios.append(statistics.median(our_times[5:]) / statistics.median(ref_times[5:]))

    with capsys.disabled():  # a benchmark: the figure belongs in the test log, also in CI
        print(f"\n[benchmark] CPU recipe, step time ours/nanoGPT's loop: median {statistics.median(ratios):.3f} "
              f"over {ROUNDS} alternating rounds (rounds ranged {min(ratios):.2f} to {max(ratios):.2f})")


@pytest.mark.slow
def test_the_default_recipe_side_by_side_with_nanogpts_loop(tmp_path, shakespeare_path, capsys):
    """The figure README.md quotes: nanoGPT's CPU recipe for its full 2,000 steps (evaluating every
    250), in nanoGPT's loop and in ours with our defaults for it, one after the other in this
    process: the wall-clock of each run (ours includes whatever start-up its defaults cost, a
    compile too) and the steady-state time of a step, as ratios, and how far the losses moved
    (the fused AdamW kernel rounds the last bit of float32 differently)."""
    steps, eval_interval, eval_iters = 2000, 250, 20
    config, meta = cpu_recipe(tmp_path, shakespeare_path, steps, eval_interval, eval_iters,
                              "optim.fused=null", "hardware.compile=null", "log_interval=50")
    start = time.perf_counter()
    ref_losses, ref_evals, ref_times = nanogpt_loop(config, meta, steps, eval_interval, eval_iters)
    ref_wall = time.perf_counter() - start
    start = time.perf_counter()
    run_dir = tmp_path / "ours"
    run_dir.mkdir()
    train(config, run_dir, meta, {})
    our_wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    our_evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    our_steps = [r for r in records if r["kind"] == "train"]  # every 50th step, with the mean ms of the 50
    our_ms = statistics.median(r["ms_per_iter"] for r in our_steps[2:])
    ref_ms = statistics.median(ref_times[100:]) * 1e3
    loss_diff = max(abs(r["loss"] - ref_losses[r["step"] - 1]) for r in our_steps)
    val_diff = max(abs(ours - ref["val"]) for ours, ref in zip(our_evals, ref_evals))
    with capsys.disabled():
        print(f"\n[benchmark] nanoGPT's CPU recipe, {steps} steps, ours ({'fused' if config.optim.fused is not False else 'foreach'}"
              f" AdamW) vs nanoGPT's loop: wall-clock {our_wall:.1f} s vs {ref_wall:.1f} s (ratio {our_wall / ref_wall:.3f}), "
              f"steady-state {our_ms:.1f} vs {ref_ms:.1f} ms/iter (ratio {our_ms / ref_ms:.3f}); final val loss "
              f"{our_evals[-1]:.4f} vs {ref_evals[-1]['val']:.4f}, largest difference of a logged train loss "
              f"{loss_diff:.1e}, of a val loss {val_diff:.1e}")
    assert len(our_evals) == len(ref_evals) == steps // eval_interval + 1
    assert val_diff < 0.02  # the same training, up to float32 rounding
