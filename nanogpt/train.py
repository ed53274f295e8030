"""nanogpt-train: train (or evaluate) a GPT from a composed Hydra config.

    nanogpt-train                                   # nanoGPT's CPU recipe on tiny Shakespeare
    nanogpt-train experiment=shakespeare_char       # a named recipe from experiments/
    nanogpt-train model=shakespeare_char optim.lr=3e-4 max_iters=500
    nanogpt-train --cfg job                         # print the composed config and exit

The loop is nanoGPT's: micro-steps under autocast with the loss scaled for accumulation, clip,
step, zero grads; evaluation every eval_interval steps and at the end; last.pt at each
evaluation and best.pt when the val loss improves.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from nanogpt.cli import config_dir, hydra_entrypoint, user_errors
from nanogpt.config import TrainConfig
from nanogpt.signals import StopRequest

if TYPE_CHECKING:
    import torch

    from nanogpt.hardware import Hardware
    from nanogpt.model import GPT

log = logging.getLogger("nanogpt")


def build_model(config: TrainConfig, data_meta: dict):
    """The GPT of the model group, from scratch or from init_from's weights."""
    from nanogpt import weights
    from nanogpt.model import GPT

    if config.init_from == "scratch":
        vocab_size = config.model.vocab_size or data_meta["vocab_size"]
        return GPT(replace(config.model, vocab_size=vocab_size))

    pretrained = weights.load(config.init_from)
    weights.check_matches(config.model, pretrained.model_config, config.init_from)
    weights.check_tokenizer(pretrained, data_meta, config.init_from, config.data.name)
    model = GPT(replace(pretrained.model_config, dropout=config.model.dropout))
    model.load_state_dict(pretrained.state_dict)
    if config.model.block_size < model.config.block_size:
        model.crop_block_size(config.model.block_size)
    log.info(f"initialised from {pretrained.source}")
    return model


@dataclass
class Training:
    """Everything a training loop (or a benchmark) steps: built by `build_training`."""

    hw: "Hardware"
    raw_model: "GPT"  # what we save and measure
    model: "torch.nn.Module"  # raw_model, or its torch.compile wrapper
    optimizer: "torch.optim.Optimizer"
    scaler: "torch.amp.GradScaler"
    data_rng: "torch.Generator"  # the stream every batch is drawn from


def build_training(config: TrainConfig, data_meta: dict) -> Training:
    """Device, model, optimizer, grad scaler and batch stream for a config."""
    import torch

    from nanogpt import hardware
    from nanogpt.optim import build_optimizer

    hw = hardware.resolve(config.hardware)
    torch.manual_seed(config.seed)
    raw_model = build_model(config, data_meta).to(hw.device)
    # Batches come from one stream, forked from the global RNG right after the model's init and
    # shared by training and evaluation draws: that is exactly the stream nanoGPT's get_batch
    # draws from, so with the same seed a run sees nanoGPT's batches and reproduces its numbers.
    # (As in nanoGPT, changing eval_interval or eval_iters therefore changes later batches.)
    data_rng = torch.Generator().set_state(torch.get_rng_state())
    optimizer = build_optimizer(raw_model, config.optim, hw.device_type)
    scaler = torch.amp.GradScaler(hw.device_type, enabled=hw.use_grad_scaler)
    model = raw_model
    if hw.compile:
        log.info("compiling the model (the first steps are slow)")
        model = torch.compile(raw_model)
    if hw.peak_flops is None:  # measured in the dtype the matmuls of training run in
        hw.peak_flops = hardware.measure_peak_flops(hw.device, hw.dtype)
    return Training(hw, raw_model, model, optimizer, scaler, data_rng)


def optimizer_step(t: Training, batches, batch, grad_accum: int, grad_clip: float):
    """One optimizer step: grad_accum micro-steps under autocast, clip, step, zero grads.
    Returns the mean loss (a tensor: reading it would sync the device) and the next batch."""
    import torch

    model, optimizer, scaler, hw = t.model, t.optimizer, t.scaler, t.hw
    x, y = batch
    loss_sum = 0.0
    for _ in range(grad_accum):
        with hw.autocast():
            _, loss = model(x, y)
            loss = loss / grad_accum  # the gradients of the micro-steps add up to the mean
        x, y = batches.next_batch()  # fetch the next batch while the device works
        scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, (x, y)


