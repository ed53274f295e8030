"""Checks that run before Hydra creates a run dir, so a user mistake costs no compute and leaves
nothing on disk.

Hydra calls `Preflight.on_run_start` (registered under `hydra.callbacks` in conf/train.yaml)
with the composed config, before it makes the run dir. A failed check raises a UserError, which
`nanogpt.cli.hydra_entrypoint` prints as one line. A sweep is checked once with its base config
(`on_multirun_start`); each job checks its own overrides again when it starts.

Choices that belong to the whole command (the launcher, the site, the sweep preset) are checked
here too: a list of them in a sweep, and any of them in a single run, where they would do nothing.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from pathlib import Path
import traceback
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from nanogpt.config import AUTO, BUDGETS, TrainConfig, check_train_config, check_world_size, site_dirs, to_object
from nanogpt.errors import ConfigError, UserError, user_errors
from nanogpt.parallel.distributed import detect, planned_world_size, shared_store
from nanogpt.runs import loggers
from nanogpt.runs.resume import plan_run, replace_task_config
from nanogpt.runs.startup import clock


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The composed DictConfig as the typed dataclass, with every cross-field rule checked."""
    schema = OmegaConf.get_type(cfg)  # TrainConfig, or a subclass such as BenchConfig
    if not (isinstance(schema, type) and issubclass(schema, TrainConfig)):
        schema = TrainConfig
    # masked_copy, not items(): an interpolation that cannot resolve is then to_object's one-line error
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    config = to_object(task_cfg, schema)
    check_train_config(config)
    return config


def check_init_from(config: TrainConfig) -> None:
    """init_from exists, and the model group describes its weights (read without loading them)."""
    if config.init_from == "scratch":
        return
    from nanogpt.runs import checkpoint, weights

    weights.check_matches(config.model, weights.peek_model_config(config.init_from), config.init_from)
    where = weights.locate(config.init_from)
    if isinstance(where, Path):  # a corrupt checkpoint is named before the run dir exists
        checkpoint.check_file(where)


def check_hardware(config: TrainConfig) -> None:
    """The device the config asks for exists, and the dtype works there (and batch_size=auto can search it)."""
    from nanogpt.parallel import autobatch, hardware

    autobatch.check_device(config, hardware.resolve(config.hardware).device_type)


def check_optimizer(config: TrainConfig) -> None:
    """optim=muon needs torch.optim.Muon, which PyTorch has had since 2.9."""
    import torch

    if config.optim.name == "muon" and not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optim=muon needs PyTorch >= 2.9 (torch.optim.Muon), and this is {torch.__version__}: "
                          f"upgrade torch, or use optim=adamw")


def check_eval_tasks(config: TrainConfig) -> None:
    """eval_tasks: lm-eval is installed and knows each task (a misspelt one is named with its close matches)."""
    if config.eval_tasks:
        from nanogpt.evals import harness

        harness.task_manager(config.eval_tasks, config.eval_tasks_include_path, "eval_tasks_include_path")


def check_data_and_vocab(config: TrainConfig) -> dict:
    """Prepare the dataset if it is missing (the data cache, not the run dir), then check that the
    model's vocabulary covers it and the training context fits in it. Returns the data's meta.

    From here until the process ends the data dir is held for reading: a prepare that would
    rewrite it under this run refuses (nanogpt.data.datasets.hold_for_reading)."""
    from nanogpt.data.datasets import ensure_prepared, hold_for_reading

    ensure_prepared(config.data)
    hold_for_reading(config.data.dir)
    meta = ensure_prepared(config.data)  # again, now that no prepare can change it: a stat or two
    vocab = config.model.vocab_size
    if vocab is not None and vocab < meta["vocab_size"]:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the {meta['vocab_size']} tokens of data={config.data.name}: "
            f"set model.vocab_size=null (take the data's) or >= {meta['vocab_size']}"
        )
    if config.init_from != "scratch":  # the weights' vocabulary, read without loading them (as check_init_from)
        from nanogpt.runs import weights

        theirs = weights.peek_model_config(config.init_from).vocab_size
        if theirs < meta["vocab_size"]:
            raise ConfigError(
                f"data={config.data.name} has {meta['vocab_size']} tokens but init_from={config.init_from} only "
                f"{theirs}: train on data with the tokenizer of those weights"
            )
    smallest = min(meta["train_tokens"], meta["val_tokens"])
    if smallest <= config.block_size:
        raise ConfigError(
            f"block_size={config.block_size} needs more than {config.block_size} tokens per split, but "
            f"data={config.data.name} has a split of {smallest}: lower block_size or use more data"
        )
    return meta


