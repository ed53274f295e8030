"""The configs: the typed schema behind every file in conf/ and experiments/, where those files
are found, and how a composed config becomes its dataclass.

Hydra merges the YAML files onto these dataclasses, so a misspelled key or a value of the wrong
type fails at composition time with the key's full name. Rules that span several fields live in
`check_train_config`, which runs before any data is read or any model is built.

This module must stay cheap to import (no torch): `nanogpt-train --cfg job` goes through it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import II, MISSING, OmegaConf

from nanogpt.errors import ConfigError, one_line


class Activation(str, Enum):
    gelu = "gelu"  # exact (erf) GELU, as nanoGPT's nn.GELU()
    gelu_tanh = "gelu_tanh"  # tanh approximation, as OpenAI's GPT-2 and HF's "gelu_new"
    relu2 = "relu2"  # ReLU squared (So et al., Primer, 2021), as the NanoGPT speedrun


class Position(str, Enum):
    learned = "learned"  # a learned table of absolute positions, added to the token embedding (GPT-2)
    rotary = "rotary"  # rotary embeddings (Su et al., RoFormer, 2021) on queries and keys; no table


class Norm(str, Enum):
    layernorm = "layernorm"  # LayerNorm: centre and scale, with a gain (and a bias if model.bias)
    rmsnorm = "rmsnorm"  # RMSNorm: scale only, with a gain


class DataFormat(str, Enum):
    text = "text"  # one text (file, URL or glob), split into train/val by its tail
    hf = "hf"  # a HuggingFace dataset of documents with a `text` column
    documents = "documents"  # parquet/jsonl files of documents (local or hf://), streamed and resumable


class Schedule(str, Enum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr, then min_lr
    constant = "constant"  # linear warmup, then lr
    wsd = "wsd"  # warmup-stable-decay: linear warmup, lr, then a linear cooldown to min_lr at the end


class Device(str, Enum):
    auto = "auto"  # cuda > mps > cpu
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    auto = "auto"  # bfloat16 where supported, else float16 (with a GradScaler) on cuda; float32 elsewhere
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"  # with a GradScaler (fp16 underflows); on a CPU emulated unless it has AVX512-FP16 or AMX-FP16


class NonFinite(str, Enum):
    stop = "stop"  # stop the run with a message; the step is not applied
    skip = "skip"  # skip the step (as fp16's grad scaler does on overflow) and count it


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # longest context the model supports (size of the position table)
    vocab_size: Optional[int] = None  # None: the dataset's vocabulary size
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    activation: Activation = Activation.gelu
    # modern switches; each default is nanoGPT's behaviour
    position: Position = Position.learned
    norm: Norm = Norm.layernorm
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    tie_embeddings: bool = True  # the output head shares the token embedding's weight
    zero_init_proj: bool = False  # blocks' output projections (and an untied head) start at zero
    logit_softcap: Optional[float] = None  # logits become cap * tanh(logits / cap); None: off
    attn_scale: Optional[float] = None  # attention logits' scale; None: 1 / sqrt(head size)
    split_qkv: bool = False  # query, key and value as three matrices, not one (for Muon)


@dataclass
class DataConfig:
    name: str = MISSING  # a short name, used in logs
    source: str = MISSING  # URL, local file, glob of files, or HF dataset id/dir (format=hf)
    dir: str = MISSING  # where train.bin, val.bin and meta.json are written and read
    format: DataFormat = DataFormat.text
    encoding: str = "char"  # "char" (vocabulary from the data) or a tiktoken encoding name
    val_fraction: float = 0.1  # share of the data held out for validation
    split_seed: int = 2357  # format=hf/documents: seed of the document-level train/val split
    num_threads: int = 8  # tokenizer threads for large inputs (format=documents: worker processes, at most the CPUs)
    text_column: str = "text"  # format=documents: the parquet column or jsonl key that holds each document's text
    chunk_documents: int = 1024  # format=documents: documents per unit of work and of resumable progress


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon for the hidden matrices, AdamW for the rest)
    lr: float = 6e-4  # peak learning rate (AdamW's; under muon, of the parameters AdamW updates)
    min_lr: float = 6e-5  # floor of the decay (every group's lr decays by the same factor)
    weight_decay: float = 0.1  # on 2-D weights only (matmuls, embeddings); never on biases and norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: Schedule = Schedule.cosine
    warmup_iters: int = 2000
    decay_iters: int = II("max_iters")  # step at which the decay reaches min_lr
    cooldown_fraction: float = 0.2  # wsd: the last fraction of decay_iters, over which lr falls to min_lr
    fused: Optional[bool] = None  # None: the fused AdamW kernel wherever the device supports it
    # name=muon: the hidden (2-D, inside the blocks) matrices' optimizer, and AdamW's lr per role
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update (fewer: cheaper, less exactly orthogonal)
    embed_lr: Optional[float] = None  # token (and position) embeddings; None: lr
    head_lr: Optional[float] = None  # an untied output head; None: lr
    scalar_lr: Optional[float] = None  # norm gains and biases; None: lr


@dataclass
class HardwareConfig:
    device: Device = Device.auto
    dtype: DType = DType.auto  # autocast dtype; master weights stay float32
    compile: Optional[bool] = None  # torch.compile the model; None: on cuda only
    # torch.use_deterministic_algorithms; None: on a CPU, off on a GPU. A compiled model's CPU kernels sum
    # embedding gradients with atomic adds (run-to-run differences of 1e-7) unless it is on: it keeps a
    # compiled CPU run exactly resumable and reproducible, at no measured cost there; on a GPU it costs speed
    deterministic: Optional[bool] = None
    tf32: bool = True  # allow TF32 matmuls and convolutions on Ampere and newer GPUs
    peak_flops: Optional[float] = None  # per device, for MFU; None: known GPU table, else measured
    nproc_per_node: int = 1  # processes per node, one per GPU; > 1 on one machine: nanogpt-train starts them
    nnodes: int = 1  # nodes of the run (for the SLURM launcher; torchrun and srun say it themselves)
    backend: Optional[str] = None  # process-group backend; None: nccl on cuda, gloo elsewhere
    fsdp: bool = False  # shard parameters, gradients and optimizer state across processes (FSDP2)
    cpus_per_process: Optional[int] = None  # CPU cores per process in a submitit/SLURM job: cpus_per_task, torch threads


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl (nanogpt/runs/loggers.py). Each tracker is a switch,
    so that group options merge: logger=[wandb,tensorboard] turns both on (docs/logging.md)."""

    wandb: bool = False  # Weights & Biases
    tensorboard: bool = False  # TensorBoard event files in <run dir>/tensorboard/
    mlflow: bool = False  # MLflow: a run in the store at tracking_uri
    project: str = "nanogpt"  # wandb's project, MLflow's experiment
    run_name: Optional[str] = None  # None: the run dir's name
    tags: List[str] = field(default_factory=list)  # wandb's tags; MLflow tags (set to "true")
    entity: Optional[str] = None  # wandb team or user; None: your default
    mode: Optional[str] = None  # wandb: online | offline | disabled; None: wandb's own setting (WANDB_MODE)
    # MLflow: a server (http://host:5000) or a store URI (sqlite:///abs/path.db); None: $MLFLOW_TRACKING_URI,
    # else a SQLite store in the run dir (<run dir>/mlflow.db). Credentials never go here: MLFLOW_TRACKING_USERNAME
    # and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment
    tracking_uri: Optional[str] = None

    def enabled(self) -> list[str]:
        """The trackers switched on, by name."""
        return [name for name in ("wandb", "tensorboard", "mlflow") if getattr(self, name)]


