"""nanogpt-gpu-check: one command that proves the CUDA path on the GPU at hand, in minutes.

    nanogpt-gpu-check                        # every check on the first GPU; report in gpu_check/<date>/
    nanogpt-gpu-check --skip bench_compile   # leave out a check (it is reported as SKIP)
    nanogpt-gpu-check --device cpu           # the same code through the CPU (small sizes): the report's CI test

It writes an environment report (torch, CUDA, driver, GPU, bf16, SDPA backends) and runs each
check below; a check passes, fails with its one-line error, or is skipped with the reason, and
every check runs whatever the others did. The exit status is 0 only when none failed. On a
machine without a GPU it says so in one line and exits 0.

The checks drive the project's own code: the benchmarks go through nanogpt-bench's
run_benchmark (it times train.optimizer_step), the runs through nanogpt-train as a subprocess.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanogpt import __version__
from nanogpt.config import BenchConfig, config_dir, register_configs
from nanogpt.errors import ConfigError, UserError, exit_with_error, one_line
from nanogpt.parallel.distributed import DistEnv

log = logging.getLogger("nanogpt")

SCHEMA = "nanogpt-gpu-check/1"

# Two sizes of every check: `full` is what the check is for (GPT-2 124M for the benchmarks, nanoGPT's
# shakespeare_char model for the runs), `tiny` runs the same code in seconds (a CPU, the tests).
SIZES = {
    "full": dict(bench=["model=gpt2", "model.vocab_size=50304", "block_size=1024"], bench_batch_size=None,
                 bench_steps=20, bench_warmup=10, run_model=["model=shakespeare_char", "block_size=256"],
                 run_batch_size=32, train_iters=300, resume_iters=150, min_loss_drop=1.0, kv_tokens=260),
    "tiny": dict(bench=["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                        "model.vocab_size=512"], bench_batch_size=4, bench_steps=3, bench_warmup=1,
                 run_model=["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64"],
                 run_batch_size=8, train_iters=60, resume_iters=60, min_loss_drop=0.3, kv_tokens=64),
}


class Skip(Exception):
    """A check that cannot run here: the message says why."""


@dataclass
class Check:
    name: str
    title: str
    run: Callable[["Context"], dict]


@dataclass
class Context:
    args: argparse.Namespace
    device: str  # "cuda" or "cpu"
    size: dict
    work: Path  # the report dir's work/: data, run dirs, logs
    gpus: int = 0

    @property
    def hardware(self) -> list[str]:
        """The hardware overrides of every check: this device, TF32 on as the GPU recipes have it."""
        return [f"hardware.device={self.device}", "hardware.tf32=true"]


# ---------------------------------------------------------------------------------------------
# configs: composed exactly as the entrypoints compose them


def compose(config_name: str, overrides: list[str]):
    """A typed config of conf/<config_name>.yaml with overrides, checked as nanogpt-train checks it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nanogpt.runs.preflight import to_train_config

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return to_train_config(hydra_compose(config_name, overrides=overrides))


def bench_config(ctx: Context, dtype: str, compile_model: bool, steps: int | None = None) -> BenchConfig:
    batch_size = ctx.args.batch_size or ctx.size["bench_batch_size"] or default_batch_size()
    return compose("bench", [
        *ctx.size["bench"], "model.dropout=0.0", f"batch_size={batch_size}", "bench.real_data=false",
        f"bench.steps={steps or ctx.args.bench_steps or ctx.size['bench_steps']}",
        f"bench.warmup_steps={ctx.size['bench_warmup']}", *ctx.hardware, f"hardware.dtype={dtype}",
        f"hardware.compile={str(compile_model).lower()}", "optim.fused=true",
    ])


def default_batch_size() -> int:
    """GPT-2 124M's micro-batch at 1,024 tokens that fits the GPU: 16 from 70 GiB, 8 from 35, else 4."""
    import torch

    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return 16 if gib >= 70 else 8 if gib >= 35 else 4


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "nanogpt.train", *overrides]


def run_train(ctx: Context, name: str, overrides: list[str], timeout: float = 600) -> Path:
    """nanogpt-train in a subprocess, its output in work/<name>.log. Returns the run dir."""
    run_dir = ctx.work / name
    log_file = ctx.work / f"{name}.log"
    with open(log_file, "w") as out:
        code = subprocess.run(train_command(*overrides, f"hydra.run.dir={run_dir}"), stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout).returncode
    if code != 0:
        raise RuntimeError(f"nanogpt-train exited with {code}: {last_line(log_file)} (log: {log_file})")
    return run_dir


