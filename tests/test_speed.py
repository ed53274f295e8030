"""Our training loop against a plain nanoGPT-style loop: same numbers, and how fast (printed).

The reference is the essence of nanoGPT's train.py for the CPU recipe: get a batch, forward,
backward, clip, AdamW step, zero grads, read the loss every step. Both run the same model from the
same seed on the same batches, so their losses must agree exactly; their speeds are measured in
the same process, alternating, and printed as a ratio (never asserted: the machine is noisy).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import compose
from nanogpt.batches import RandomWindows
from nanogpt.data import ensure_prepared
from nanogpt.model import GPT
from nanogpt.preflight import to_train_config
from nanogpt.train import train

STEPS = 60


def nanogpt_lr(it: int, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000) -> float:
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def plain_loop(config, meta, steps: int) -> tuple[list[float], list[float]]:
    torch.manual_seed(config.seed)
    model = GPT(replace(config.model, vocab_size=meta["vocab_size"]))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99)
    )
    batches = RandomWindows(Path(config.data.dir) / "train.bin", meta["dtype"], config.block_size, config.batch_size,
                            "cpu", seed=config.seed)
    losses, times = [], []
    X, Y = batches.next_batch()
    for it in range(steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(it)
        _, loss = model(X, Y)
        X, Y = batches.next_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return losses, times


def our_loop(config, meta, run_dir: Path, steps: int) -> tuple[list[float], list[float]]:
    run_dir.mkdir(parents=True)
    train(config, run_dir, meta, {})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train"]
    return [r["loss"] for r in trains], [r["ms_per_iter"] / 1e3 for r in trains]


@pytest.mark.slow
def test_our_loop_equals_a_plain_nanogpt_loop_and_prints_the_speed_ratio(tmp_path, shakespeare_path):
    config = to_train_config(compose("train", [
        f"data.source={shakespeare_path}", f"data.dir={tmp_path / 'data'}", "hardware=cpu",
        f"max_iters={STEPS}", f"eval_interval={STEPS}", "eval_iters=1", "log_interval=1",
        "save_checkpoints=false", "hardware.peak_flops=1e11",
    ]))
    config = replace(config, optim=replace(config.optim, decay_iters=2000))  # the recipe's schedule
    meta = ensure_prepared(config.data)

    plain_times, our_times = [], []
    for round_ in range(2):  # alternate, so that a slow phase of the machine hits both
        plain_losses, t = plain_loop(config, meta, STEPS)
        plain_times += t[5:]
        our_losses, t = our_loop(config, meta, tmp_path / f"run{round_}", STEPS)
        our_times += t[5:]
        assert our_losses == plain_losses  # bit for bit: same init, batches, schedule, clip and step

    plain_ms, our_ms = statistics.median(plain_times) * 1e3, statistics.median(our_times) * 1e3
    print(f"\nCPU recipe, median per step: ours {our_ms:.1f} ms, plain nanoGPT-style loop {plain_ms:.1f} ms, "
          f"ratio {our_ms / plain_ms:.3f}")