def upgrade_logger(snapshot) -> None:
    """A run's config snapshot (DictConfig) from before the switches, whose logger.name was none or
    wandb, in today's terms (logger.wandb), so that such a run can be resumed or reproduced. Mutates it."""
    logger = snapshot.get("logger")
    if logger is None or "name" not in logger:
        return
    name = logger.pop("name")
    if name == "wandb":
        logger.wandb = True


class Objective(str, Enum):
    """What a search minimises, read from each trial's run (nanogpt/sweeps/search.py)."""

    best_val_loss = "best_val_loss"  # the lowest val loss of the run's evaluations
    final_val_loss = "final_val_loss"  # the val loss of its last evaluation: under a budget, the loss at that budget
    time_to_target = "time_to_target"  # training seconds until val loss reached target_val_loss (inf if never)
    tokens_to_target = "tokens_to_target"  # tokens trained until then
    flops_to_target = "flops_to_target"  # training FLOPs until then


class Direction(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


class SamplerName(str, Enum):
    tpe = "tpe"  # Tree-structured Parzen Estimator (Optuna's default): Bayesian, good from ~10 trials
    random = "random"  # independent uniform draws: the baseline any search should beat
    grid = "grid"  # every combination of the choices (or stepped ranges) once, in a seeded random order
    cmaes = "cmaes"  # CMA-ES (the `cmaes` package): continuous and int params, many trials
    gp = "gp"  # Gaussian-process Bayesian optimisation: few, expensive trials


class PrunerName(str, Enum):
    median = "median"  # stop a trial whose val loss is worse than the median of earlier trials at the same step
    successive_halving = "successive_halving"  # asynchronous successive halving (ASHA)
    hyperband = "hyperband"  # several successive-halving brackets
    none = "none"  # every trial runs to its end


@dataclass
class ParamSpace:
    """One key's distribution: a range (low, high; log, step) or choices. Whether a range is of
    ints or floats is the key's own type in the schema (model.n_layer: ints; optim.lr: floats)."""

    low: Any = None
    high: Any = None
    log: bool = False  # sample on a log scale (low > 0)
    step: Any = None  # a grid within the range: low, low + step, ...
    choices: Optional[List[Any]] = None  # categorical values, tried as given (each must pass the config's checks)


@dataclass
class SamplerConfig:
    name: SamplerName = SamplerName.tpe
    seed: int = 0  # worker i seeds its sampler with seed + i: workers do not draw the same trials
    n_startup_trials: int = 10  # tpe, gp: random trials before the model takes over


@dataclass
class PrunerConfig:
    name: PrunerName = PrunerName.median
    n_startup_trials: int = 5  # median: trials that run to the end before any is pruned
    n_warmup_steps: int = 0  # median: evaluations before this step never prune
    min_resource: int = 1  # successive_halving, hyperband: the first rung, in steps (reports are at eval steps)
    reduction_factor: int = 3  # successive_halving, hyperband: 1 in this many trials goes on to the next rung


@dataclass
class SearchConfig:
    """A hyperparameter search (nanogpt-train --multirun search=NAME; docs/search.md). Inactive while
    space is empty (search=none)."""

    space: Dict[str, ParamSpace] = field(default_factory=dict)  # config key -> its distribution
    objective: Objective = Objective.best_val_loss
    direction: Direction = Direction.minimize
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    n_trials: int = 20  # finished trials (complete or pruned) the study ends with
    n_workers: int = 1  # trials trained at once, each by its own worker process
    enqueue: List[Dict[str, Any]] = field(default_factory=list)  # params tried first, in order (e.g. the recipe's)
    storage: Optional[str] = None  # null: Optuna's journal file in the sweep dir; or an RDB URL (sqlite:///..., postgresql://...)
    reask_lost: bool = True  # a trial whose worker died is failed, and its params asked again in a new trial (false: only failed)
    dry_run: bool = False  # print the trials, workers, FLOPs and device-hours of the search, and stop
    assumed_mfu: float = 0.4  # the MFU that turns the search's FLOPs into device-hours (dry run); measure yours with nanogpt-bench


AUTO = "auto"  # batch_size=auto: the largest micro-batch that fits (nanogpt/parallel/autobatch.py)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF GPT-2 dir |
    # a run dir or checkpoint file of ours | a nanoGPT ckpt.pt
    init_from: str = "scratch"
    seed: int = 1337
    # sequences per micro-step, per process: a number, or auto (CUDA only): the largest that fits the
    # GPU and divides global_batch_size / processes, found by trying training steps (parallel/autobatch.py).
    # Typed Any, as OmegaConf has no int-or-"auto" type: check_train_config refuses anything else.
    batch_size: Any = 12
    block_size: int = II("model.block_size")  # training context length; at most model.block_size
    # sequences per optimizer step, over all processes; gradient accumulation is derived from it:
    # global_batch_size / (batch_size x processes). None: batch_size x processes (no accumulation)
    global_batch_size: Optional[int] = None
    max_iters: int = 2000  # optimizer steps, unless one of the budgets below ends the run instead
    # Budgets (at most one; nanogpt/runs/budgets.py): the run ends where it is spent, and the lr schedule's
    # horizon (optim.decay_iters, when it is max_iters) follows it. None: max_iters ends the run.
    max_tokens: Optional[float] = None  # tokens trained over all processes: ends at the last whole step within it
    max_flops: Optional[float] = None  # training FLOPs (model.flops_per_token x tokens): likewise
    max_time: Optional[str] = None  # training time, e.g. 90s, 30m, 2h (a number: seconds): ends after the step that spends it
    target_val_loss: Optional[float] = None  # record the first evaluation at which val loss reaches this (time to target)
    stop_at_target: bool = False  # and end the run there (with a checkpoint)
    eval_interval: int = 250  # evaluate (and save) every this many steps, and at the last step
    eval_iters: int = 20  # batches per split in each evaluation
    log_interval: int = 1  # print and record a train line every this many steps
    eval_only: bool = False  # evaluate once and exit (the eval_gpt2* experiments)
    # lm-eval tasks run during training (docs/evaluation.md; pip install 'nanogpt[eval]'), e.g. [hellaswag]:
    # on rank 0 at every eval_tasks_interval steps and at the last step, logged as eval/TASK/METRIC
    eval_tasks: List[str] = field(default_factory=list)
    eval_tasks_interval: Optional[int] = None  # steps; a multiple of eval_interval. None: at every evaluation
    eval_tasks_limit: Optional[int] = 100  # examples per task each time (bounded: it interrupts training); None: all
    eval_tasks_include_path: Optional[str] = None  # a dir of lm-eval task YAML files of your own
    save_checkpoints: bool = True  # write last.pt (each eval and on stop) and best.pt (on improvement)
    keep_checkpoints: int = 2  # checkpoints/step-N.pt kept besides last.pt and best.pt
    # auto: continue from the run dir's checkpoint if it holds one (a requeued job) | never | a run
    # dir to continue, with its own config (max_iters and other RESUMABLE keys may change)
    resume: str = "auto"
    reproduce: Optional[str] = None  # a run dir: train its config again in a fresh dir
    on_nonfinite: NonFinite = NonFinite.stop  # a NaN/inf loss or gradient: stop | skip the step
    search: SearchConfig = field(default_factory=SearchConfig)  # --multirun search=NAME: an Optuna search


@dataclass
class SampleConfig:
    # what to sample from: a run dir or checkpoint of ours, a nanoGPT ckpt.pt, a GPT-2 name
    # (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local HF GPT-2 dir
    init_from: str = MISSING
    checkpoint: str = "best"  # for a run dir: best | last
    prompt: str = "\n"  # FILE:path reads the prompt from that file, as nanoGPT's --start=FILE:path
    prompt_file: Optional[str] = None  # read the prompt from this file instead
    tokenizer: Optional[str] = None  # meta.json / nanoGPT meta.pkl / tiktoken name; None: from init_from
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8  # < 1 sharper, > 1 more random
    top_k: Optional[int] = 200  # keep only the k likeliest tokens; None: all
    seed: int = 1337
    kv_cache: bool = True  # keep keys and values between tokens; false: recompute the context each token
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


@dataclass
class EvalConfig:
    # what to evaluate: a run dir or checkpoint of ours, a nanoGPT ckpt.pt, a GPT-2 name
    # (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local HF GPT-2 dir
    source: str = MISSING
    checkpoint: str = "best"  # for a run dir: best | last
    tasks: List[str] = MISSING  # lm-eval task names, e.g. [hellaswag,lambada_openai]
    limit: Optional[int] = None  # examples per task; None: all
    num_fewshot: Optional[int] = None  # examples shown before each question; None: the task's default
    batch_size: int = 8  # sequences per forward pass
    max_gen_toks: int = 256  # tokens a generation task may write, unless the task says
    tasks_include_path: Optional[str] = None  # a dir of lm-eval task YAML files of your own
    out_dir: Optional[str] = None  # None: <run dir>/eval for a run dir, else eval/<source name> under the cwd
    tokenizer: Optional[str] = None  # meta.json / nanoGPT meta.pkl / tiktoken name; None: from the source
    bootstrap_iters: int = 100000  # resamples for the standard errors of non-mean metrics (lm-eval's default); 0: none
    seed: int = 1234  # lm-eval's seeds (few-shot draws, sampling)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    force: bool = False  # re-prepare even if train.bin/val.bin/meta.json exist


@dataclass
class BenchSettings:
    real_data: bool = True  # batches from the dataset; False: random tokens (no data needed)
    warmup_steps: int = 10  # steps not timed (compile, allocator, caches)
    steps: int = 20  # timed steps
    profile: bool = False  # also write a torch.profiler Chrome trace
    trace_dir: str = "bench_trace"


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def check_model_config(m: ModelConfig, where: str = "model") -> None:
    if m.n_layer < 1 or m.n_head < 1 or m.n_embd < 1 or m.block_size < 1:
        raise ConfigError(f"{where}.n_layer, n_head, n_embd and block_size must be positive")
    if m.n_embd % m.n_head != 0:
        raise ConfigError(
            f"{where}.n_embd={m.n_embd} is not divisible by {where}.n_head={m.n_head}: "
            f"pick n_embd a multiple of n_head (e.g. {where}.n_embd={m.n_head * max(1, round(m.n_embd / m.n_head))})"
        )
    if m.vocab_size is not None and m.vocab_size < 1:
        raise ConfigError(f"{where}.vocab_size={m.vocab_size} must be positive, or null to take the data's")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"{where}.dropout={m.dropout} must be in [0, 1)")
    if Position(m.position) == Position.rotary and (m.n_embd // m.n_head) % 2:
        raise ConfigError(
            f"{where}.position=rotary rotates pairs of channels, and the head size {where}.n_embd / n_head = "
            f"{m.n_embd // m.n_head} is odd: pick an even head size, or {where}.position=learned"
        )
    if m.logit_softcap is not None and m.logit_softcap <= 0:
        raise ConfigError(f"{where}.logit_softcap={m.logit_softcap} must be positive (e.g. 15 or 30), or null for none")
    if m.attn_scale is not None and m.attn_scale <= 0:
        raise ConfigError(f"{where}.attn_scale={m.attn_scale} must be positive, or null for 1 / sqrt(head size)")


BUDGETS = ("max_tokens", "max_flops", "max_time")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(duration: str | float) -> float:
    """A duration as max_time takes it: a number of seconds, or a number with a unit s, m, h or d
    (90s, 30m, 1.5h, 2d). Raises ConfigError."""
    text = str(duration).strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        value = float(number) * DURATION_UNITS[unit]
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"max_time={duration} is not a positive duration: give seconds or a number with a unit "
                          f"s, m, h or d (max_time=90s, max_time=30m, max_time=2h)")
    return value