def last_line(path: Path) -> str:
    """The line of a log that says what went wrong: its last error line, else its last line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "RuntimeError", "torch.", "ValueError"))]
    return (errors or lines or ["(no output)"])[-1].strip()


def run_overrides(ctx: Context, data: list[str], iters: int, eval_interval: int, compile_model: bool) -> list[str]:
    return [*data, *ctx.size["run_model"], f"batch_size={ctx.size['run_batch_size']}", f"max_iters={iters}",
            f"eval_interval={eval_interval}", "eval_iters=10", "log_interval=1", "optim.warmup_iters=20",
            "optim.lr=1e-3", "optim.min_lr=1e-4", *ctx.hardware, "hardware.dtype=auto",
            f"hardware.compile={str(compile_model).lower()}", "model.dropout=0.0", "logger=none"]


def metrics(run_dir: Path) -> list[dict]:
    from nanogpt.runs.runfiles import read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# the checks


def bench(ctx: Context, compile_model: bool) -> dict:
    """GPT-2 124M training steps on random tokens in bf16 with fused AdamW: ms/iter, tokens/s, MFU."""
    from nanogpt.bench import run_benchmark
    from nanogpt.parallel import hardware

    config = bench_config(ctx, "bfloat16", compile_model)
    start = time.perf_counter()
    result = run_benchmark(config)
    peak = hardware.resolve(config.hardware).peak_flops  # the datasheet's; None: run_benchmark measured one
    return {"ms_per_iter": round(result["ms_per_iter"], 2), "tokens_per_s": round(result["tokens_per_s"]),
            "mfu": round(result["mfu"], 4), "peak_tflops": round(peak / 1e12, 1) if peak else "measured matmul",
            "batch": f"{config.batch_size} x {config.block_size}", "loss": round(result["loss"], 4),
            "seconds": round(time.perf_counter() - start, 1)}  # compile and warmup included


def check_bench_compile(ctx: Context) -> dict:
    return bench(ctx, compile_model=True)


def check_bench_eager(ctx: Context) -> dict:
    return bench(ctx, compile_model=False)


def check_fp16_scaler(ctx: Context) -> dict:
    """fp16 autocast with the GradScaler: the steps run, and the scaler does not skip step after step."""
    from nanogpt.data.batches import RandomTokens
    from nanogpt.train import build_training, optimizer_step

    steps = ctx.args.fp16_steps
    config = bench_config(ctx, "float16", compile_model=False, steps=steps)
    try:
        t = build_training(config, {"vocab_size": config.model.vocab_size})
    except ConfigError as e:
        if ctx.device == "cpu":  # hardware.resolve refuses fp16 on this device: nothing of the check can run
            raise Skip(f"fp16 does not run on cpu here ({e})") from e
        raise
    if not t.scaler.is_enabled():
        raise RuntimeError("hardware.dtype=float16 built no enabled GradScaler")
    batches = RandomTokens(t.raw_model.config.vocab_size, config.block_size, config.batch_size, t.hw.device, t.data_rng)
    batch, skipped, losses = batches.next_batch(), 0, []
    for _ in range(steps):
        step = optimizer_step(t, batches, batch, 1, config.optim.grad_clip, config.on_nonfinite)
        batch, skipped = step.next_batch, skipped + (not step.applied)
        losses.append(float(step.loss))
    result = {"steps": steps, "skipped_steps": skipped, "final_scale": float(t.scaler.get_scale()),
              "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}
    if skipped > ctx.args.fp16_max_skipped:
        raise RuntimeError(f"the GradScaler skipped {skipped} of {steps} steps (more than --fp16-max-skipped="
                           f"{ctx.args.fp16_max_skipped}): a skipped-step storm, final scale {result['final_scale']}")
    if not all(map(math.isfinite, losses)):  # an overflow is in the gradients, the scaler's to handle; never the loss
        raise RuntimeError(f"non-finite losses under fp16: {losses}")
    return result


def prepare_shakespeare(ctx: Context) -> list[str]:
    """The shakespeare_char data group with --data-source, prepared in the work dir (or a Skip)."""
    from nanogpt.data.datasets import ensure_prepared

    data = ["data=shakespeare_char", f"data.dir={ctx.work / 'data' / 'shakespeare_char'}"]
    if ctx.args.data_source:
        data.append(f"data.source={ctx.args.data_source}")
    config = compose("train", data)
    try:
        ensure_prepared(config.data)
    except UserError as e:
        raise Skip(f"tiny Shakespeare is not reachable from here ({one_line(e)}); pass --data-source=a local "
                   f"copy of input.txt") from e
    return data


def check_shakespeare(ctx: Context) -> dict:
    """A shakespeare_char run of a few hundred steps (compile as on the GPU recipe) whose loss falls."""
    data = prepare_shakespeare(ctx)
    iters = ctx.args.train_iters or ctx.size["train_iters"]
    start = time.perf_counter()
    run_dir = run_train(ctx, "shakespeare", run_overrides(ctx, data, iters, iters, compile_model=ctx.device == "cuda"))
    records = metrics(run_dir)
    first = next(r["loss"] for r in records if r.get("kind") == "train")
    final = [r["val_loss"] for r in records if r.get("kind") == "eval"][-1]
    result = {"iters": iters, "first_train_loss": round(first, 4), "final_val_loss": round(final, 4),
              "seconds": round(time.perf_counter() - start, 1)}
    if not first - final >= ctx.args.min_loss_drop:
        raise RuntimeError(f"the loss fell from {first:.4f} to a val loss of {final:.4f}, by less than "
                           f"--min-loss-drop={ctx.args.min_loss_drop}")
    return result


def synthetic_text(path: Path, chars: int = 200_000) -> Path:
    """A text of seeded pseudo-words: a dataset that needs no network, with some structure to learn."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    text, size = [], 0
    while size < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "\n"
        text.append(line)
        size += len(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(text))
    return path


