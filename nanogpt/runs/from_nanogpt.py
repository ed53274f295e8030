"""Where nanoGPT's habits meet this project: its config keys and flags, and its checkpoints' config.

`KEYS` is the one table of every config key of nanoGPT's train.py, sample.py and bench.py with
its spelling here (docs/from_nanogpt.md shows the same table; a test keeps the two in step). It
answers a nanoGPT habit on the command line (`--max_iters=100`, `compile=False`,
`config/train_shakespeare_char.py`) with the spelling that works, and it maps the training config a
nanoGPT ckpt.pt records to ours when `resume=` continues it.

No torch at import: `check_argv` runs on every launch.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, NamedTuple

from nanogpt.config import BenchConfig, SampleConfig, TrainConfig
from nanogpt.errors import ConfigError, UserError


class Key(NamedTuple):
    scripts: str  # nanoGPT's scripts that have the key: train, sample, bench
    nanogpt: str  # its key, or key=value where the value decides the spelling here
    ours: str | None  # the override that does it here ({v}: the value given); None: nothing to set
    note: str = ""  # why, or what differs


KEYS = [
    # train.py: I/O
    Key("train", "out_dir", "hydra.run.dir={v}", "each run gets its own dir by default"),
    Key("sample", "out_dir", "init_from={v}", "a nanoGPT out_dir loads its ckpt.pt"),
    Key("train", "eval_interval", "eval_interval={v}"),
    Key("train", "log_interval", "log_interval={v}"),
    Key("train", "eval_iters", "eval_iters={v}"),
    Key("train", "eval_only", "eval_only={v}"),
    Key("train", "always_save_checkpoint", None,
        "last.pt is written at every evaluation and best.pt when the val loss improves: drop it"),
    Key("train", "init_from", "init_from={v}", "scratch, gpt2, gpt2-medium, ...: weights only, the step restarts at 0"),
    Key("train", "init_from=resume", "resume=<out_dir>", "continues the run: optimizer, iter_num, best_val_loss"),
    Key("sample", "init_from=resume", "init_from=<out_dir>"),
    Key("train", "wandb_log=True", "logger=wandb"),
    Key("train", "wandb_log=False", "logger=none"),
    Key("train", "wandb_project", "logger.project={v}"),
    Key("train", "wandb_run_name", "logger.run_name={v}"),
    # data
    Key("train", "dataset", "data={v}", "shakespeare_char, shakespeare, openwebtext; your own text: data=text "
                                        "data.source=FILE"),
    Key("train", "gradient_accumulation_steps", "global_batch_size=<batch_size x {v}>",
        "the global batch over all processes; the accumulation follows from it"),
    Key("train bench", "batch_size", "batch_size={v}"),
    Key("train bench", "block_size", "model.block_size={v}", "block_size (the training context) follows it"),
    # model
    Key("train", "n_layer", "model.n_layer={v}"),
    Key("train", "n_head", "model.n_head={v}"),
    Key("train", "n_embd", "model.n_embd={v}"),
    Key("train", "dropout", "model.dropout={v}"),
    Key("train bench", "bias", "model.bias={v}"),
    # adamw optimizer and schedule
    Key("train", "learning_rate", "optim.lr={v}"),
    Key("train", "max_iters", "max_iters={v}", "nanoGPT takes one step more, after its last checkpoint"),
    Key("train", "weight_decay", "optim.weight_decay={v}"),
    Key("train", "beta1", "optim.beta1={v}"),
    Key("train", "beta2", "optim.beta2={v}"),
    Key("train", "grad_clip", "optim.grad_clip={v}"),
    Key("train", "decay_lr=True", "optim.schedule=cosine"),
    Key("train", "decay_lr=False", "optim.schedule=constant optim.warmup_iters=0"),
    Key("train", "warmup_iters", "optim.warmup_iters={v}"),
    Key("train", "lr_decay_iters", "optim.decay_iters={v}"),
    Key("train", "min_lr", "optim.min_lr={v}"),
    # DDP and system
    Key("train", "backend", "hardware.backend={v}"),
    Key("train sample bench", "device", "hardware.device={v}", "cuda:N: hardware.device=cuda with CUDA_VISIBLE_DEVICES=N"),
    Key("train sample bench", "dtype", "hardware.dtype={v}", "nanoGPT ignores it on a CPU (float32); so does auto"),
    Key("train sample bench", "compile", "hardware.compile={v}"),
    # sample.py
    Key("sample", "start", "prompt={v}", "prompt=FILE:path reads the file, as nanoGPT does; or prompt_file=path"),
    Key("sample", "num_samples", "num_samples={v}"),
    Key("sample", "max_new_tokens", "max_new_tokens={v}"),
    Key("sample", "temperature", "temperature={v}"),
    Key("sample", "top_k", "top_k={v}"),
    Key("sample bench", "seed", "seed={v}", "train.py seeds 1337 + rank; here seed= (default 1337)"),
    # bench.py
    Key("bench", "real_data", "bench.real_data={v}"),
    Key("bench", "profile", "bench.profile={v}"),
]

# nanoGPT's config files (config/NAME.py) and the experiments here that are the same recipes
CONFIG_FILES = {
    "train_shakespeare_char": "shakespeare_char", "train_gpt2": "gpt2_124m", "finetune_shakespeare": "finetune_shakespeare",
    "eval_gpt2": "eval_gpt2", "eval_gpt2_medium": "eval_gpt2_medium", "eval_gpt2_large": "eval_gpt2_large",
    "eval_gpt2_xl": "eval_gpt2_xl",
}
# nanoGPT's data/ dirs that are data groups here, prepared the same way (conf/data/NAME.yaml)
DATASETS = ("shakespeare_char", "shakespeare", "openwebtext")
SCHEMAS = {"train": TrainConfig, "sample": SampleConfig, "bench": BenchConfig}
# Hydra's own command-line flags (hydra/_internal/utils.py: get_args_parser)
HYDRA_FLAGS = ("cfg", "config-dir", "config-name", "config-path", "experimental-rerun", "help", "hydra-help", "info",
               "multirun", "package", "resolve", "run", "shell-completion", "version")


def hydra_value(value: Any) -> str:
    """A nanoGPT value (Python literal text, or the value itself) as Hydra writes it."""
    text = str(value)
    return {"True": "true", "False": "false", "None": "null"}.get(text, text)


def spelling(script: str | None, key: str, value: Any = None) -> Key | None:
    """The row of KEYS for nanoGPT's key (and value) in one of its scripts; None: not nanoGPT's."""
    rows = [k for k in KEYS if script is None or script in k.scripts.split()]
    text = hydra_value(value) if value is not None else None
    for row in rows:
        if text is not None and row.nanogpt.lower() == f"{key}={text}".lower():
            return row
    return next((row for row in rows if row.nanogpt == key), None)


def override_for(row: Key, value: Any) -> str:
    """The override(s) that do here what row's nanoGPT key does with value."""
    if row.ours is None:
        return "nothing"
    text = "VALUE" if value in (None, "") else hydra_value(value)
    if row.nanogpt == "device":
        text = re.sub(r":\d+$", "", text)
    return row.ours.replace("{v}", text)


