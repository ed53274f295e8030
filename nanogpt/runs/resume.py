"""Which run dir a run writes to, and with which config, when it continues or repeats a run.

    resume=auto        (default) a run dir that already holds a checkpoint is continued from it:
                       what a requeued SLURM job, or a command re-run with the same hydra.run.dir,
                       needs. Its config must match the run's, except RESUMABLE keys.
    resume=never       start from step 0; refused in a run dir that holds checkpoints.
    resume=<run dir>   continue that run, in its dir, with the config it snapshotted
                       (config.resolved.yaml); only RESUMABLE keys may be overridden.
    resume=<nanoGPT ckpt.pt or out_dir>  continue a nanoGPT run as its --init_from=resume does, in
                       a fresh run dir, with the config its checkpoint records (nanogpt/runs/from_nanogpt.py).
    reproduce=<run dir>  train that run's config (its .hydra/config.yaml) again in a fresh run dir;
                       key=value and group overrides apply on top of it.

`plan_run` does this in the Preflight callback, before Hydra creates the run dir, so a refused
request costs nothing and leaves nothing on disk. When the run dir already has a `.hydra/`
snapshot, this start's goes beside it in `.hydra/resume-N/`: the run's first snapshot is kept.

No torch here: this runs on every launch.
"""

from __future__ import annotations

import json
from pathlib import Path
import os
import tempfile
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from nanogpt.config import upgrade_logger
from nanogpt.errors import ConfigError
from nanogpt.runs import from_nanogpt, runlock
from nanogpt.runs.runfiles import read_yaml

# what to do when a run's own config files cannot be read back
RESOLVED_FIX = ("restore it from a copy of the run (its .hydra/config.yaml holds the config as composed), or train the "
                "run again with reproduce={run_dir}")
SNAPSHOT_FIX = "restore it from a copy of the run; its config.resolved.yaml holds the config it ran with"

# Keys a continued run may change: how long it runs, how it reports, what it keeps. Anything else
# would make the rest of the run differ from the run that was started.
RESUMABLE = (
    "max_iters", "max_tokens", "max_flops", "max_time", "target_val_loss", "stop_at_target", "eval_interval", "eval_iters", "log_interval", "save_checkpoints", "keep_checkpoints",
    "on_nonfinite", "logger", "hardware.peak_flops", "hardware.compile", "hardware.deterministic", "data.num_threads", "data.dir",
    "data.source", "hardware.nproc_per_node", "hardware.nnodes", "hardware.backend",
    "hardware.fsdp", "hardware.cpus_per_process",
    "search",  # the search a run is a trial of: it does not change the run (and runs from before it lack it)
)
RESUMABLE_IN_WORDS = ("max_iters and the budgets (max_tokens, max_flops, max_time, target_val_loss), eval/log "
                      "intervals, checkpoint settings, on_nonfinite, logger.*, data.dir/source, and the process "
                      "count when the global batch stays the same, search.*")
CHOICES = ("auto", "never")


def is_resumable(key: str) -> bool:
    return key in ("resume", "reproduce") or any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def refuse_changes(old: dict, new: dict, run_dir: Path | str, way_out: str | None = None) -> None:
    """ConfigError unless the two resolved configs (nested or flat) differ only in RESUMABLE keys."""
    old_flat, new_flat = flatten(old), flatten(new)
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if is_resumable(key) or old_flat.get(key) == new_flat.get(key):
            continue
        raise ConfigError(
            f"{run_dir} holds a run with {key}={old_flat.get(key)!r}, and this command sets {new_flat.get(key)!r}: "
            f"a continued run keeps its config (only {RESUMABLE_IN_WORDS} may change); "
            + (way_out or f"to train with it changed, start a new run in a fresh dir with init_from={run_dir}")
        )


def derived_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """The keys whose composed value is an interpolation of other keys (optim.decay_iters:
    ${max_iters}, block_size: ${model.block_size}): derived, not chosen."""
    keys = []
    for key in cfg.keys():
        node = cfg._get_node(key)
        if OmegaConf.is_interpolation(cfg, key):
            keys.append(f"{prefix}{key}")
        elif isinstance(node, DictConfig):
            keys += derived_keys(node, f"{prefix}{key}.")
    return keys


