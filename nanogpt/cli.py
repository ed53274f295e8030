"""The command line of every entrypoint (nanogpt-train, -sample, -bench, -prepare): a user's mistake
ends in one line and exit status 2, `--cfg` shows the config that would run, and a nanoGPT habit
is answered with the spelling that works here.

Only the entrypoints import this module.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Callable

from nanogpt.config import config_dir, register_configs
from nanogpt.errors import ConfigError, UserError, exit_with_error
from nanogpt.runs.from_nanogpt import check_argv


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
            check_argv(sys.argv[1:], nanogpt_script)
            register_configs()
            if plan is None or not show_planned_config(config_name, plan, sys.argv[1:]):
                task()
        except (UserError, HydraException) as e:  # composition errors are HydraExceptions
            if user_wants_traceback:
                raise
            exit_with_error(site_needs_slurm(e) or e)
        finally:
            if not user_wants_traceback:
                os.environ.pop("HYDRA_FULL_ERROR", None)

    return run


def site_needs_slurm(error: BaseException) -> UserError | None:
    """Hydra's answer to site=NAME with a launcher that has no site (launcher=local or
    submitit_local) suggests +site=NAME, which fails again: say what a site is for instead."""
    if "Could not override 'site'" not in str(error):
        return None
    given = re.search(r"\+(site=\S+)", str(error))
    site = given.group(1) if given else "site=NAME"
    return ConfigError(f"{site} sets where SLURM jobs go (partition, account, ...), and only launcher=slurm and "
                       f"launcher=preemptible submit to SLURM: add launcher=slurm, or drop {site}")