def check_resume(ctx: Context) -> dict:
    """Save, SIGKILL, resume: a real nanogpt-train killed after a checkpoint and run again (resume=auto
    finds it) ends with the weights of a run that never stopped.

    The tolerance: on a CPU the project promises bit-identical weights, so it is 0. CUDA kernels are
    not bitwise deterministic (atomic adds in the embedding and attention backward, cuBLAS's
    split-K reductions) unless deterministic algorithms are on, and nanogpt-train does not force
    them (they cost speed): two runs that never stopped already differ. So on CUDA a second
    uninterrupted run measures that difference on this machine, and the resumed run may differ from
    the first by at most 3 times it, and at least --resume-rtol (relative L2 distance of all weights).
    A resume that loses its data position differs far more: 5.6e-3 at --size tiny on a CPU (tried by
    dropping the sampler's state in train.restore), where 0 is asked."""
    import torch

    from nanogpt.runs import checkpoint

    iters = ctx.args.resume_iters or ctx.size["resume_iters"]
    every = max(1, iters // 3)  # checkpoints at 1/3 and 2/3: the kill lands with a third of the run to go
    text = synthetic_text(ctx.work / "data" / "words.txt")
    data = ["data=text", f"data.source={text}", f"data.dir={ctx.work / 'data' / 'words'}"]
    args = [*run_overrides(ctx, data, iters, every, compile_model=False), "keep_checkpoints=5"]
    straight = run_train(ctx, "resume_straight", args)

    run_dir, log_file = ctx.work / "resume_killed", ctx.work / "resume_killed_first.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(train_command(*args, f"hydra.run.dir={run_dir}"), stdout=out, stderr=subprocess.STDOUT)
        step_file = run_dir / "checkpoints" / f"step-{every:08d}.pt"
        deadline = time.monotonic() + 600
        while not step_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before it could be killed after its first "
                               f"checkpoint: {last_line(log_file)}; raise --resume-iters")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not step_file.exists():
            raise RuntimeError(f"the run wrote no checkpoint of step {every} in 600 s (log: {log_file})")
    killed_at = max(r["step"] for r in metrics(run_dir)) if metrics(run_dir) else 0
    run_train(ctx, "resume_killed", args)  # the same command again, as a requeued job: resume=auto
    resumed_line = [line for line in (ctx.work / "resume_killed.log").read_text().splitlines() if "resuming from" in line]
    if not resumed_line:
        raise RuntimeError("the second run did not resume from the killed run's checkpoint")

    def weights(run: Path) -> torch.Tensor:  # every weight of the run's last checkpoint, checked against its checksum
        payload = checkpoint.load_verified(checkpoint.find_in_run_dir(run, "last"), mmap=False)
        if payload["step"] != iters:
            raise RuntimeError(f"{run}'s last checkpoint is of step {payload['step']}, not {iters}")
        return torch.cat([payload["model"][k].float().flatten() for k in sorted(payload["model"])])

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    reference, resumed = weights(straight), weights(run_dir)
    diff = distance(resumed, reference)
    result = {"iters": iters, "killed_after_step": killed_at, "resumed": resumed_line[0].split("resuming from ")[-1],
              "rel_l2_diff": diff, "max_abs_diff": float((resumed - reference).abs().max())}
    if ctx.device == "cpu":
        allowed = ctx.args.resume_rtol if ctx.args.resume_rtol is not None else 0.0
        result["tolerance"] = f"{allowed} (CPU: bit-identical promised)"
    else:
        noise = distance(weights(run_train(ctx, "resume_straight_again", args)), reference)
        floor = ctx.args.resume_rtol if ctx.args.resume_rtol is not None else 1e-4
        allowed = max(3 * noise, floor)
        result["noise_rel_l2"] = noise
        result["tolerance"] = f"{allowed:.3g} (max of 3 x two uninterrupted runs' {noise:.3g}, and {floor:g})"
    if not diff <= allowed:
        raise RuntimeError(f"the resumed run's weights differ from the uninterrupted run's by {diff:.3g} "
                           f"(relative L2), more than the {allowed:.3g} allowed")
    return result