def continued_config(snapshot: dict, composed: DictConfig, run_dir: Path | str, way_out: str | None = None) -> dict:
    """The config a run continues with when a command (composed, with its interpolations) continues
    the run whose resolved config is `snapshot`: the run's, with the command's RESUMABLE values.

    A derived key keeps the run's value: when max_iters grows, optim.decay_iters (${max_iters})
    stays where the run had it, so the schedule of the steps already taken goes on unchanged,
    and a command that repeats an extension is the same command again, not a change. (Its source,
    if not RESUMABLE, is compared on its own.) Any other difference raises ConfigError."""
    command = OmegaConf.to_container(composed, resolve=True, enum_to_str=True)
    run, wanted = flatten(snapshot), flatten(command)
    for key in derived_keys(composed):
        if not is_resumable(key) and key in run:
            wanted[key] = run[key]
    refuse_changes(run, wanted, run_dir, way_out)
    continued = OmegaConf.create(snapshot)
    # the command's RESUMABLE subtrees, whole: a key of a dict value may hold a dot (search.space's
    # optim.lr), so the flat names above cannot be walked back into the tree
    for key in ("resume", "reproduce", *RESUMABLE):
        tree = command
        for part in key.split("."):
            tree = tree.get(part, _ABSENT) if isinstance(tree, dict) else _ABSENT
        if tree is not _ABSENT:
            OmegaConf.update(continued, key, tree, merge=False, force_add=True)
    return OmegaConf.to_container(continued)


_ABSENT = object()  # a key the command's config does not have


def refuse_overwrite(run_dir: Path) -> None:
    raise ConfigError(
        f"{run_dir} already holds a run and resume=never would start another over it: "
        f"pick a fresh hydra.run.dir, or set resume=auto to continue that run"
    )


def check_writable(run_dir: Path) -> None:
    """The run dir (or the dir it will be made in) can be written, before anything is computed."""
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is an existing file" if existing == run_dir.absolute() else f"cannot be made: {existing} is a file"
        raise ConfigError(f"the run dir hydra.run.dir={run_dir} {what}: give the path of a dir (new or a run's)")
    if existing != run_dir.absolute():  # can the missing dirs be made there? (/proc, /sys say no only when asked)
        try:
            tempfile.TemporaryDirectory(dir=existing).cleanup()
        except OSError as e:
            raise ConfigError(f"the run dir hydra.run.dir={run_dir} cannot be made in {existing} ({e.strerror or e}): "
                              f"pick a hydra.run.dir in a dir you can write") from None
    if not os.access(existing, os.W_OK):
        why = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise ConfigError(
            f"the run dir {run_dir} cannot be written ({why} at {existing}): pick a writable hydra.run.dir, "
            f"or copy the run somewhere writable and resume it there"
        )


def existing_run_dir(value: str, key: str, needs: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={value}: no such run dir; give the dir a run wrote (outputs/DATE/TIME-PID)")
    if not (path / needs).is_file():
        raise ConfigError(f"{key}={value} holds no {needs}: it is not a run dir of nanogpt-train")
    return path


def plan_run(cfg: DictConfig, preview: bool = False) -> None:
    """Point the run dir and the task config at what resume/reproduce ask (mutates cfg), after
    taking the run dir's lock (runlock.hold). preview (--cfg job): the same plan, without the lock
    and without verifying the checkpoints' hashes, so that it writes nothing and answers at once."""
    resume, reproduce = cfg.resume, cfg.reproduce
    if reproduce is not None:
        source = existing_run_dir(reproduce, "reproduce", ".hydra/config.yaml")
        snapshot = read_yaml(source / ".hydra" / "config.yaml", fix=SNAPSHOT_FIX)
        upgrade_logger(snapshot)
        _apply_overrides(snapshot, cfg, "reproduce", allowed=lambda key: True)
        snapshot.reproduce = str(source.resolve())
        snapshot.resume = resume
        replace_task_config(cfg, snapshot, source)
    elif resume not in CHOICES and (ckpt := from_nanogpt.checkpoint_file(resume)) is not None:
        # a nanoGPT run, continued in a fresh run dir of ours with the config its ckpt.pt records
        snapshot = from_nanogpt.run_config(ckpt, _task_part(cfg))
        _apply_overrides(snapshot, cfg, f"resume={resume}", allowed=is_resumable)
        snapshot.resume = str(ckpt.resolve())
        replace_task_config(cfg, snapshot, ckpt)
    elif resume not in CHOICES:
        source = existing_run_dir(resume, "resume", "config.resolved.yaml")
        if not preview:  # the run continues in its own dir: a live owner is the first thing to name
            check_writable(source)
            runlock.hold(source)
        if not has_checkpoints(source):
            raise ConfigError(
                f"resume={resume} holds no checkpoint to continue from (it stopped before its first save, or ran "
                f"with save_checkpoints=false): start it again with reproduce={resume}"
            )
        snapshot = read_yaml(source / "config.resolved.yaml", fix=RESOLVED_FIX.format(run_dir=source))
        upgrade_logger(snapshot)
        _apply_overrides(snapshot, cfg, f"resume={resume}", allowed=is_resumable)
        snapshot.resume = resume
        replace_task_config(cfg, snapshot, source)
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.run.dir = str(source)

    run_dir = Path(str(cfg.hydra.run.dir))
    check_writable(run_dir)
    if not preview:  # before the run's files are read: a live owner may be writing them
        runlock.hold(run_dir)
    if resume == "never" and (run_dir / "provenance.json").exists():
        refuse_overwrite(run_dir)
    if resume != "never":
        plan_in_place(cfg, run_dir)
        if not preview and has_checkpoints(run_dir):
            from nanogpt.runs.checkpoint import CheckpointDir

            CheckpointDir(run_dir / "checkpoints").check_any_good()  # a corrupt run is named before Hydra writes
    else:
        keep_first_snapshot(cfg, run_dir)


def has_checkpoints(run_dir: Path) -> bool:
    """Whether run_dir holds a checkpoint to continue from (without importing torch when it has none)."""
    if not (run_dir / "checkpoints").is_dir():
        return False
    from nanogpt.runs.checkpoint import CheckpointDir

    return bool(CheckpointDir(run_dir / "checkpoints").candidates())


def plan_in_place(cfg: DictConfig, run_dir: Path, way_out: str | None = None) -> None:
    """cfg will run in run_dir (resume=auto): if the dir holds a run, cfg becomes that run's config
    with the command's RESUMABLE values (`continued_config`); if it holds a snapshot, this
    start's goes beside it (`keep_first_snapshot`). Mutates cfg."""
    if (run_dir / "config.resolved.yaml").is_file():
        snapshot = OmegaConf.to_container(read_yaml(run_dir / "config.resolved.yaml",
                                                    fix=RESOLVED_FIX.format(run_dir=run_dir)))
        continued = continued_config(snapshot, _task_part(cfg), run_dir, way_out)
        replace_task_config(cfg, OmegaConf.create(continued), run_dir)
    keep_first_snapshot(cfg, run_dir)


def keep_first_snapshot(cfg: DictConfig, run_dir: Path) -> None:
    """If run_dir holds a .hydra/ snapshot, this start's goes beside it, in .hydra/resume-N."""
    if (run_dir / ".hydra").is_dir():
        n = 1 + len(list((run_dir / ".hydra").glob("resume-*")))
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.output_subdir = f".hydra/resume-{n}"


def _task_part(cfg: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])