def check_budgets(c: TrainConfig) -> None:
    """At most one budget, each positive; the target a loss (nanogpt/runs/budgets.py)."""
    given = [key for key in BUDGETS if getattr(c, key) is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(f'{k}={getattr(c, k):g}' if k != 'max_time' else f'{k}={c.max_time}' for k in given)} each end the run, and the lr "
                          f"schedule follows the budget: give one (the others are null)")
    for key in ("max_tokens", "max_flops"):
        value = getattr(c, key)
        if value is not None and not 0 < value < float("inf"):
            raise ConfigError(f"{key}={value:g} must be positive, e.g. {key}=1e6 (or null: max_iters ends the run)")
    if c.max_time is not None:
        seconds(c.max_time)
    if c.target_val_loss is not None and not c.target_val_loss > 0:
        raise ConfigError(f"target_val_loss={c.target_val_loss} must be a positive loss, e.g. target_val_loss=1.5")
    if c.stop_at_target and c.target_val_loss is None:
        raise ConfigError("stop_at_target=true needs a target: set target_val_loss (e.g. target_val_loss=1.5)")


def check_eval_tasks(c: TrainConfig) -> None:
    """The in-training lm-eval keys (which tasks exist is asked of lm-eval, in runs/preflight.py)."""
    if c.eval_tasks_limit is not None and c.eval_tasks_limit <= 0:
        raise ConfigError(f"eval_tasks_limit={c.eval_tasks_limit} must be a positive number of examples per task, "
                          f"or null for all")
    if c.eval_tasks_interval is not None and (c.eval_tasks_interval < 1 or c.eval_tasks_interval % c.eval_interval):
        raise ConfigError(f"eval_tasks_interval={c.eval_tasks_interval} must be a multiple of eval_interval="
                          f"{c.eval_interval} (the tasks run with an evaluation), or null for every evaluation")
    if c.eval_tasks and c.hardware.fsdp:
        raise ConfigError("eval_tasks run on rank 0 alone, and hardware.fsdp shards the model over the ranks: "
                          "set eval_tasks=[] (evaluate the run's checkpoints with nanogpt-eval), or hardware.fsdp=false")