TIE = 1e-4  # logits closer than this are a tie that float32 rounding may break either way


def check_kv_cache(ctx: Context) -> dict:
    """model.generate with the KV cache gives the tokens of the uncached path (greedy, float32, TF32
    off). The two paths run different kernels (one new token against the cache, or the whole
    context), so their logits differ by rounding, far below the gap between the likeliest tokens;
    where the paths part, the uncached logits there tell a rounding tie (within TIE) from a bug."""
    import torch

    from nanogpt.train import build_model

    config = compose("train", [*ctx.size["run_model"], "model.vocab_size=65", *ctx.hardware, "hardware.dtype=float32"])
    torch.manual_seed(0)
    model = build_model(config, {"vocab_size": 65}).to(ctx.device).eval()
    prompt = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    # past block_size, where the window slides and the cached path recomputes the window as the uncached one
    new_tokens = ctx.args.kv_tokens or ctx.size["kv_tokens"]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cached, full = (model.generate(prompt, new_tokens, temperature=0.0, use_cache=c) for c in (True, False))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    result = {"new_tokens": new_tokens, "rows": int(prompt.shape[0]), "equal": bool(torch.equal(cached, full))}
    if not result["equal"]:
        row, at = (int(i) for i in (cached != full).nonzero()[0])
        with torch.no_grad():
            logits, _ = model(full[row : row + 1, max(0, at - model.config.block_size) : at])
        gap = float(logits[0, -1, full[row, at]] - logits[0, -1, cached[row, at]])  # >= 0: full took the argmax
        if gap > TIE:
            raise RuntimeError(f"the cached path's tokens differ from the uncached path's at position {at} of row "
                               f"{row}, where the uncached logits prefer its token by {gap:.3g} (not a rounding tie)")
        result["tie"] = f"the paths part at a rounding tie, position {at} (logit gap {gap:.1e})"
    return result


@dataclass(frozen=True)
class OneRank(DistEnv):
    """A process group of one rank that takes the distributed code path: nanogpt-train runs one
    process without a group, so the DDP/FSDP2 wrapping, its collectives and the backend are only
    exercised with a group, and a group of one is what one GPU allows (nccl refuses two ranks on one GPU)."""

    @property
    def is_distributed(self) -> bool:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OneBatch:
    """The same batch again and again: a model that learns memorises it, so its loss must fall within
    a few steps (on fresh random tokens it cannot fall below log(vocab), where it starts)."""

    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return self.batch


