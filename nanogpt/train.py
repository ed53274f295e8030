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

import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import hydra
from omegaconf import DictConfig, OmegaConf

from nanogpt.cli import hydra_entrypoint
from nanogpt.config import AUTO, NonFinite, TrainConfig, check_world_size, config_dir
from nanogpt.errors import UserError, user_errors
from nanogpt.evals.in_training import TaskEvaluation
from nanogpt.parallel import autobatch, distributed, launch
from nanogpt.parallel.distributed import DistEnv
from nanogpt.runs import from_nanogpt, trial
from nanogpt.runs.failures import as_user_error, interrupted, last_checkpoint_words
from nanogpt.runs.metrics import Metrics, NoMetrics
from nanogpt.runs.preflight import check_data_and_vocab, to_train_config
from nanogpt.runs.provenance import RunRecord
from nanogpt.runs.resume import foreign_checkpoint, plan_run, refuse_changes, refuse_overwrite
from nanogpt.runs.runfiles import drop_failing_log_files
from nanogpt.runs.signals import StopRequest, hand_over
from nanogpt.runs.startup import clock

if TYPE_CHECKING:
    import torch

    from nanogpt.model import GPT
    from nanogpt.parallel.hardware import Hardware

log = logging.getLogger("nanogpt")


def build_model(config: TrainConfig, data_meta: dict):
    """The GPT of the model group, from scratch or from init_from's weights."""
    from nanogpt.model import GPT
    from nanogpt.runs import weights

    if config.init_from == "scratch":
        vocab_size = config.model.vocab_size or data_meta["vocab_size"]
        return GPT(replace(config.model, vocab_size=vocab_size))

    pretrained = weights.load(config.init_from)
    weights.check_matches(config.model, pretrained.model_config, config.init_from)
    weights.check_tokenizer(pretrained, data_meta, config.init_from, config.data.name)
    model = GPT(replace(pretrained.model_config, dropout=config.model.dropout))
    weights.load_into(model, pretrained.state_dict, pretrained.source)
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
    data_rng: "torch.Generator"  # the stream every batch is drawn from (the same on every rank; see build_training)
    env: DistEnv = DistEnv()  # this process's rank in the run
    fsdp: bool = False  # raw_model is sharded across the ranks (FSDP2)


def build_training(config: TrainConfig, data_meta: dict, env: DistEnv = DistEnv(), device: str | None = None) -> Training:
    """Device, model, optimizer, grad scaler and batch stream for a config. With several
    processes, `device` is this rank's (from distributed.init_process_group) and the model is
    wrapped in DDP, or sharded by FSDP2 (hardware.fsdp)."""
    import torch

    from nanogpt.optim import build_optimizer
    from nanogpt.parallel import hardware, sharding

    hw = hardware.resolve(config.hardware)
    if device is not None:
        hw.device = device
    torch.manual_seed(config.seed)  # the same on every rank: the same initial weights
    raw_model = build_model(config, data_meta).to(hw.device)
    # Batches (training and evaluation draws alike) come from one stream that starts where the
    # model's init left the global RNG: the stream nanoGPT's get_batch draws from, so with the same
    # seed a run sees nanoGPT's batches. (As in nanoGPT, changing eval_interval or eval_iters
    # therefore changes later batches.) One process draws from the global CPU generator itself,
    # as nanoGPT does: on a CPU, dropout draws from it too, between the batches, and only this
    # order gives nanoGPT's dropout masks. Several processes share a copy of it, the same on
    # every rank, while each rank draws its own dropout masks.
    if env.is_distributed:
        data_rng = torch.Generator().set_state(torch.get_rng_state())
        torch.manual_seed(config.seed + env.rank)
    else:
        data_rng = torch.default_generator
    fsdp = env.is_distributed and config.hardware.fsdp
    if fsdp:  # in place, before the optimizer sees the parameters: it must hold only this rank's shards
        sharding.wrap(raw_model, hw.device, env, fsdp=True)
    optimizer = build_optimizer(raw_model, config.optim, hw.device_type)
    scaler = torch.amp.GradScaler(hw.device_type, enabled=hw.use_grad_scaler)
    model = raw_model
    if hw.compile:
        log.info("compiling the model (the first steps are slow)")
        model = torch.compile(raw_model)
    if env.is_distributed and not fsdp:
        model = sharding.wrap(model, hw.device, env, fsdp=False)
    if hw.peak_flops is None:  # measured in the dtype the matmuls of training run in
        hw.peak_flops = hardware.measured_peak_flops(hw.device, hw.dtype)
    return Training(hw, raw_model, model, optimizer, scaler, data_rng, env, fsdp)


class NonFiniteStep(UserError):
    """A step's loss or gradient was NaN or inf, and on_nonfinite=stop."""