def check_train_config(c: TrainConfig) -> None:
    """Cross-field rules that the schema's types cannot express. Raises ConfigError."""
    check_model_config(c.model)
    if c.block_size > c.model.block_size:
        raise ConfigError(
            f"block_size={c.block_size} exceeds model.block_size={c.model.block_size}: "
            f"lower block_size or raise model.block_size"
        )
    check_batch_size(c)
    for key in ("block_size", "eval_interval", "eval_iters", "log_interval"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{key}={getattr(c, key)} must be at least 1")
    if c.global_batch_size is not None and c.global_batch_size < 1:
        raise ConfigError(f"global_batch_size={c.global_batch_size} must be at least 1, or null (batch_size x processes)")
    h = c.hardware
    if h.nproc_per_node < 1 or h.nnodes < 1:
        raise ConfigError("hardware.nproc_per_node and hardware.nnodes must be at least 1")
    if h.backend not in (None, "gloo", "nccl", "mpi"):
        raise ConfigError(f"hardware.backend={h.backend!r} is not known: use gloo, nccl, mpi or null")
    if c.keep_checkpoints < 0:
        raise ConfigError(f"keep_checkpoints={c.keep_checkpoints} must be >= 0 (0 keeps only last.pt and best.pt)")
    if c.reproduce is not None and c.resume not in ("auto", "never"):
        raise ConfigError("resume and reproduce were both given: resume=<run dir> continues a run, "
                          "reproduce=<run dir> starts it again in a fresh dir; pick one")
    if c.max_iters < 0:
        raise ConfigError(f"max_iters={c.max_iters} must be >= 0")
    check_eval_tasks(c)
    check_budgets(c)
    o = c.optim
    if o.name not in ("adamw", "muon"):
        raise ConfigError(f"optim.name={o.name!r} is not known: use adamw or muon (optim=adamw, optim=muon)")
    for key in ("lr", "muon_lr", "embed_lr", "head_lr", "scalar_lr"):
        if getattr(o, key) is not None and getattr(o, key) <= 0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be positive")
    if o.schedule != Schedule.constant and not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr} (the schedule decays to it)")
    if o.name == "muon" and c.hardware.fsdp:
        raise ConfigError("optim=muon orthogonalises whole matrices and hardware.fsdp=true shards them across "
                          "processes: use DDP (hardware.fsdp=false) with Muon, or optim=adamw with FSDP2")
    if not 1 <= o.muon_ns_steps < 100:  # torch.optim.Muon refuses 100 or more
        raise ConfigError(f"optim.muon_ns_steps={o.muon_ns_steps} must be between 1 and 99, e.g. 5")
    if not 0 < o.cooldown_fraction <= 1:
        raise ConfigError(f"optim.cooldown_fraction={o.cooldown_fraction} must be in (0, 1], e.g. 0.2")
    if o.warmup_iters < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError("optim.warmup_iters, optim.grad_clip and optim.weight_decay must be >= 0")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}={getattr(o, key)} must be in [0, 1), e.g. 0.9 or 0.95")
    if o.eps <= 0:
        raise ConfigError(f"optim.eps={o.eps} must be positive, e.g. 1e-8")
    if c.hardware.peak_flops is not None and c.hardware.peak_flops <= 0:
        raise ConfigError(f"hardware.peak_flops={c.hardware.peak_flops} must be positive, or null")
    if c.logger.mode not in (None, "online", "offline", "disabled"):
        raise ConfigError(f"logger.mode={c.logger.mode!r} must be online, offline, disabled or null")