def one_rank_steps(ctx: Context, fsdp: bool) -> dict:
    """A few optimizer steps of the run model in a one-rank process group, wrapped by DDP or FSDP2
    as build_training wraps it for several ranks."""
    import torch.distributed as dist

    from nanogpt.data.batches import RandomTokens
    from nanogpt.parallel import distributed
    from nanogpt.train import build_training, optimizer_step

    config = compose("bench", [*ctx.size["run_model"], "model.vocab_size=65", f"batch_size={ctx.size['run_batch_size']}",
                               "optim.lr=1e-3", *ctx.hardware, "hardware.dtype=auto", "hardware.compile=false",
                               f"hardware.fsdp={str(fsdp).lower()}", "hardware.peak_flops=1e12"])
    env = OneRank(master_port=free_port(), source="torchrun")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.master_addr, str(env.master_port)
    device = distributed.init_process_group(env, config.hardware.backend, ctx.device)
    try:
        t = build_training(config, {"vocab_size": 65}, env, device)
        batches = OneBatch(RandomTokens(65, config.block_size, config.batch_size, t.hw.device, t.data_rng).next_batch())
        batch, losses = batches.next_batch(), []
        for _ in range(10):
            step = optimizer_step(t, batches, batch, 2, config.optim.grad_clip, config.on_nonfinite)
            batch = step.next_batch
            losses.append(float(step.loss))
        wrapper = type(t.model).__name__
        backend = dist.get_backend()
    finally:
        distributed.destroy_process_group()
    if not losses[-1] < 0.9 * losses[0]:
        raise RuntimeError(f"the loss on one repeated batch did not fall by 10% in 10 steps: {losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"backend": backend, "processes": 1, "wrapper": wrapper, "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4)}


def check_ddp(ctx: Context) -> dict:
    """DDP: on 2+ GPUs, nanogpt-train hardware.nproc_per_node=2 (nccl between the GPUs); on one GPU
    (or a CPU) a one-rank group through the same wrapping, nccl on CUDA, gloo on a CPU."""
    if ctx.gpus < 2:
        return one_rank_steps(ctx, fsdp=False)
    text = synthetic_text(ctx.work / "data" / "words.txt")
    data = ["data=text", f"data.source={text}", f"data.dir={ctx.work / 'data' / 'words'}"]
    run_dir = run_train(ctx, "ddp", [*run_overrides(ctx, data, 50, 50, compile_model=False), "hardware.nproc_per_node=2",
                                     "eval_iters=10"])
    final = [r["val_loss"] for r in metrics(run_dir) if r.get("kind") == "eval"][-1]
    return {"backend": "nccl", "processes": 2, "final_val_loss": round(final, 4)}


def check_fsdp(ctx: Context) -> dict:
    """FSDP2 (hardware.fsdp=true) on one rank: fully_shard per block, DTensor grad norm, the steps."""
    return one_rank_steps(ctx, fsdp=True)


CHECKS = [
    Check("bench_compile", "GPT-2 124M, bf16 + torch.compile + fused AdamW", check_bench_compile),
    Check("bench_eager", "GPT-2 124M, bf16 + fused AdamW, no compile", check_bench_eager),
    Check("fp16_scaler", "fp16 + GradScaler, no skipped-step storm", check_fp16_scaler),
    Check("shakespeare", "shakespeare_char run: the loss falls", check_shakespeare),
    Check("resume", "save, SIGKILL, resume: the weights of an uninterrupted run", check_resume),
    Check("kv_cache", "KV-cache generation equals the uncached path", check_kv_cache),
    Check("ddp", "DDP (nccl on CUDA)", check_ddp),
    Check("fsdp", "FSDP2 on one process", check_fsdp),
]


# ---------------------------------------------------------------------------------------------
# the environment


def environment(device: str) -> dict:
    import torch

    from nanogpt.parallel import hardware

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
           "host": socket.gethostname(), "python": platform.python_version(), "nanogpt": __version__,
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        peak = hardware.gpu_peak_flops(props.name)
        env.update({
            "driver": nvidia_driver(), "cudnn": torch.backends.cudnn.version(), "gpus": torch.cuda.device_count(),
            "gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
            "peak_tflops": round(peak / 1e12, 1) if peak else "unknown (not in nanogpt/parallel/hardware.py's table)",
        })
    else:
        env.update({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "bf16": hardware.x86_has_native_bf16()})
    env["sdpa"] = sdpa_backends(device)
    return env


def nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def sdpa_backends(device: str) -> dict:
    """Each SDPA backend: whether a causal attention call runs through it here ("yes", or why not)."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, 4, 128, 64, device=device, dtype=dtype)
    found = {}
    for name, backend in [("flash", "FLASH_ATTENTION"), ("memory_efficient", "EFFICIENT_ATTENTION"),
                          ("math", "MATH"), ("cudnn", "CUDNN_ATTENTION")]:
        if not hasattr(SDPBackend, backend):
            found[name] = f"no: this torch has no SDPBackend.{backend}"
            continue
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    F.scaled_dot_product_attention(q, q, q, is_causal=True)
                found[name] = "yes"
            except RuntimeError as e:
                # torch says why a backend cannot run in its warnings; the error itself only says none could
                # ("... kernel not used because:", then one warning per reason)
                why = [str(w.message).strip().splitlines()[0] for w in said]
                why = [w for w in why if not w.endswith("because:")] or [str(e).strip().splitlines()[0]]
                found[name] = "no: " + "; ".join(why)[:240]
    return found


# ---------------------------------------------------------------------------------------------
# the report


def run_checks(ctx: Context, checks: list[Check], skip: set[str], echo: Callable[[str], None]) -> list[dict]:
    results = []
    for check in checks:
        start = time.perf_counter()
        entry = {"name": check.name, "title": check.title}
        if check.name in skip:
            entry.update(status="SKIP", reason="left out by --skip")
        else:
            try:
                entry.update(status="PASS", details=check.run(ctx))
            except Skip as e:
                entry.update(status="SKIP", reason=str(e))
            except Exception as e:  # every check runs whatever the others did: the report holds the error
                log.exception(f"check {check.name} failed")
                entry.update(status="FAIL", error=error_line(e))
            finally:
                cleanup_cuda()
        entry["seconds"] = round(time.perf_counter() - start, 1)
        results.append(entry)
        echo(f"{entry['status']:4}  {check.name:14} {summary(entry)}")
    return results


def error_line(e: BaseException) -> str:
    text = one_line(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e).strip()}"
    return text.splitlines()[0][:400] if text.strip() else type(e).__name__


def cleanup_cuda() -> None:
    """Free one check's GPU memory (and compiled graphs) before the next."""
    import torch

    from nanogpt.parallel import autobatch

    torch.compiler.reset()  # compiled graphs hold on to their model and its buffers
    autobatch.release_memory()