class Step(NamedTuple):
    loss: "torch.Tensor"  # this rank's mean loss over the step's micro-steps (reading it syncs)
    grad_norm: "torch.Tensor"  # of the (all-reduced) gradients, before clipping
    next_batch: tuple  # the first batch of the next step, drawn ahead
    applied: bool  # False: skipped (non-finite loss or gradient)
    stop: bool  # some rank was asked to stop (a signal): all ranks stop after this step
    train_seconds: float | None = None  # the largest train_seconds given by any rank (the one all ranks go by)


def optimizer_step(t: Training, batches, batch, grad_accum: int, grad_clip: float, on_nonfinite=NonFinite.stop,
                   stop_requested: bool = False, train_seconds: float | None = None) -> Step:
    """One optimizer step: grad_accum micro-steps under autocast, clip, step, zero grads. With
    DDP the gradients are all-reduced on the last micro-step only. train_seconds: this rank's
    training time so far; the ranks agree on the largest (Step.train_seconds), so that a time
    budget ends them all at the same step and sets the same lr on each.

    A step whose loss or gradient is not finite is not applied: it raises NonFiniteStep
    (on_nonfinite=stop), or is skipped (skip), as fp16's grad scaler skips an overflowing step.
    Under fp16 an overflowing gradient is the scaler's to handle: skipped, never a stop."""
    import torch

    from nanogpt.parallel import sharding

    model, optimizer, scaler, hw = t.model, t.optimizer, t.scaler, t.hw
    ddp = t.env.is_distributed
    x, y = batch
    loss_sum = 0.0
    for micro_step in range(grad_accum):
        if ddp:  # reduce the gradients once, after the last micro-step's backward
            sharding.set_gradient_sync(model, micro_step == grad_accum - 1)
        with hw.autocast():
            _, loss = model(x, y)
            loss = loss / grad_accum  # the gradients of the micro-steps add up to the mean
        x, y = batches.next_batch()  # fetch the next batch while the device works
        scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
    scaler.unscale_(optimizer)  # a no-op unless fp16's scaler is on
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    grad_norm = sharding.local(grad_norm)
    # the one host sync of a step: whether to apply it must be known before it is applied, and
    # with several ranks they all decide alike (one tiny all-reduce: the minimum of each flag,
    # with the stop request among them)
    flags = torch.stack([loss_sum.isfinite(), grad_norm.isfinite()]).float()
    if ddp:
        import torch.distributed as dist

        # (the minimum of minus the time is the longest time)
        flags = torch.cat([flags, flags.new_tensor([float(not stop_requested), -(train_seconds or 0.0)])])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        loss_ok, grad_ok, go_on, minus_seconds = flags.tolist()
        if train_seconds is not None:
            train_seconds = -minus_seconds
    else:
        loss_ok, grad_ok = flags.tolist()
        go_on = not stop_requested
    loss_ok, grad_ok, go_on = bool(loss_ok), bool(grad_ok), bool(go_on)
    if not loss_ok or (not grad_ok and not scaler.is_enabled()):  # fp16 overflow is the scaler's to handle
        if on_nonfinite == NonFinite.stop:
            what = "loss" if not loss_ok else "gradient norm"
            raise NonFiniteStep(f"the {what} is {float(loss_sum if not loss_ok else grad_norm)}")
        applied = False
        if scaler.is_enabled():
            scaler.update()  # unscale_ saw the overflow: the next step tries a lower scale
    elif scaler.is_enabled():
        scaler.step(optimizer)  # the scaler skips it if the gradients overflowed (unscale_ saw it)
        scaler.update()
        applied = grad_ok
    else:
        optimizer.step()
        applied = True
    optimizer.zero_grad(set_to_none=True)
    return Step(loss_sum, grad_norm, (x, y), applied, not go_on, train_seconds)