def check_argv(argv: list[str], script: str | None) -> None:
    """A nanoGPT habit on the command line, answered in one line with the spelling that works here:
    `--key=value` flags (Hydra overrides have no dashes), nanoGPT's config files, and its keys."""
    schema = {f.name for f in dataclasses.fields(SCHEMAS[script])} if script in SCHEMAS else set()
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            name, has_value, value = arg[2:].partition("=")
            if any(flag.startswith(name) for flag in HYDRA_FLAGS):  # argparse takes abbreviations too
                continue
            if not has_value and i + 1 < len(argv) and "=" not in argv[i + 1] and not argv[i + 1].startswith("-"):
                value = argv[i + 1]  # --key value
            row = spelling(script, name, value)
            if row is None or row.ours == f"{name}={{v}}":
                raise UserError(f"use {name}={value or 'VALUE'} (Hydra overrides have no dashes)")
            raise UserError(f"use {override_for(row, value)} (Hydra overrides have no dashes; {_why(row, name)})")
        if arg.endswith(".py") and "=" not in arg and not arg.startswith("-"):
            name = Path(arg).stem
            fix = f"experiment={CONFIG_FILES[name]}" if name in CONFIG_FILES else "experiment=NAME (see experiments/)"
            raise UserError(f"{arg} is a nanoGPT config file: here its recipe is {fix}")
        key, has_value, value = arg.partition("=")
        key = key.lstrip("+~")
        if not has_value or "." in key or "/" in key:
            continue
        row = spelling(script, key, value)
        if row is None or row.ours == f"{key}={{v}}" or (key in schema and "=" not in row.nanogpt):
            continue  # ours too (batch_size, max_iters, ...)
        if row.ours is None:
            raise UserError(f"{arg} is nanoGPT's key, with no counterpart here: {row.note}")
        raise UserError(f"{arg} is nanoGPT's key: here it is {override_for(row, value)}" + (f" ({row.note})" if row.note else ""))