def _apply_overrides(snapshot: DictConfig, cfg: DictConfig, what: str, allowed) -> None:
    """Apply the command line's overrides to a snapshot, with the values Hydra composed for them.
    A key that is not `allowed` is refused, unless it leaves the snapshot's value as it is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = set(cfg.hydra.runtime.choices.keys()) if "runtime" in cfg.hydra else set()
    for override in OverridesParser.create().parse_overrides(list(cfg.hydra.overrides.task)):
        key = override.key_or_group
        if key.startswith(("hydra.", "hydra/")) or key in ("resume", "reproduce"):
            continue
        text = override.input_line
        if override.is_delete() or override.is_add() or override.package is not None or key == "experiment":
            raise ConfigError(f"{what} takes key=value overrides on top of its own config, not {text}: "
                              f"to compose a new config, start a new run")
        value = cfg[key] if key in groups else OmegaConf.select(cfg, key)
        if not allowed(key) and _plain(value) == _plain(OmegaConf.select(snapshot, key)):
            continue
        if not allowed(key):
            old = _plain(OmegaConf.select(snapshot, key))
            raise ConfigError(
                f"{text} would change {what}, which has {key}={old!r}: a continued run keeps its config (only "
                f"{RESUMABLE_IN_WORDS} may change); to train with it changed, start a new run in a fresh dir "
                f"with init_from=<its run dir>"
            )
        OmegaConf.update(snapshot, key, value, merge=False, force_add=True)


def _plain(value: Any) -> Any:
    """A config value as plain, resolved Python values (nodes become dicts and lists)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value.value if isinstance(value, Enum) else value


def replace_task_config(cfg: DictConfig, snapshot: DictConfig, source: Path) -> None:
    """Make cfg's task part (all but `hydra`) the snapshot, typed by cfg's schema."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(OmegaConf.get_type(cfg)), snapshot)
        with read_write(cfg), open_dict(cfg):
            for key in typed.keys():
                cfg[key] = typed._get_node(key)  # interpolations such as ${model.block_size} stay live
    except Exception as e:  # a key this version no longer has, or a value it no longer accepts
        raise ConfigError(f"the config of {source} does not fit this version of nanogpt ({e}): "
                          f"run it with the version that wrote it") from e


def foreign_checkpoint(payload: dict, resolved: dict) -> str | None:
    """Why a checkpoint found in the run dir is another run's (a file copied in), or None. By the
    time the run loads it, planning has refused any change the command made to the run's recorded
    config, so a checkpoint whose config differs from it in a key a run keeps is not this run's."""
    try:
        theirs = flatten(json.loads(payload["config"]))
    except (ValueError, TypeError):
        return "its config is not readable"
    ours = flatten(resolved)
    for key in sorted(theirs.keys() | ours.keys()):
        if not is_resumable(key) and theirs.get(key) != ours.get(key):
            return f"it is another run's file ({key}={theirs.get(key)!r} there, {ours.get(key)!r} in this run)"
    return None