def summary(entry: dict) -> str:
    if entry["status"] == "SKIP":
        return entry["reason"]
    if entry["status"] == "FAIL":
        return entry["error"]
    d = entry["details"]
    if "mfu" in d:
        return f"{d['ms_per_iter']} ms/iter, {d['tokens_per_s']:,} tokens/s, MFU {100 * d['mfu']:.1f}% (of {d['peak_tflops']} peak{'' if isinstance(d['peak_tflops'], str) else ' TFLOP/s'})"
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def report_dir(root: Path) -> Path:
    """A new dir under root for this run's report: an earlier report is never overwritten."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"--out {root}: cannot make a report dir there ({e.strerror or e}): "
                            f"give a folder you can write to") from e
    raise UserError(f"--out {root}: could not make a new report dir in it")


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# nanogpt-gpu-check: {env.get('gpu', env['device'])}", "",
             f"{'PASSED' if report['passed'] else 'FAILED'}: {report['counts']['PASS']} passed, "
             f"{report['counts']['FAIL']} failed, {report['counts']['SKIP']} skipped ({report['seconds']:.0f} s)", "",
             "## Environment", "", "| key | value |", "| --- | --- |"]
    for key, value in env.items():
        if key == "sdpa":
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        lines.append(f"| {key} | {str(value).replace('|', '/')} |")
    lines += ["", "## Checks", "", "| check | result | details | seconds |", "| --- | --- | --- | --- |"]
    for c in report["checks"]:
        lines.append(f"| {c['name']}: {c['title']} | {c['status']} | {summary(c).replace('|', '/')} | {c['seconds']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="nanogpt-gpu-check",
        description="Run the CUDA path of nanogpt on this machine's GPU (bf16, compile, fused AdamW, fp16 + "
                    "GradScaler, a real run, kill and resume, KV cache, DDP, FSDP2) and write a report "
                    "(report.json, report.md). About 5-10 minutes on one GPU.",
        epilog="Have a GPU? Run it and send us the report.md (docs/gpu.md says what each check does).")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default); cpu runs the same code through the CPU at --size tiny (the report's test)")
    p.add_argument("--out", type=Path, default=Path("gpu_check"),
                   help="the reports' folder; each run writes into a new dated dir in it (default: ./gpu_check)")
    p.add_argument("--skip", default="", help=f"comma-separated checks to leave out: {', '.join(c.name for c in CHECKS)}")
    p.add_argument("--size", choices=sorted(SIZES), help="full: GPT-2 124M and nanoGPT's shakespeare_char model "
                   "(default on cuda); tiny: small models, few steps (default on cpu)")
    p.add_argument("--batch-size", type=int, help="the benchmarks' micro-batch (default: by GPU memory, 4-16)")
    p.add_argument("--bench-steps", type=int, help="timed steps of each benchmark (default: 20 full, 3 tiny)")
    p.add_argument("--fp16-steps", type=int, default=30, help="steps of the fp16 check (default 30)")
    p.add_argument("--fp16-max-skipped", type=int, default=3,
                   help="the GradScaler may skip at most this many steps while it finds its scale (default 3)")
    p.add_argument("--data-source", help="tiny Shakespeare's input.txt: a URL or a local file (default: "
                   "the shakespeare_char dataset's own URL)")
    p.add_argument("--train-iters", type=int, help="steps of the shakespeare_char run (default: 300 full, 60 tiny)")
    p.add_argument("--min-loss-drop", type=float,
                   help="the run's val loss must end this far below its first loss (default: 1.0 full, 0.3 tiny)")
    p.add_argument("--resume-iters", type=int, help="steps of each resume run (default: 150 full, 60 tiny)")
    p.add_argument("--resume-rtol", type=float, help="the resumed weights' relative L2 distance allowed at least "
                   "(default: 0 on cpu, exact; on cuda 1e-4, or 3x the measured run-to-run distance if larger)")
    p.add_argument("--kv-tokens", type=int, help="tokens generated by the KV-cache check")
    args = p.parse_args(argv)
    unknown = sorted(set(filter(None, args.skip.split(","))) - {c.name for c in CHECKS})
    if unknown:
        raise UserError(f"--skip {','.join(unknown)}: no such check; the checks are {', '.join(c.name for c in CHECKS)}")
    for key in ("batch_size", "bench_steps", "fp16_steps", "train_iters", "resume_iters", "kv_tokens"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}={getattr(args, key)} must be at least 1")
    if args.resume_iters is not None and args.resume_iters < 6:
        raise UserError(f"--resume-iters={args.resume_iters}: the run must be killed after a checkpoint at a third "
                        f"of it and resume: give at least 6")
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
    except UserError as e:
        exit_with_error(e)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"nanogpt-gpu-check: no CUDA GPU visible (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): nothing to check here; run it on a machine with an NVIDIA GPU")
        sys.exit(0)
    try:
        sys.exit(run(args))
    except UserError as e:
        exit_with_error(e)


def run(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    import torch

    size = dict(SIZES[args.size or ("full" if args.device == "cuda" else "tiny")])
    if args.min_loss_drop is None:
        args.min_loss_drop = size["min_loss_drop"]
    out = report_dir(args.out)
    work = out / "work"
    work.mkdir()
    # the library's log lines (model sizes, compile, benchmark lines) go to a file: the terminal shows the checks
    handler = logging.FileHandler(out / "check.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        ctx = Context(args, args.device, size, work, gpus=torch.cuda.device_count() if args.device == "cuda" else 0)
        env = environment(args.device)
        echo(f"nanogpt-gpu-check {__version__} on {env.get('gpu', 'cpu')} (torch {env['torch']}, CUDA {env['cuda']}, "
             f"driver {env.get('driver', '-')}); report in {out}")
        start = time.perf_counter()
        checks = run_checks(ctx, CHECKS, set(filter(None, args.skip.split(","))), echo)
    finally:
        root.removeHandler(handler)
        handler.close()
    counts = {s: sum(c["status"] == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
    report = {"schema": SCHEMA, "passed": counts["FAIL"] == 0, "counts": counts,
              "seconds": round(time.perf_counter() - start, 1), "command": " ".join(sys.argv),
              "environment": env, "checks": checks}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    echo(f"{'no check failed' if report['passed'] else str(counts['FAIL']) + ' check(s) FAILED'} "
         f"({counts['PASS']} passed, {counts['SKIP']} skipped): {out / 'report.md'}, {out / 'report.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    main()