def train(config: TrainConfig, run_dir: Path, data_meta: dict, resolved_config: dict) -> dict:
    import torch

    from nanogpt import checkpoint
    from nanogpt.batches import RandomWindows
    from nanogpt.metrics import Metrics
    from nanogpt.optim import learning_rate

    t = build_training(config, data_meta)
    hw, raw_model, model, optimizer = t.hw, t.raw_model, t.model, t.optimizer

    data_dir = Path(config.data.dir)
    windows = dict(block_size=config.block_size, batch_size=config.batch_size, device=hw.device, generator=t.data_rng)
    train_batches = RandomWindows(data_dir / "train.bin", data_meta["dtype"], **windows)
    eval_batches = {
        "train": train_batches,
        "val": RandomWindows(data_dir / "val.bin", data_meta["dtype"], **windows),
    }

    tokens_per_step = config.batch_size * config.block_size * config.grad_accum
    log.info(
        f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters | data: {config.data.name} in {data_dir}, "
        f"vocab {raw_model.config.vocab_size} | {tokens_per_step:,} tokens per step "
        f"({config.batch_size} x {config.block_size} x {config.grad_accum}) | {hw.describe()}"
    )
    log.info(f"run dir: {run_dir}")

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        losses = {}
        for split, batches in eval_batches.items():
            total = torch.zeros((), device=hw.device)
            for _ in range(config.eval_iters):
                x, y = batches.next_batch()
                with hw.autocast():
                    _, loss = model(x, y)
                total += loss.float()
            losses[split] = total.item() / config.eval_iters
        model.train()
        return losses

    def save(step: int, best_val_loss: float, improved: bool) -> None:
        last = run_dir / "checkpoints" / "last.pt"
        checkpoint.save(checkpoint.training_payload(t, step, best_val_loss, data_meta, resolved_config), last)
        if improved:
            checkpoint.link_as(last, run_dir / "checkpoints" / "best.pt")

    metrics = Metrics(run_dir, config.logger, resolved_config)
    # plain locals for the hot path: no config lookups or recomputation between log lines
    max_iters, grad_accum, log_interval = config.max_iters, config.grad_accum, config.log_interval
    eval_interval, eval_only, grad_clip, optim_cfg = config.eval_interval, config.eval_only, config.optim.grad_clip, config.optim
    flops_per_step = raw_model.flops_per_token(config.block_size) * tokens_per_step
    step, best_val_loss, last_eval, saved, stopped_by = 0, float("inf"), {}, False, None
    batch = train_batches.next_batch()
    t_last, steps_since_log = time.perf_counter(), 0
    with StopRequest() as stop:  # a signal only asks; the loop stops at the next step boundary
        try:
            while True:
                if step % eval_interval == 0 or step == max_iters or eval_only:
                    last_eval = evaluate()
                    metrics.log(step, "eval", train_loss=last_eval["train"], val_loss=last_eval["val"])
                    log.info(f"step {step}: train loss {last_eval['train']:.4f}, val loss {last_eval['val']:.4f}")
                    # the initial weights (step 0) are not ours to save: "best" ranks the trained ones
                    if step > 0 and not eval_only:
                        improved = last_eval["val"] < best_val_loss
                        best_val_loss = min(best_val_loss, last_eval["val"])
                        if config.save_checkpoints:
                            save(step, best_val_loss, improved)
                            saved = True
                    t_last, steps_since_log = time.perf_counter(), 0  # evaluation time is not training time
                if step >= max_iters or eval_only:
                    break

                lr = learning_rate(step, optim_cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, batch = optimizer_step(t, train_batches, batch, grad_accum, grad_clip)
                step += 1
                steps_since_log += 1

                if step % log_interval == 0 or step == max_iters:
                    train_loss = float(loss_sum)  # the only host sync of a training step, every log_interval
                    now = time.perf_counter()
                    dt = (now - t_last) / steps_since_log
                    t_last, steps_since_log = now, 0
                    mfu = flops_per_step / dt / hw.peak_flops
                    metrics.log(step, "train", loss=train_loss, lr=lr, ms_per_iter=dt * 1e3,
                                tokens_per_s=tokens_per_step / dt, mfu=mfu)
                    log.info(
                        f"iter {step}: loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1e3:.1f} ms/iter, "
                        f"{tokens_per_step / dt:,.0f} tok/s, mfu {mfu * 100:.2f}%"
                    )
                if stop.signal is not None and step < max_iters:  # keep this step's weights, then leave
                    stopped_by = stop.signal
                    if config.save_checkpoints:
                        save(step, best_val_loss, improved=False)
                    where = f"; checkpoint in {run_dir / 'checkpoints' / 'last.pt'}" if config.save_checkpoints else ""
                    log.info(f"stopped by {stopped_by.name} after step {step}{where}")
                    break
        finally:
            metrics.close()

    result = {"step": step, "stopped_by": stopped_by, **{f"{k}_loss": v for k, v in last_eval.items()}}
    if stopped_by is None and step > 0 and not eval_only:
        result["best_val_loss"] = best_val_loss
        where = f"; checkpoints in {run_dir / 'checkpoints'}" if saved else ""
        log.info(f"done: {step} steps, best val loss {best_val_loss:.4f}{where}")
    return result


def interrupted(exc: BaseException | None) -> bool:
    """Did a second Ctrl-C end the run? It may surface as another error: interrupting torch.save
    makes its zip writer raise a RuntimeError, with the KeyboardInterrupt as its context."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from nanogpt.preflight import check_data_and_vocab, to_train_config

    from nanogpt.provenance import RunRecord

    with user_errors():
        config = to_train_config(cfg)
        data_meta = check_data_and_vocab(config)  # done before the run dir was made; cheap now
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        record = RunRecord(run_dir, config.seed, OmegaConf.to_yaml(resolved))
        try:
            result = train(config, run_dir, data_meta, resolved)
        except BaseException as e:
            record.finish("preempted" if interrupted(e) else "failed")
            raise
        if result["stopped_by"] is not None:  # stopped cleanly at a step boundary, with a checkpoint
            record.finish("preempted")
            sys.exit(128 + int(result["stopped_by"]))
        record.finish("done")
        return result


main = hydra_entrypoint(_main)

if __name__ == "__main__":
    main()