def auto_batch_size(config: TrainConfig, data_meta: dict, env: DistEnv, device: str | None, resume_from: dict | None
                    ) -> int:
    """batch_size=auto: the micro-batch this run steps with, the same on every rank. A continued
    run keeps the one its checkpoint recorded (the micro-batch decides how the shared batch stream
    is drawn, so an exact resume needs it); a new run tries training steps (parallel/autobatch.py)."""
    recorded = ((resume_from or {}).get("resume") or {}).get("batch_size")
    if recorded is not None:
        if config.global_batch_size % (recorded * env.world_size):
            counts = [n for n in range(1, config.global_batch_size // recorded + 1)
                      if config.global_batch_size % (recorded * n) == 0]
            raise UserError(
                f"the run picked batch_size={recorded} at its start (batch_size=auto), and its global batch of "
                f"{config.global_batch_size} is not a whole number of micro-batches on {env.world_size} processes: "
                f"continue it on {', '.join(map(str, counts))} processes (it keeps its micro-batch, for its data order)")
        if env.is_main:
            log.info(f"batch_size=auto: {recorded} sequences per micro-step, as the run chose at its start")
        return recorded
    search, where = _search_micro_batch(config, data_meta, device, env.world_size,
                                        ddp=env.is_distributed and not config.hardware.fsdp)
    chosen = autobatch.agree(search.size, env)
    if chosen < 1:
        raise autobatch.nothing_fits(config, where)
    if env.is_main:
        accum = check_world_size(replace(config, batch_size=chosen), env.world_size)
        log.info(autobatch.describe(search, chosen, accum, config.global_batch_size, env.world_size))
    return chosen


def _search_micro_batch(config: TrainConfig, data_meta: dict, device: str | None, world_size: int, ddp: bool
                        ) -> tuple[autobatch.Search, str]:
    """The search on this process's GPU, with a model and optimizer of its own that are freed before
    the run builds its own (from the seed, as if no search had run). The steps are eager: compiled
    steps usually need less memory, so an eager fit fits compiled too, without compiling once per size."""
    import torch

    from nanogpt.data.batches import RandomTokens

    probe_config = replace(config, batch_size=1, hardware=replace(config.hardware, compile=False, peak_flops=1.0))
    t = build_training(probe_config, data_meta, DistEnv(), device)
    where = f"{t.hw.device} ({torch.cuda.get_device_name(t.hw.device)})" if t.hw.device_type == "cuda" else t.hw.device
    # DDP keeps a second copy of the gradients in its buckets: the trial steps run beside as much
    buckets = [torch.empty_like(p) for p in t.raw_model.parameters()] if ddp else []
    generator = torch.Generator().manual_seed(config.seed)

    def try_size(size: int) -> None:
        batches = RandomTokens(t.raw_model.config.vocab_size, config.block_size, size, t.hw.device, generator)
        optimizer_step(t, batches, batches.next_batch(), 1, config.optim.grad_clip, NonFinite.skip)

    def fresh_scaler() -> torch.amp.GradScaler:
        # fp16: a scale of 1 does not overflow, so the first trial step is applied and makes the
        # optimizer's state, which every later trial step must run beside (as the run's steps do)
        return torch.amp.GradScaler(t.hw.device_type, init_scale=1.0, enabled=t.hw.use_grad_scaler)

    def after_oom() -> None:  # a step cut short leaves gradients, and perhaps the scaler's unscale_, half done
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler = fresh_scaler()

    t.scaler = fresh_scaler()

    search = autobatch.largest_fitting(try_size, autobatch.candidate_sizes(config.global_batch_size, world_size),
                                       after_oom)
    del t, buckets, try_size, after_oom
    autobatch.release_memory()
    return search, where


@dataclass
class Progress:
    """Where a run is: saved in each checkpoint, restored on resume."""

    step: int = 0  # optimizer steps done (skipped ones included: the schedule moves on)
    best_val_loss: float = float("inf")
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    evaluated: bool = False  # the evaluation of this step ran (a resumed run does not repeat it)
    train_seconds: float = 0.0  # training time so far, over all starts: what max_time counts (runs/budgets.py)
    warmup_seconds: float | None = None  # train_seconds when the warmup ended: a time budget's decay starts there
    decay_iters: int | None = None  # the schedule's horizon that a token or FLOP budget set at the run's start
    decay_seconds: float | None = None  # the max_time that the schedule's decay followed from the run's start
    target: dict | None = None  # where val loss first reached target_val_loss: step, tokens, flops, train_seconds
    mlflow_run_id: str | None = None  # the MLflow run it logs to (runs/loggers.py), as wandb_run_id


# what a checkpoint keeps of a budget's progress (a checkpoint from before budgets has none: the defaults)
BUDGET_PROGRESS = ("train_seconds", "warmup_seconds", "decay_iters", "decay_seconds", "target")


def checkpoint_payload(t: Training, progress: Progress, model_state: dict, optimizer_state: dict, train_batches,
                       rng_states: list, global_batch: int, data_meta: dict, resolved_config: dict,
                       batch_size: int) -> dict:
    """What a checkpoint of a training run holds (see nanogpt/runs/checkpoint.py)."""
    from nanogpt.runs import checkpoint

    return {
        "model": model_state,
        "model_config": checkpoint.model_config_to_dict(t.raw_model.config),
        "optimizer": optimizer_state,
        "scaler": t.scaler.state_dict(),
        "step": progress.step,
        "best_val_loss": progress.best_val_loss,
        "data_meta": data_meta,
        "config": json.dumps(resolved_config, default=str),
        "resume": {  # what an exact resume needs besides the above
            "hardware": {"device_type": t.hw.device_type, "dtype": str(t.hw.dtype)},
            "evaluated": progress.evaluated,
            "rng": rng_states,  # one per rank
            # the shared stream, and the global batch drawn ahead of it (its first micro-batch is in flight)
            "data": train_batches.state_dict(include_last=True),
            "global_batch_size": global_batch,
            "batch_size": batch_size,  # the micro-batch, which batch_size=auto chose: a continued run keeps it
            "skipped_steps": progress.skipped_steps,
            "wandb_run_id": progress.wandb_run_id,
            "mlflow_run_id": progress.mlflow_run_id,
            **{key: getattr(progress, key) for key in BUDGET_PROGRESS},
        },
    }


def restore(t: Training, payload: dict, data_meta: dict, train_batches, global_batch: int) -> tuple[Progress, dict]:
    """Put a checkpoint's state back into t and the sampler. Returns the progress and this rank's
    RNG states (for `rng.restore` right before the loop: nothing may draw between it and the loop)."""
    state = payload["resume"]
    if state["global_batch_size"] != global_batch:
        raise UserError(
            f"the run trained with a global batch of {state['global_batch_size']} sequences and this start would use "
            f"{global_batch}: set global_batch_size={state['global_batch_size']} (with the run's batch_size, any "
            f"number of processes that divides it continues the same data order)"
        )
    then, now = state["hardware"], {"device_type": t.hw.device_type, "dtype": str(t.hw.dtype)}
    if then != now:  # another device or dtype would not continue the same run
        raise UserError(
            f"the run trained on {then['device_type']} in {then['dtype']} and this one would run on "
            f"{now['device_type']} in {now['dtype']}: continue it on the same hardware (set hardware.device and "
            f"hardware.dtype), or start a new run with init_from=<run dir>"
        )
    from nanogpt.data.datasets import check_same_data

    check_same_data(payload.get("data_meta") or {}, data_meta)
    from nanogpt.parallel import sharding

    sharding.load_state_dicts(t.raw_model, t.optimizer, payload["model"], payload["optimizer"], t.fsdp, t.env.is_main)
    t.scaler.load_state_dict(payload["scaler"])
    train_batches.load_state_dict(state["data"])  # the generator it shares with evaluation, too
    progress = Progress(payload["step"], payload["best_val_loss"], state["skipped_steps"], state["wandb_run_id"],
                        state["evaluated"], **{key: state[key] for key in BUDGET_PROGRESS if key in state},
                        mlflow_run_id=state.get("mlflow_run_id"))  # checkpoints from before MLflow lack it
    rng_states = state["rng"]
    if len(rng_states) != t.env.world_size:
        # one process on a CPU draws its dropout masks from the batches' stream, several do not (build_training)
        same_batches = t.raw_model.config.dropout == 0 or t.hw.device_type != "cpu"
        data = ("the data order continues exactly" if same_batches else
                "the data stream continues, but with dropout on a CPU one process draws its masks from it and "
                "several do not, so the later batches differ")
        log.info(f"the checkpoint holds the RNG states of {len(rng_states)} processes and this run has "
                 f"{t.env.world_size}: {data}; dropout masks start anew")
        return progress, None
    return progress, rng_states[t.env.rank]


def all_finite(state_dict: dict) -> bool:
    import torch

    return bool(torch.stack([v.isfinite().all() for v in state_dict.values() if v.is_floating_point()]).all())


def train(config: TrainConfig, run_dir: Path, data_meta: dict, resolved_config: dict, resume_from: dict | None = None,
          env: DistEnv = DistEnv(), device: str | None = None, on_eval: trial.OnEval | None = None) -> dict:
    """Train (or continue, from resume_from's checkpoint) and return the final step and losses.
    With several processes every rank runs this; only rank 0 writes metrics and checkpoints.
    on_eval(step, val_loss) hears each evaluation after step 0 but the last (a search's trial):
    when it returns True the run ends at that step, with a checkpoint, as "pruned".

    From its first line a stop signal only asks: the loop stops at its next step boundary, also
    when the signal came during start-up (model, optimizer, first evaluation), and says so."""
    with StopRequest() as stop:
        return _train(config, run_dir, data_meta, resolved_config, resume_from, env, device, stop, on_eval)


def train_reading_checkpoint(config: TrainConfig, run_dir: Path, data_meta: dict, resolved_config: dict,
                             resume_path: str | None, env: DistEnv, device: str) -> dict:
    """train(), in a worker that nanogpt-train started (hardware.nproc_per_node > 1): the worker
    reads the checkpoint it resumes from itself, so that its tensors need not cross processes."""
    from nanogpt.runs import checkpoint

    resume_from = checkpoint.load_file(resume_path, mmap=False) if resume_path else None
    return train(config, run_dir, data_meta, resolved_config, resume_from, env, device)


def _train(config: TrainConfig, run_dir: Path, data_meta: dict, resolved_config: dict, resume_from: dict | None,
           env: DistEnv, device: str | None, stop: StopRequest, on_eval: trial.OnEval | None = None) -> dict:
    import torch

    from nanogpt.data.batches import RandomWindows
    from nanogpt.optim import learning_rate_by_time, schedule_warnings, set_learning_rate
    from nanogpt.parallel import hardware, sharding
    from nanogpt.runs import budgets, rng
    from nanogpt.runs.checkpoint import CheckpointDir

    clock.mark("run dir" if clock.phases else "interpreter, config and run dir")
    if config.batch_size == AUTO:
        config = replace(config, batch_size=auto_batch_size(config, data_meta, env, device, resume_from))
    accum = check_world_size(config, env.world_size)
    global_batch = config.batch_size * env.world_size * accum
    t = build_training(config, data_meta, env, device)
    clock.mark("model and optimizer")
    hw, raw_model, model, optimizer = t.hw, t.raw_model, t.model, t.optimizer

    data_dir = Path(config.data.dir)
    windows = dict(block_size=config.block_size, batch_size=config.batch_size, device=hw.device, generator=t.data_rng,
                   rank=env.rank, world_size=env.world_size)
    # training draws each global batch at once; evaluation draws one batch per process at a time,
    # from the same stream (as nanoGPT's get_batch), with its own samplers so that it never takes
    # the training batches drawn ahead
    train_batches = RandomWindows(data_dir / "train.bin", data_meta["dtype"], draw_size=global_batch, **windows)
    eval_batches = {split: RandomWindows(data_dir / f"{split}.bin", data_meta["dtype"], **windows) for split in ("train", "val")}
    progress, rng_state = Progress(), None
    if resume_from is not None and from_nanogpt.is_checkpoint(resume_from):  # as nanoGPT's own resume
        progress = Progress(*from_nanogpt.restore(t, resume_from, data_meta, config))
    elif resume_from is not None:
        progress, rng_state = restore(t, resume_from, data_meta, train_batches, global_batch)
    start_step = progress.step

    tokens_per_step = global_batch * config.block_size
    flops_per_token = raw_model.flops_per_token(config.block_size)
    budget = budgets.resolve(config, tokens_per_step, flops_per_token)
    optim_cfg = config.optim
    if budget.decay_follows and start_step == 0:  # the horizon is set at the start, and kept on resume
        if budget.by_time:
            progress.decay_seconds = budget.max_seconds
        elif budget.name != "max_iters":
            progress.decay_iters = budget.max_steps
    if progress.decay_iters is not None:
        optim_cfg = replace(optim_cfg, decay_iters=progress.decay_iters)
    if env.is_main and budget.name != "max_iters":
        log.info(budget.describe(config, tokens_per_step, flops_per_token))
    # once, in the run's log, before training; not again when the run continues: it keeps the
    # schedule it started with (and, extended past its decay, goes on at min_lr by design)
    if env.is_main and not config.eval_only and resume_from is None and not budget.by_time:
        length = (None if budget.name == "max_iters" else
                  f"{budget.max_steps} steps, from {budget.name}={getattr(config, budget.name):g}")
        for warning in schedule_warnings(optim_cfg, budget.max_steps, length):
            log.warning(warning)
    log.info(
        f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters | data: {config.data.name} in {data_dir}, "
        f"vocab {raw_model.config.vocab_size} | {tokens_per_step:,} tokens per step ({config.batch_size} x "
        f"{config.block_size} x {accum} micro-steps x {env.world_size} processes) | {hw.describe()}"
    )
    log.info(f"run dir: {run_dir}")

    def all_ranks_sum(value: "torch.Tensor") -> "torch.Tensor":
        if env.is_distributed:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        return value

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        """Mean loss of eval_iters batches per split: each rank evaluates its share."""
        model.eval()
        losses = {}
        for split, batches in eval_batches.items():
            total = torch.zeros((), device=hw.device)
            for _ in range(config.eval_iters // env.world_size):
                x, y = batches.next_batch()
                with hw.autocast():
                    _, loss = model(x, y)
                total += loss.float()
            losses[split] = all_ranks_sum(total).item() / config.eval_iters
        model.train()
        return losses

    checkpoints = CheckpointDir(run_dir / "checkpoints", config.keep_checkpoints)

    def save(improved: bool) -> None:
        rng_states = distributed.gather_to_all(rng.capture(hw.device), env)  # every rank takes part
        model_state, optimizer_state = sharding.full_state_dicts(raw_model, optimizer, t.fsdp)  # so here (FSDP2)
        failure = None
        if env.is_main:
            try:
                if not all_finite(model_state):  # never write NaN weights over a good checkpoint
                    raise NonFiniteStep(f"the weights are not finite at step {progress.step}; nothing was saved")
                payload = checkpoint_payload(t, progress, model_state, optimizer_state, train_batches, rng_states,
                                             global_batch, data_meta, resolved_config, config.batch_size)
                checkpoints.save(payload, progress.step, improved)
            except Exception as e:
                failure = e
        # only rank 0 writes: the others learn whether it could, instead of waiting for it forever
        if distributed.gather_to_all(failure is None, env) != [True] * env.world_size:
            if failure is not None:
                raise failure
            raise UserError(f"rank 0 could not save the checkpoint of step {progress.step}: see {run_dir / 'train.log'}")

    if env.is_main:
        metrics = Metrics(run_dir, config.logger, resolved_config,
                          resumed_at=start_step if resume_from is not None else None, wandb_run_id=progress.wandb_run_id,
                          mlflow_run_id=progress.mlflow_run_id)
        progress.wandb_run_id, progress.mlflow_run_id = metrics.wandb_run_id, metrics.mlflow_run_id
    else:
        metrics = NoMetrics()
    tasks = TaskEvaluation(config, raw_model, data_meta, hw.device, hw.autocast, env.is_main)  # eval_tasks (lm-eval)
    batch = train_batches.next_batch()
    if rng_state is not None:
        rng.restore(rng_state, hw.device)
    # plain locals for the hot path: no config lookups or recomputation between log lines
    log_interval, eval_interval, eval_only = config.log_interval, config.eval_interval, config.eval_only
    grad_clip = config.optim.grad_clip
    on_nonfinite, target = config.on_nonfinite, config.target_val_loss
    mfu_of = hardware.MFU(hw, raw_model, config.block_size)
    last_eval, stopped_by, stop_agreed = {}, None, False
    saved_step = start_step if resume_from is not None else None  # the step of the newest checkpoint
    ddp = env.is_distributed
    # the step the run ends at: the budget's (under max_time: the step at which the time is spent)
    end_step = budget.max_steps if budget.max_steps is not None else float("inf")
    if (budget.by_time and progress.train_seconds >= budget.max_seconds) or (config.stop_at_target and progress.target):
        end_step = progress.step  # a continued run that had already spent its budget or met its target
    ended_by = "target" if config.stop_at_target and progress.target else budget.name
    seconds = progress.train_seconds  # this rank's count (progress.train_seconds: the one the ranks agreed on)

    def spent(step: int) -> dict:
        """How much of each budget a run has spent after `step` steps, as metrics records carry it."""
        tokens = step * tokens_per_step
        return {"tokens": tokens, "flops": tokens * flops_per_token, "train_seconds": round(progress.train_seconds, 3)}

    t_last, steps_since_log = time.perf_counter(), 0
    try:
        while True:
            step = progress.step
            if (step % eval_interval == 0 or step == end_step or eval_only) and not progress.evaluated:
                last_eval = evaluate()
                progress.evaluated = True
                reached = (target is not None and progress.target is None and last_eval["val"] <= target
                           and not eval_only)
                if reached:  # time to target: recorded once, kept by checkpoints
                    progress.target = {"step": step, **spent(step)}
                metrics.log(step, "eval", train_loss=last_eval["train"], val_loss=last_eval["val"], **spent(step),
                            **({"reached_target": True} if reached else {}),
                            **tasks.at(step, last=step == end_step or eval_only))
                log.info(f"step {step}: train loss {last_eval['train']:.4f}, val loss {last_eval['val']:.4f}")
                if reached:
                    log.info(f"val loss reached target_val_loss={target:g} at step {step}: "
                             f"{progress.target['tokens']:,} tokens, {progress.target['flops']:.3g} FLOPs, "
                             f"{progress.train_seconds:.1f} s of training")
                    if config.stop_at_target:
                        end_step, ended_by = step, "target"
                if on_eval is not None and 0 < step < end_step and not eval_only and on_eval(step, last_eval["val"]):
                    end_step, ended_by = step, "pruned"  # the search's pruner: end here, saved below
                    log.info(f"pruned at step {step}: the search's pruner ended this trial")
                # the initial weights (step 0) are not ours to save: "best" ranks the trained ones
                if step > 0 and not eval_only:
                    improved = last_eval["val"] < progress.best_val_loss
                    progress.best_val_loss = min(progress.best_val_loss, last_eval["val"])
                    if config.save_checkpoints:
                        save(improved)
                        saved_step = step
                t_last, steps_since_log = time.perf_counter(), 0  # evaluation time is not training time
            if step >= end_step or eval_only:
                break
            # a single process may stop at once; several stop together, after the step that agreed on it
            if stop_agreed or (stop.signal is not None and not env.is_distributed):
                stopped_by = stop.signal or signal.SIGTERM  # another rank was signalled
                if step == start_step:  # the signal came during start-up: a requeue would not get further
                    clock.mark("first evaluation")
                    log.warning(
                        f"stopped by {stopped_by.name} before this start trained a step (start-up: {clock.describe()}): "
                        f"a job requeued now starts over from step {step}; give it more time before its warning "
                        f"signal (a longer time limit; docs/sweeps.md, 'Time limits and start-up')")
                if config.save_checkpoints and saved_step != step:
                    save(improved=False)
                    saved_step = step
                where = f"; checkpoint in {checkpoints.path / 'last.pt'}" if saved_step == step else ""
                log.info(f"stopped by {stopped_by.name} after step {step}{where}")
                break

            if step == start_step:
                clock.mark("first evaluation")
                log.info(f"start-up: {clock.describe()}; training starts")
            if progress.warmup_seconds is None and step >= optim_cfg.warmup_iters:
                progress.warmup_seconds = progress.train_seconds
            if progress.decay_seconds is not None:  # a time budget: the decay follows the time spent
                warmup_seconds = progress.warmup_seconds or 0.0  # None while the warmup runs, when it is not used
                spent_fraction = progress.train_seconds / progress.decay_seconds
                lr = set_learning_rate(optimizer, step, optim_cfg, learning_rate_by_time(
                    step, spent_fraction, warmup_seconds / progress.decay_seconds, optim_cfg))
            else:
                lr = set_learning_rate(optimizer, step, optim_cfg)
            t_step = time.perf_counter()
            try:
                result = optimizer_step(t, train_batches, batch, accum, grad_clip, on_nonfinite, stop.signal is not None,
                                        train_seconds=seconds if ddp else None)
            except NonFiniteStep as e:
                last = f"the last checkpoint is step {saved_step}" if saved_step is not None else "no checkpoint was saved"
                raise NonFiniteStep(
                    f"step {step + 1}: {e} (the step was not applied; {last}): lower optim.lr or raise "
                    f"optim.warmup_iters, or set on_nonfinite=skip to skip such steps"
                ) from None
            seconds += time.perf_counter() - t_step  # the step has synced (optimizer_step reads its flags)
            # one process counts its own time; several go by the longest of their counts before this step
            progress.train_seconds = result.train_seconds if ddp else seconds
            batch, stop_agreed = result.next_batch, result.stop
            progress.step += 1
            progress.evaluated = False
            if budget.by_time and progress.train_seconds >= budget.max_seconds:
                end_step = progress.step  # evaluate, save and end here
            steps_since_log += 1
            if not result.applied:
                progress.skipped_steps += 1
                # fp16's scaler skips overflowing steps as a matter of course while it finds its scale
                (log.debug if t.scaler.is_enabled() else log.warning)(
                    f"step {progress.step}: non-finite loss or gradient, step skipped "
                    f"({progress.skipped_steps} skipped so far)")

            if progress.step % log_interval == 0 or progress.step == end_step:
                train_loss = float(all_ranks_sum(result.loss.clone())) / env.world_size
                dt = (time.perf_counter() - t_last) / steps_since_log
                mfu, mfu_capped = mfu_of(tokens_per_step / env.world_size / dt)  # per device, as its peak
                # after mfu_of, which may measure the peak again: that is not training time
                t_last, steps_since_log = time.perf_counter(), 0
                metrics.log(progress.step, "train", loss=train_loss, lr=lr, grad_norm=float(result.grad_norm),
                            skipped_steps=progress.skipped_steps, ms_per_iter=dt * 1e3,
                            tokens_per_s=tokens_per_step / dt, mfu=mfu, mfu_capped=mfu_capped, peak_flops=hw.peak_flops,
                            **spent(progress.step))
                log.info(
                    f"iter {progress.step}: loss {train_loss:.4f}, lr {lr:.2e}, {dt * 1e3:.1f} ms/iter, "
                    f"{tokens_per_step / dt:,.0f} tok/s, mfu {mfu * 100:.2f}%{' (capped)' if mfu_capped else ''}"
                )
    finally:  # the trackers mark their run as it ended (sys.exc_info: the exception on its way out, if any)
        metrics.close("failed" if sys.exc_info()[0] is not None else "stopped" if stopped_by is not None else "finished")

    result = {"step": progress.step, "stopped_by": stopped_by, "startup_seconds": clock.seconds(),
              "batch_size": config.batch_size, "grad_accum": accum, "train_seconds": round(progress.train_seconds, 3),
              "target": progress.target, **{f"{k}_loss": v for k, v in last_eval.items()}}
    if stopped_by is None and progress.step > 0 and not eval_only:
        result["best_val_loss"] = progress.best_val_loss
        result["ended_by"] = ended_by
        if progress.step == start_step:
            knob = "target_val_loss" if ended_by == "target" else ended_by
            log.info(f"nothing to do: the run already reached {knob}={getattr(config, knob)}")
        where = f"; checkpoints in {checkpoints.path}" if saved_step is not None else ""
        log.info(f"done: {progress.step} steps, best val loss {progress.best_val_loss:.4f}{where}")
    return result


def checkpoint_to_resume(config: TrainConfig, run_dir: Path, resolved: dict,
                         whole: bool = True) -> tuple[dict | None, Path | None]:
    """The newest good checkpoint of the run dir when the run continues (resume is not never);
    refuses it if the config changed in a way a continued run may not. whole=False maps the file
    instead of reading it (for a caller that only looks at its config and step)."""
    from nanogpt.runs.checkpoint import CheckpointDir

    checkpoints = CheckpointDir(run_dir / "checkpoints")
    for partial in checkpoints.remove_partial_writes():  # also of a save before the first checkpoint
        log.info(f"removed {partial.name}, left by a save that was interrupted")
    if not checkpoints.candidates():  # a fresh run dir, or one continuing a nanoGPT run that has not saved yet
        return from_nanogpt.checkpoint_to_resume(config)
    if config.resume == "never":
        refuse_overwrite(run_dir)
    payload, path = checkpoints.load_latest_good(mmap=not whole, belongs=lambda p: foreign_checkpoint(p, resolved))
    refuse_changes(json.loads(payload["config"]), resolved, run_dir)
    log.info(f"resuming from {path} (step {payload['step']})")
    return payload, path


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    drop_failing_log_files()  # a full disk: one warning, not a traceback per log line
    with user_errors():
        config = to_train_config(cfg)
        env = distributed.detect()
        world_size = distributed.planned_world_size(config.hardware)
        spawn = not env.is_distributed and world_size > 1
        check_world_size(config, world_size)
        data_meta = check_data_and_vocab(config)  # done before the run dir was made; cheap now
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        # a launcher that spawns workers only needs the checkpoint's config and step: each worker reads it whole
        resume_from, resume_path = checkpoint_to_resume(config, run_dir, resolved, whole=not spawn)
        record = None
        if env.is_main:
            record = RunRecord(
                run_dir, config.seed, resolved, world_size=world_size,
                resumed_from=None if resume_from is None else (resume_path, resume_from["step"]),
                reproduced_from=config.reproduce,
            )
        try:
            if spawn:
                del resume_from
                result = launch.run_processes(train_reading_checkpoint, config, run_dir, data_meta, resolved,
                                              None if resume_path is None else str(resume_path))
            elif env.is_distributed:  # one rank of torchrun or srun
                result = launch.train_as_rank(train, config, run_dir, data_meta, resolved, resume_from, env)
            else:
                result = train(config, run_dir, data_meta, resolved, resume_from, on_eval=trial.listener())
        except BaseException as e:
            stop_now = interrupted(e)
            if record:  # never in the way of the error itself: a full disk may refuse this write too
                record.finish_after_error("preempted" if stop_now else "failed")
            if stop_now:  # a second Ctrl-C: whatever it interrupted, a checkpoint is intact
                print(f"interrupted; {last_checkpoint_words(run_dir)}: continue with resume={run_dir}", file=sys.stderr)
                sys.exit(128 + signal.SIGINT)
            mapped = as_user_error(e, run_dir, config) if isinstance(e, Exception) else None
            if mapped is None or mapped is e:
                raise
            raise mapped from e
        startup = result.get("startup_seconds")  # None if the run was stopped before it measured it
        # this start's micro-batch and accumulation: what batch_size=auto chose, beside the config that says auto
        chosen = {k: result.get(k) for k in ("batch_size", "grad_accum")}
        if result["stopped_by"] is not None:  # stopped cleanly at a step boundary, with a checkpoint
            if record:
                record.finish("preempted", outcome={"target": result.get("target")}, startup_seconds=startup, **chosen)
            hand_over(result["stopped_by"])  # in a submitit job: requeue it (exits)
            sys.exit(128 + int(result["stopped_by"]))
        if record:  # a trial that a search's pruner ended is finished too, but not done
            status = "pruned" if result.get("ended_by") == "pruned" else "done"
            record.finish(status, outcome={k: result.get(k) for k in ("ended_by", "target", "train_seconds")},
                          startup_seconds=startup, **chosen)
        return result


def _plan_without_lock(cfg: DictConfig) -> None:
    """What `--cfg job` shows goes through the run's own planning (resume, reproduce, a run dir
    that holds a run), without taking the run dir's lock: a preview writes nothing."""
    plan_run(cfg, preview=True)


main = hydra_entrypoint(_main, "train", plan=_plan_without_lock, nanogpt_script="train")

if __name__ == "__main__":
    main()