def check_batch_size(c: TrainConfig) -> None:
    """batch_size is a positive whole number, or auto with a global batch to keep."""
    b = c.batch_size
    if b == AUTO:
        if c.global_batch_size is None:
            raise ConfigError(
                "batch_size=auto picks the micro-batch that fits the GPU and derives gradient accumulation from "
                "global_batch_size, which is not set: set global_batch_size (sequences per optimizer step over all "
                "processes, e.g. global_batch_size=480), or a number for batch_size"
            )
        return
    if isinstance(b, bool) or not isinstance(b, int):
        raise ConfigError(f"batch_size={b} is not a batch size: set a whole number of sequences per micro-step "
                          f"(e.g. batch_size=12) or batch_size=auto (CUDA: the largest that fits)")
    if b < 1:
        raise ConfigError(f"batch_size={b} must be at least 1")


def check_world_size(c: TrainConfig, world_size: int) -> int | None:
    """The rules that depend on the number of processes. Returns the micro-steps per optimizer
    step that make up the global batch on world_size processes; None for batch_size=auto, whose
    accumulation follows from the micro-batch the search picks (check_world_size again with it)."""
    if c.eval_iters % world_size:
        raise ConfigError(
            f"eval_iters={c.eval_iters} is not a multiple of the {world_size} processes (each evaluates an equal "
            f"share): set eval_iters={max(1, round(c.eval_iters / world_size)) * world_size}"
        )
    if c.batch_size == AUTO:
        if c.global_batch_size % world_size:
            raise ConfigError(
                f"global_batch_size={c.global_batch_size} is not a multiple of the {world_size} processes (with "
                f"batch_size=auto each runs an equal share): set global_batch_size="
                f"{max(1, round(c.global_batch_size / world_size)) * world_size}"
            )
        return None
    per_micro_step = c.batch_size * world_size
    if c.global_batch_size is None:
        return 1
    if c.global_batch_size % per_micro_step:
        fits = max(1, round(c.global_batch_size / per_micro_step)) * per_micro_step
        raise ConfigError(
            f"global_batch_size={c.global_batch_size} is not a multiple of batch_size x processes = "
            f"{c.batch_size} x {world_size} = {per_micro_step}: set global_batch_size={fits}, or a batch_size "
            f"that divides {c.global_batch_size // world_size if c.global_batch_size % world_size == 0 else 'it'}"
        )
    return c.global_batch_size // per_micro_step


