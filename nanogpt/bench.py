"""nanogpt-bench: time the training step of any train config (nanoGPT's bench.py).

Runs warmup steps, then times `bench.steps` optimizer steps of exactly the code nanogpt-train
runs (`train.optimizer_step`), on real batches or random tokens, and prints ms/iter, tokens/s
and MFU. With bench.profile=true it also writes a torch.profiler Chrome trace.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nanogpt.cli import hydra_entrypoint
from nanogpt.config import AUTO, BenchConfig, check_world_size, config_dir
from nanogpt.errors import ConfigError, user_errors
from nanogpt.runs.preflight import check_data_and_vocab, to_train_config
from nanogpt.train import build_training, optimizer_step

log = logging.getLogger("nanogpt")


def run_benchmark(config: BenchConfig) -> dict:
    import torch

    from nanogpt.data.batches import RandomTokens, RandomWindows
    from nanogpt.parallel import hardware

    b = config.bench
    if b.steps < 1 or b.warmup_steps < 0:
        raise ConfigError(f"bench.steps={b.steps} must be >= 1 and bench.warmup_steps={b.warmup_steps} >= 0")
    if config.batch_size == AUTO:  # one number is what a benchmark times
        raise ConfigError("nanogpt-bench times the batch_size it is given: set a number (nanogpt-train batch_size=auto "
                          "logs the one it picks)")
    if b.real_data:
        data_meta = check_data_and_vocab(config)
    else:
        # random tokens: the vocab training would use (the model's, else the prepared data's), else
        # GPT-2's padded one as nanoGPT's bench.py uses
        from nanogpt.data.datasets import is_prepared, load_meta

        vocab = config.model.vocab_size or (load_meta(config.data.dir)["vocab_size"] if is_prepared(config.data.dir) else 50304)
        data_meta = {"vocab_size": vocab}
    accum = check_world_size(config, 1)  # the benchmark runs one process
    t = build_training(config, data_meta)
    hw, raw_model = t.hw, t.raw_model
    batch_args = dict(block_size=config.block_size, batch_size=config.batch_size, device=hw.device, generator=t.data_rng)
    if b.real_data:
        batches = RandomWindows(Path(config.data.dir) / "train.bin", data_meta["dtype"], **batch_args)
    else:
        batches = RandomTokens(raw_model.config.vocab_size, **batch_args)

    sync = torch.get_device_module(hw.device_type).synchronize  # waits for the GPU; a no-op on a CPU
    batch = batches.next_batch()

    def steps(n: int):
        nonlocal batch
        loss = None
        for _ in range(n):
            step = optimizer_step(t, batches, batch, accum, config.optim.grad_clip, config.on_nonfinite)
            loss, batch = step.loss, step.next_batch
        return loss

    log.info(
        f"benchmarking {raw_model.get_num_params() / 1e6:.2f}M parameters (vocab {raw_model.config.vocab_size}), "
        f"{config.batch_size} x {config.block_size} x {accum} tokens per step, {hw.describe()}, "
        f"{'real' if b.real_data else 'random'} data"
    )
    steps(b.warmup_steps)
    sync()
    if b.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if hw.device_type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            steps(min(b.steps, 5))
            sync()
        trace = Path(b.trace_dir) / "trace.json"
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        log.info(f"profiler trace: {trace} (open in chrome://tracing or ui.perfetto.dev)")

    start = time.perf_counter()
    loss = steps(b.steps)
    sync()
    dt = (time.perf_counter() - start) / b.steps
    tokens_per_s = config.batch_size * config.block_size * accum / dt
    mfu, mfu_capped = hardware.MFU(hw, raw_model, config.block_size)(tokens_per_s)
    result = {"ms_per_iter": dt * 1e3, "tokens_per_s": tokens_per_s, "mfu": mfu, "mfu_capped": mfu_capped,
              "peak_flops": hw.peak_flops, "peak_from": hw.peak_from, "loss": float(loss)}
    log.info(
        f"{dt * 1e3:.2f} ms/iter, {tokens_per_s:,.0f} tokens/s, MFU {mfu * 100:.2f}%{' (capped)' if mfu_capped else ''} "
        f"(of {hw.peak_flops / 1e12:.2f} TFLOP/s, the {hw.peak_from} peak), loss {float(loss):.4f}"
    )
    return result


@hydra.main(config_path=str(config_dir()), config_name="bench", version_base="1.3")
def _main(cfg: DictConfig) -> dict:
    with user_errors():
        return run_benchmark(to_train_config(cfg))


main = hydra_entrypoint(_main, nanogpt_script="bench")

if __name__ == "__main__":
    main()
