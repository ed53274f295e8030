"""What every entrypoint shares: where the configs live, and one-line errors for user mistakes.

Configs ship two ways: in a checkout they are `conf/` and `experiments/` beside the package; in an
installed wheel they are copied into the package (see pyproject.toml). Experiments are registered
as the Hydra group `experiment`, so `experiment=NAME` selects `experiments/NAME.yaml` either way.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from pathlib import Path
from typing import Callable

from nanogpt.config import ConfigError, UserError

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


def register_configs() -> None:
    """Register the schemas and every experiments/*.yaml (as group `experiment`, package _global_)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from nanogpt.config import register_schemas
    from nanogpt.sweep import register_resolvers, register_sites

    register_schemas()
    # run dirs are named by time and pid: two runs started in the same second never share one
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", os.getpid)
    register_resolvers()
    register_sites()
    cs = ConfigStore.instance()
    for path in sorted(experiments_dir().glob("*.yaml")):
        cs.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")


def one_line(exc: BaseException) -> str:
    """Condense a Hydra/OmegaConf error into one line: what was wrong, and the hint if there is one.
    What locates the mistake (the override, the character, the key) is kept."""
    from hydra.errors import OverrideParseException

    if isinstance(exc, OverrideParseException):
        return unparsable_override(exc.override)
    parts: list[str] = []
    options: list[str] = []
    # our own errors already say why; Hydra's and OmegaConf's put the reason in their cause
    for e in (exc,) if isinstance(exc, UserError) else (exc, exc.__cause__):
        if e is None:
            continue
        for raw in str(e).splitlines():
            line = raw.strip()
            if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "provider=")):
                continue
            if line.startswith("Config search path"):
                break
            if raw.startswith("\t"):  # one option of an "Available options in 'group':" list
                options.append(line)
                continue
            line = line if line.endswith((".", ":", "?", "!")) else line + "."
            if line not in parts:
                parts.append(line)
    if options:
        parts[-1] = parts[-1] + " " + ", ".join(options)
    # OmegaConf names the key on a `full_key:` line of its own, which the loop above drops
    key = next((getattr(e, "full_key", None) for e in (exc, exc.__cause__) if getattr(e, "full_key", None)), None)
    if key and parts and not any(key in p for p in parts):
        parts[0] = f"{key}: {parts[0]}"
    misspelled = any(re.search(r"Key '.*' not in '", p) for p in parts)
    if misspelled and not any("--cfg job" in p for p in parts):  # appending the key would not help
        parts = [p for p in parts if not p.startswith("To append to your config")]
        parts.append("Check the spelling; --cfg job lists every key.")
    return " ".join(parts) if parts else exc.__class__.__name__


def unparsable_override(override: str) -> str:
    """Why Hydra's grammar rejects a command-line override, as one line: the override, the
    character it stops at, and the quoting that passes the value as a plain string."""
    from antlr4 import CommonTokenStream, InputStream
    from antlr4.error.ErrorListener import ErrorListener
    from hydra.grammar.gen.OverrideLexer import OverrideLexer
    from hydra.grammar.gen.OverrideParser import OverrideParser

    class FirstError(ErrorListener):
        column: int | None = None
        reason = ""

        def syntaxError(self, recognizer, offending_symbol, line, column, msg, e):
            if self.column is None:
                self.column, self.reason = column, msg

    first = FirstError()
    lexer = OverrideLexer(InputStream(override))
    parser = OverrideParser(CommonTokenStream(lexer))
    for recognizer in (lexer, parser):
        recognizer.removeErrorListeners()
        recognizer.addErrorListener(first)
    parser.override()
    where, at = "", first.column if first.column is not None else len(override)
    if at < len(override):
        where = f" at character {at + 1} ({override[at]!r})"
    elif first.column is not None:
        where = " at its end"
    key, eq, value = override.partition("=")
    if eq and at < len(key):
        fix = "a key is letters, digits and _-./@ (ask for the keys with --cfg job)"
    elif eq and '"' not in value:
        fix = f"quote the value so that it is taken as a plain string: '{key}=\"{value}\"'"
    elif eq and "'" not in value:
        fix = f"quote the value so that it is taken as a plain string: \"{key}='{value}'\""
    else:
        fix = "write it as KEY=VALUE, quoting a value that holds special characters"
    return (f"cannot parse the override {override}{where}: {first.reason or 'not valid override syntax'}; {fix} "
            f"(the grammar: https://hydra.cc/docs/advanced/override_grammar/basic/)")


def to_object(cfg, schema: type | None = None):
    """A composed config as its typed dataclass (or `schema`'s, merged first), with a missing
    mandatory value (`???`, e.g. data=text without data.source) as a one-line ConfigError."""
    from omegaconf import OmegaConf
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
        elif isinstance(value, dict) and isinstance(schema[key], dict):
            unknown += _unknown_keys(value, schema[key], f"{prefix}{key}.")
    return unknown


def exit_with_error(exc: BaseException) -> None:
    print(f"error: {one_line(exc)}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def user_errors():
    """Inside a Hydra task or callback: a UserError ends the process with its one line. (Hydra would
    log it with a traceback from a task, and only warn about it from a callback.)"""
    try:
        yield
    except UserError as e:
        exit_with_error(e)


def show_planned_config(config_name: str, plan: Callable, argv: list[str]) -> bool:
    """`--cfg job|hydra|all` (with --package, --resolve) as Hydra prints it, but of the config
    that would run: composed, then planned by `plan` (e.g. resume=<run dir> puts the run's own
    config in place), as the run itself does. Returns False, printing nothing, for any other
    command line (a sweep's, or one that is not a --cfg request)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf, open_dict

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # not Hydra's flags: Hydra answers them
        return False
    if not args.cfg or args.help or args.hydra_help or args.info:
        return False
    if args.multirun:
        raise ConfigError("--cfg shows the config of one run, and -m/--multirun asks for a sweep: drop -m to see a "
                          "job's config (give the job's values), or drop --cfg to launch the sweep")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=config_name):
        cfg = compose(config_name, overrides=args.overrides, return_hydra_config=True)
    plan(cfg)
    if args.cfg == "job":
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    elif args.cfg == "hydra":
        cfg = OmegaConf.masked_copy(cfg, ["hydra"])
    shown = cfg if args.package in (None, "_global_") else OmegaConf.select(cfg, args.package)
    if shown is None:
        raise ConfigError(f"--package {args.package}: no such key in the config")
    if not OmegaConf.is_config(shown):
        print(shown)
        return True
    if args.package not in (None, "_global_"):
        print(f"# @package {args.package}")
    if args.resolve:
        with open_dict(shown):
            OmegaConf.resolve(shown)
    sys.stdout.write(OmegaConf.to_yaml(shown))
    return True


def hydra_entrypoint(task: Callable[[], None], config_name: str | None = None, plan: Callable | None = None,
                     nanogpt_script: str | None = None) -> Callable[[], None]:
    """Wrap a @hydra.main function so user mistakes end in one line on stderr and exit status 2.

    Hydra prints composition errors over several lines; we ask it to raise instead
    (HYDRA_FULL_ERROR) and print them condensed. A user who sets HYDRA_FULL_ERROR=1 still gets
    the full traceback. With `plan` (a function that plans a composed config in place, as the run
    does), `--cfg` shows the config that would run (`show_planned_config`). A nanoGPT habit on the
    command line (`--max_iters=100`, `compile=False` for nanoGPT's `nanogpt_script`) is answered
    with the spelling that works here, before Hydra's argparse prints its usage.
    """

    @functools.wraps(task)
    def run() -> None:
        from hydra.errors import HydraException

        user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            from nanogpt.from_nanogpt import check_argv

            check_argv(sys.argv[1:], nanogpt_script)
            register_configs()
            if plan is None or not show_planned_config(config_name, plan, sys.argv[1:]):
                task()
        except (UserError, HydraException) as e:  # composition errors are HydraExceptions
            if user_wants_traceback:
                raise
            from nanogpt.sweep import site_needs_slurm

            exit_with_error(site_needs_slurm(e) or e)
        finally:
            if not user_wants_traceback:
                os.environ.pop("HYDRA_FULL_ERROR", None)

    return run