# Where the configs live. They ship two ways: in a checkout they are conf/ and experiments/ beside
# the package; in an installed wheel they are copied into the package (see pyproject.toml).
PACKAGE_DIR = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"none of {[str(p) for p in candidates]} exists: is the package installed completely?")


def config_dir() -> Path:
    return _first_existing(PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf")


def experiments_dir() -> Path:
    return _first_existing(PACKAGE_DIR / "experiments", PACKAGE_DIR.parent / "experiments")


def site_dirs() -> list[Path]:
    """Where a user's site files (NAME.yaml: partition, account, ... of their cluster) are found
    besides the package's own conf/site/, the later winning: ~/.config/nanogpt/site/ (or
    $XDG_CONFIG_HOME/nanogpt/site/), then ./conf/site/ in the working dir. An installed package's
    own conf/ is inside site-packages, where no user writes."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [config_home / "nanogpt" / "site", Path("conf") / "site"]


def register_configs() -> None:
    """Make everything the defaults lists and the command line may name known to Hydra: the
    schemas, every experiments/*.yaml (as group `experiment`, package _global_, so that
    `experiment=NAME` selects experiments/NAME.yaml in a checkout and from a wheel alike), the
    user's site files, and the resolvers conf/ uses."""
    from hydra.core.config_store import ConfigStore

    register_schemas()
    # run dirs are named by time and pid: two runs started in the same second never share one
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", os.getpid)
    if not OmegaConf.has_resolver("gpus_per_node"):  # conf/launcher/*.yaml derive a job's GPUs with it
        OmegaConf.register_new_resolver("gpus_per_node", gpus_per_node)
    register_sites()
    cs = ConfigStore.instance()
    for path in sorted(experiments_dir().glob("*.yaml")):
        cs.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")


def register_schemas() -> None:
    """Make the schemas available to the defaults lists of conf/*.yaml."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="bench_schema", node=BenchConfig)


def register_sites() -> None:
    """Every site file of site_dirs() as an option of the group `site` (package hydra.launcher, as
    conf/site/example.yaml says), so that site=NAME finds it in a checkout and from a wheel alike."""
    from hydra.core.config_store import ConfigStore

    shipped = {path.stem for path in (config_dir() / "site").glob("*.yaml")}  # found anyway, and they win
    for folder in site_dirs():
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            if path.stem in shipped:
                continue
            ConfigStore.instance().store(group="site", name=path.stem, node=OmegaConf.load(path),
                                         package="hydra.launcher", provider=str(folder))


def gpus_per_node(device: str, nproc_per_node: int) -> int | None:
    """GPUs a job asks for on each node: one per process, unless the hardware is the CPU (or
    Apple's GPU), where it asks for none (None: sbatch rejects --gpus-per-node=0 on a node without
    GPUs). `auto` counts as CUDA: a cluster job is sent to GPUs unless it says cpu."""
    name = getattr(device, "name", device)  # the schema's Device enum, or its name
    return None if name in ("cpu", "mps") else int(nproc_per_node)


def to_object(cfg, schema: type | None = None):
    """A composed config as its typed dataclass (or `schema`'s, merged first), with a missing
    mandatory value (`???`, e.g. data=text without data.source) as a one-line ConfigError."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        if schema is not None:
            cfg = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        reference = OmegaConf.to_container(OmegaConf.structured(OmegaConf.get_type(cfg)))
        unknown = _unknown_keys(OmegaConf.to_container(cfg), reference)
        if unknown:  # added with +key=...: merging typed configs would drop them silently
            raise ConfigError(f"{unknown[0]} is not a config key: check the spelling; --cfg job lists every key")
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", "") or str(e)
        raise ConfigError(f"{key} is required and has no value: set it on the command line ({key}=...)") from e
    except OmegaConfBaseException as e:  # e.g. a key added with +key=... that the schema lacks
        raise ConfigError(one_line(e)) from e


def _unknown_keys(values: dict, schema: dict, prefix: str = "") -> list[str]:
    unknown = []
    for key, value in values.items():
        if key not in schema:
            unknown.append(f"{prefix}{key}")
        elif isinstance(value, dict) and isinstance(schema[key], dict) and schema[key]:  # not a map (search.space)
            unknown += _unknown_keys(value, schema[key], f"{prefix}{key}.")
    return unknown