def _why(row: Key, name: str) -> str:
    what = row.nanogpt if "=" in row.nanogpt else name
    return f"{what} is nanoGPT's spelling" + (f"; {row.note}" if row.note else "")


# --- continuing a nanoGPT run (resume=<ckpt.pt or its out_dir>) ------------------------------------

# keys of a ckpt.pt's config that the continued run does not take from it: the weights come from the
# checkpoint (init_from), the run dir is ours (out_dir), the architecture is its model_args', and
# the rest is mapped by hand below
NOT_CARRIED = ("out_dir", "init_from", "always_save_checkpoint", "backend", "dataset", "gradient_accumulation_steps",
               "device", "dtype", "n_layer", "n_head", "n_embd", "dropout", "bias", "block_size", "wandb_log")


def is_checkpoint(payload: Any) -> bool:
    """A nanoGPT ckpt.pt written by its train.py, with what its --init_from=resume needs."""
    return isinstance(payload, dict) and {"model", "model_args", "optimizer", "iter_num"} <= payload.keys()


def checkpoint_file(value: str) -> Path | None:
    """The nanoGPT ckpt.pt that resume=value names (the file, or the out_dir that holds it); None
    when value is a run dir of ours. A file that is no nanoGPT training checkpoint is refused."""
    from nanogpt.runs import checkpoint

    path = Path(value).expanduser()
    if path.is_dir() and (path / "ckpt.pt").is_file() and not (path / "config.resolved.yaml").exists():
        path = path / "ckpt.pt"
    if not path.is_file():
        return None
    payload = checkpoint.load_file(path)  # memory-mapped: only its small parts are read here
    if checkpoint.is_ours(payload):
        raise ConfigError(f"resume={value} is a checkpoint file of ours: resume takes the run dir that holds it "
                          f"(resume={path.parent.parent})")
    if not is_checkpoint(payload):
        raise ConfigError(f"resume={value} is not a nanoGPT ckpt.pt (no 'model_args', 'optimizer' and 'iter_num'): "
                          f"give a run dir of ours, or the ckpt.pt (or out_dir) of a nanoGPT run")
    return path