def data_is_prepared(config: TrainConfig) -> bool:
    """data.dir holds train.bin, val.bin and a meta (not yet checked against data.source)."""
    from nanogpt.data.datasets import is_prepared

    return is_prepared(config.data.dir)


def vocab_before_preparing(config: TrainConfig) -> int | None:
    """The vocabulary the model will have, read without preparing the data (a search's dry run
    writes nothing): model.vocab_size, else init_from's weights', else the tiktoken encoding's.
    None for a char vocabulary, which only the prepared data knows."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if config.init_from != "scratch":
        from nanogpt.runs import weights

        return weights.peek_model_config(config.init_from).vocab_size
    if config.data.encoding != "char":
        from nanogpt.data.tokenizer import get_tiktoken_encoding

        return get_tiktoken_encoding(config.data.encoding).n_vocab
    return None


def check_memory(config: TrainConfig, data_meta: dict) -> None:
    """A training step fits in the memory the device has (a lower-bound estimate; nanogpt/parallel/memory.py)."""
    from nanogpt.parallel import hardware, memory

    hw = hardware.resolve(config.hardware)
    vocab = config.model.vocab_size or data_meta["vocab_size"]
    sharing = planned_world_size(config.hardware) if hw.device_type == "cpu" else 1  # GPUs: one per process
    if config.batch_size == AUTO:  # the search finds the size; one sequence must fit, at least
        config = replace(config, batch_size=1)
    memory.check_fits(config, vocab, hw.device, hw.dtype.itemsize, processes=sharing)


def check_resume_data(run_dir: Path, meta: dict) -> None:
    """A run continued in run_dir must train on the tokens it started on (a source edited and
    prepared again may keep every size). Every checkpoint of a run records the same data, so one
    that matches is enough; refused only when every readable one differs (a foreign file among
    them is the loader's to skip). Each is memory-mapped: only its small metadata is read."""
    from nanogpt.data.datasets import check_same_data
    from nanogpt.runs.checkpoint import CheckpointDir, load_file

    mismatch = None
    for path in CheckpointDir(run_dir / "checkpoints").candidates():
        try:
            payload = load_file(path, mmap=True)
            check_same_data(payload.get("data_meta") or {}, meta)
            return
        except UserError as e:  # unreadable (the loader names it), or other data
            mismatch = mismatch or (e if "the dataset differs" in str(e) else None)
    if mismatch is not None:
        raise mismatch


@contextlib.contextmanager
def stop_on_error():
    """Hydra turns exceptions raised in callbacks into warnings and carries on, so a failed check
    leaves through SystemExit: a user error with its one line and status 2 (user_errors), anything
    else (a bug) with its traceback and status 1."""
    with user_errors():
        try:
            yield
        except UserError:
            raise
        except Exception:
            traceback.print_exc()
            sys.exit(1)


def share_the_plan(cfg: DictConfig, env) -> None:
    """With several processes each started by its launcher (torchrun, srun), each composes its own
    config, a second apart maybe: rank 0 plans the run (run dir, resume) and publishes it in the
    run's store; the other ranks adopt it, write no snapshot, and log to train.rankN.log."""
    import json

    store = shared_store(env)
    if env.is_main:
        try:
            plan_run(cfg)
            task = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
            plan = {"run_dir": str(Path(str(cfg.hydra.run.dir)).absolute()), "config": OmegaConf.to_yaml(task)}
        except UserError as e:
            store.set("nanogpt/plan", json.dumps({"error": str(e)}))
            raise
        store.set("nanogpt/plan", json.dumps(plan))
        return
    plan = json.loads(store.get("nanogpt/plan"))  # waits for rank 0
    if "error" in plan:
        raise UserError(plan["error"])
    replace_task_config(cfg, OmegaConf.create(plan["config"]), "rank 0")
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.run.dir = plan["run_dir"]
    quiet_secondary_rank(cfg, env.rank)


def quiet_secondary_rank(config: DictConfig, rank: int) -> None:
    """Rank 0 writes the run's snapshot and train.log and prints the progress; another rank of the
    same run (under torchrun, srun or a multi-task submitit job) writes no snapshot, logs to
    train.rankN.log and prints warnings only."""
    if rank == 0:
        return
    with read_write(config), open_dict(config):
        config.hydra.output_subdir = None
        config.hydra.job_logging.handlers.file.filename = f"${{hydra.runtime.output_dir}}/train.rank{rank}.log"
        config.hydra.job_logging.handlers.console.level = "WARNING"


def check_working_dir(cfg: DictConfig) -> None:
    """The run stays in the launch dir: relative paths (data.dir, data.source, resume=, init_from=,
    hydra.run.dir) mean the same in every phase. hydra.job.chdir=true would resolve them against
    the launch dir while checking and preparing, and against the run dir while training."""
    if OmegaConf.select(cfg, "hydra.job.chdir"):
        raise ConfigError(
            "hydra.job.chdir=true is not supported: nanogpt keeps the launch dir as the working dir, so that relative "
            "paths mean one thing, and writes every output into the run dir by its path; drop hydra.job.chdir (the "
            "run dir is hydra.runtime.output_dir, and absolute paths work from anywhere)"
        )


# Choices that belong to the whole command, not to one job: what runs the jobs (and where), and
# which sweep it is. Swept, every job would get its own value and the launcher would use one; in
# a single run (no --multirun) they do nothing.
COMMAND_GROUPS = ("sweep", "search", "launcher", "site", "hydra/launcher", "hydra/sweeper")
COMMAND_KEYS = ("hydra.launcher.", "hydra.sweeper.", "hydra.sweep.", "search.")


def _command_overrides(config: DictConfig) -> list:
    """The command line's overrides of COMMAND_GROUPS and COMMAND_KEYS, parsed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # as written: read through the config, an override such as seed=${oops} would be resolved
    given = [*OmegaConf.to_container(config.hydra.overrides.hydra), *OmegaConf.to_container(config.hydra.overrides.task)]
    return [o for o in OverridesParser.create().parse_overrides(given)
            if o.key_or_group in COMMAND_GROUPS or o.key_or_group.startswith(COMMAND_KEYS)]


def refuse_in_a_single_run(config: DictConfig) -> None:
    """sweep=, launcher=, site= and the launcher's settings do nothing without --multirun."""
    for o in _command_overrides(config):
        if o.key_or_group == "hydra.sweep.dir" or o.key_or_group.startswith("hydra.sweep.subdir"):
            continue  # harmless, and `nanogpt-report`'s finish command may carry it
        raise ConfigError(f"{o.input_line} sets how the jobs of a sweep run, and without --multirun this command "
                          f"runs one job here: add --multirun (-m), or drop {o.input_line}")


def check_site(config: DictConfig) -> None:
    """A site the command names exists: Hydra skips an optional config that is missing, and the
    SLURM presets read the site optionally (conf/site/local.yaml need not exist)."""
    from hydra.core.global_hydra import GlobalHydra

    named = [o for o in _command_overrides(config) if o.key_or_group == "site"]
    if not named:
        return
    site = config.hydra.runtime.choices.get("site")
    sites = GlobalHydra.instance().config_loader().get_group_options("site")
    if site not in sites:
        where = ", ".join(["the package's conf/site/", *(f"{d}/" for d in site_dirs())])
        raise ConfigError(f"site={site} names no site file: the sites are {', '.join(sites)} (from {where}); "
                          f"check the spelling, or write {site}.yaml in one of those dirs (see conf/site/example.yaml)")


def refuse_swept_command_choices(config: DictConfig) -> None:
    """One sweep has one launcher, one site and one preset: a list of them is refused."""
    for o in _command_overrides(config):
        if not o.is_sweep_override():
            continue
        key = o.key_or_group
        if key == "sweep":
            fix = "give one preset (sweep=NAME), and list more values on the command line (optim.lr=1e-3,3e-3)"
        else:
            fix = f"give one value, and run one sweep per {key}"
        raise ConfigError(f"{o.input_line} sweeps {key}, which belongs to the whole command, not to one job: {fix}")


def refuse_max_iters_beside_a_budget(config: DictConfig) -> None:
    """max_iters given on the command line beside a budget (max_tokens, max_flops, max_time) asks
    for two lengths of one run. A budget overrides a max_iters that comes from a config file (an
    experiment's, or the default): there max_iters is the recipe's, not this command's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = OverridesParser.create().parse_overrides(OmegaConf.to_container(config.hydra.overrides.task))
    keys = {o.key_or_group.lstrip("+~") for o in given if not o.is_delete()}
    budgets = [key for key in BUDGETS if key in keys or OmegaConf.select(config, key) is not None]
    if "max_iters" in keys and budgets:
        raise ConfigError(f"max_iters and {budgets[0]} both set the length of the run ({budgets[0]} ends it where it "
                          f"is spent, and the lr schedule follows it): drop max_iters, or set {budgets[0]}=null")


class Preflight(Callback):

    def __init__(self, check_data: bool = True, plan_runs: bool = False):
        self.check_data = check_data
        self.plan_runs = plan_runs  # nanogpt-train: resume and reproduce pick the run dir and config

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        clock.mark("interpreter and config")
        with stop_on_error():
            check_working_dir(config)
            refuse_in_a_single_run(config)
            refuse_max_iters_beside_a_budget(config)
            if self.plan_runs:
                to_train_config(config)  # the command line's own mistakes first
                env = detect()
                if env.is_distributed:  # every rank of torchrun/srun runs this: rank 0 decides for all
                    share_the_plan(config, env)
                else:
                    plan_run(config)
            train_config = to_train_config(config)
            loggers.check(train_config.logger)  # first of the checks: it needs no torch
            check_world_size(train_config, planned_world_size(train_config.hardware))
            check_init_from(train_config)
            check_hardware(train_config)
            check_optimizer(train_config)
            check_eval_tasks(train_config)
            if self.check_data:
                meta = check_data_and_vocab(train_config)
                check_memory(train_config, meta)
                if any(getattr(train_config, key) is not None for key in BUDGETS):
                    from nanogpt.runs import budgets

                    budgets.check(train_config, meta["vocab_size"], planned_world_size(train_config.hardware))
                if self.plan_runs and train_config.resume != "never":
                    check_resume_data(Path(str(config.hydra.run.dir)), meta)
        clock.mark("checks and data")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with stop_on_error():
            check_working_dir(config)
            refuse_swept_command_choices(config)
            refuse_max_iters_beside_a_budget(config)
            check_site(config)
            train_config = to_train_config(config)
            loggers.check(train_config.logger)  # once for the sweep, not in each of its jobs first
            if detect().is_distributed:
                raise ConfigError(
                    "a sweep (--multirun) cannot run inside torchrun or srun: launch the sweep once, and give each "
                    "job its processes with hardware.nproc_per_node (or the SLURM launcher's tasks)"
                )
            if self.plan_runs and (train_config.reproduce is not None or train_config.resume not in ("auto", "never")):
                raise ConfigError(
                    "resume=<run dir> and reproduce=<run dir> start one run, not a sweep (--multirun): drop -m; "
                    "each job of a sweep continues from its own checkpoint by itself (resume=auto)"
                )