def run_config(path: Path, composed):
    """The config that continues the nanoGPT run of ckpt.pt `path`: the command's composition, with
    what the checkpoint fixes (its model_args, and its training config mapped through KEYS) put over
    it. nanoGPT's train.py always seeds 1337."""
    import yaml
    from omegaconf import OmegaConf, open_dict

    from nanogpt.runs import checkpoint, weights

    payload = checkpoint.load_file(path)
    theirs = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    values: dict[str, Any] = {"seed": 1337, "optim.name": "adamw", "init_from": "scratch", "global_batch_size": None}
    model = checkpoint.model_config_to_dict(weights.peek_model_config(str(path)))
    values.update({f"model.{k}": v for k, v in model.items()})
    for key, value in sorted(theirs.items(), key=lambda kv: kv[0] == "decay_lr"):  # decay_lr=False sets warmup last
        if key in NOT_CARRIED:
            continue
        row = spelling("train", key, value)
        if row is None or row.ours is None:
            continue
        for override in override_for(row, value).split():
            name, _, text = override.partition("=")
            values[name] = value if "{v}" in row.ours else yaml.safe_load(text)
    values["logger.wandb"] = bool(theirs.get("wandb_log"))  # the command's other trackers stay on
    if theirs.get("gradient_accumulation_steps", 1) > 1:
        values["global_batch_size"] = theirs["batch_size"] * theirs["gradient_accumulation_steps"]
    device = re.sub(r":\d+$", "", str(theirs.get("device", "cpu")))
    values["hardware.device"] = device
    # nanoGPT autocasts on cuda only: elsewhere it trains in float32, whatever dtype says
    values["hardware.dtype"] = theirs.get("dtype", "float32") if device == "cuda" else "float32"

    dataset = theirs.get("dataset")
    if dataset in DATASETS and dataset != composed.data.name:
        raise ConfigError(f"resume={path} is a nanoGPT run on data/{dataset}: add data={dataset}")
    snapshot = composed.copy()
    with open_dict(snapshot):
        for key, value in values.items():
            OmegaConf.update(snapshot, key, value, merge=False, force_add=True)
    return snapshot


def checkpoint_to_resume(config) -> tuple[dict | None, Path | None]:
    """The nanoGPT ckpt.pt that config.resume names, read whole, when the run dir holds no
    checkpoint of its own yet (a continued nanoGPT run's later starts resume from their own)."""
    import logging

    from nanogpt.runs import checkpoint

    if config.resume in ("auto", "never") or (path := checkpoint_file(config.resume)) is None:
        return None, None
    payload = checkpoint.load_file(path, mmap=False)
    logging.getLogger("nanogpt").info(f"continuing the nanoGPT run of {path} at iter_num {payload['iter_num']}, as "
                                      f"its --init_from=resume does (batches drawn afresh from seed 1337)")
    return {**payload, "step": int(payload["iter_num"])}, path


def restore(t, payload: dict, data_meta: dict, config) -> tuple[int, float]:
    """Put a nanoGPT ckpt.pt's weights and AdamW state into a freshly built Training, as nanoGPT's
    --init_from=resume does. The batch stream and the RNG are not restored: nanoGPT seeds again at
    every start, and the model built from that seed has already drawn its init, as nanoGPT's has, so
    the batches from here on are nanoGPT's own. Returns (iter_num, best_val_loss)."""
    from nanogpt.parallel import sharding
    from nanogpt.runs import weights

    source = f"{config.resume} (nanoGPT checkpoint)"
    state_dict = weights.normalize_state_dict(payload["model"])
    weights.check_fits(t.raw_model, state_dict, source)
    model_config = weights.peek_model_config(config.resume)
    pretrained = weights.Pretrained(model_config, state_dict, weights.nanogpt_meta(payload, Path(config.resume)), source)
    weights.check_tokenizer(pretrained, data_meta, config.resume, config.data.name)
    theirs, ours = payload["optimizer"], t.optimizer.state_dict()
    if [len(g["params"]) for g in theirs["param_groups"]] != [len(g["params"]) for g in ours["param_groups"]]:
        raise UserError(f"the optimizer state of {config.resume} has other parameter groups than nanoGPT's AdamW "
                        f"(decay, no decay): it cannot be continued; start from its weights with init_from=")
    # our groups carry lr_scale (their lr relative to optim.lr); nanoGPT's AdamW has one lr for all
    optimizer_state = {"state": theirs["state"], "param_groups": [{**g, "lr_scale": 1.0} for g in theirs["param_groups"]]}
    sharding.load_state_dicts(t.raw_model, t.optimizer, state_dict, optimizer_state, t.fsdp, t.env.is_main)
    return int(payload["iter_num"]), float(payload["best_val_loss"])
