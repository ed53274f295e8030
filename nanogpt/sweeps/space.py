"""A search's space: each key of `search.space` as Optuna's distribution, checked against the
config it searches before anything is written (docs/search.md, "The space").

    optim.lr:      {low: 1.0e-4, high: 1.0e-2, log: true}   # a range, on a log scale
    optim.warmup_iters: {low: 0, high: 400, step: 50}       # a range on a grid (ints: the key is an int)
    model.n_embd:  {choices: [64, 96, 128]}                 # categorical: tried as given

Whether a range is of ints or floats is the key's own type in the schema, so `model.n_layer:
{low: 2, high: 8}` samples whole layers. Every value the search may try must pass the config's
own checks: the ends of each range and every choice are put into the base config and checked as
a run's config is (config.check_train_config), so an n_embd that n_head does not divide is named
now, not in the trial that draws it.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.nodes import BooleanNode, IntegerNode

from nanogpt.config import SearchConfig
from nanogpt.errors import ConfigError, UserError, one_line

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

KEYS_NOT_SEARCHED = ("search", "hydra", "resume", "reproduce")  # what a trial's value may not be


def distributions(search: SearchConfig, base: DictConfig,
                  check: Callable[[DictConfig], object]) -> dict[str, "BaseDistribution"]:
    """search.space as Optuna's distributions, in the order given. `base` is the composed config
    the trials start from; `check(config)` raises a UserError for a config a run would refuse."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not search.space:
        raise ConfigError("search.space is empty: name at least one key to search (docs/search.md, 'The space')")
    space = {}
    for key, spec in search.space.items():
        where = f"search.space.{key}"
        node = _leaf(base, key, where)
        if spec.choices is not None:
            if any(v is not None for v in (spec.low, spec.high, spec.step)) or spec.log:
                raise ConfigError(f"{where} gives both choices and a range: give choices, or low and high")
            if not spec.choices:
                raise ConfigError(f"{where}.choices is empty: list the values to try")
            if len(set(map(repr, spec.choices))) < len(spec.choices):
                raise ConfigError(f"{where}.choices={list(spec.choices)} lists a value twice: list each once")
            for value in spec.choices:
                _check_value(base, key, value, check, where)
            space[key] = CategoricalDistribution(list(spec.choices))
            continue
        if isinstance(node, BooleanNode):
            raise ConfigError(f"{where}: {key} is a true/false key: give {{choices: [true, false]}}")
        if spec.low is None or spec.high is None:
            raise ConfigError(f"{where} needs low and high (a range) or choices (categorical)")
        is_int = isinstance(node, IntegerNode)
        low, high, step = spec.low, spec.high, spec.step
        numbers = [v for v in (low, high, step) if v is not None]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise ConfigError(f"{where}: low, high and step must be finite numbers")
        if is_int and not all(float(v).is_integer() for v in numbers):
            raise ConfigError(f"{where}: {key} is an int, and low={low}, high={high}, step={step} are not all whole "
                              f"numbers: give whole numbers, or choices")
        if low > high:
            raise ConfigError(f"{where}: low={low} is above high={high}: swap them")
        if spec.log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, and low={low}: raise low (e.g. {key} from "
                              f"{high / 100:g}), or drop log: true")
        if spec.log and step is not None:
            raise ConfigError(f"{where}: a range is on a log scale or on a grid of step, not both: drop one")
        if step is not None and step <= 0:
            raise ConfigError(f"{where}: step={step} must be positive")
        for value in (low, high):
            _check_value(base, key, int(value) if is_int else float(value), check, where)
        if is_int:
            space[key] = IntDistribution(int(low), int(high), log=spec.log, step=int(step or 1))
        else:
            space[key] = FloatDistribution(float(low), float(high), log=spec.log,
                                           step=None if step is None else float(step))
    return space


def check_enqueued(search: SearchConfig, space: dict[str, "BaseDistribution"]) -> None:
    """Each set of params in search.enqueue names keys of the space, with values it holds."""
    for i, params in enumerate(search.enqueue):
        where = f"search.enqueue[{i}]"
        for key, value in params.items():
            if key not in space:
                raise ConfigError(f"{where}: {key} is not in search.space ({', '.join(space)}): enqueue values of "
                                  f"the searched keys only")
            distribution = space[key]
            try:
                inside = distribution._contains(distribution.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if not inside:
                raise ConfigError(f"{where}: {key}={value} is outside search.space.{key}: enqueue a value it holds")


def grid(search: SearchConfig, space: dict[str, "BaseDistribution"]) -> dict[str, list]:
    """The values of each key for sampler=grid: the choices, or a range with a step (ints: step 1)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    values = {}
    for key, distribution in space.items():
        if isinstance(distribution, CategoricalDistribution):
            values[key] = list(distribution.choices)
        elif isinstance(distribution, IntDistribution) and not distribution.log:
            values[key] = list(range(distribution.low, distribution.high + 1, distribution.step))
        elif getattr(distribution, "step", None) is not None:
            count = round((distribution.high - distribution.low) / distribution.step)
            values[key] = [distribution.low + i * distribution.step for i in range(count + 1)]
        else:
            raise ConfigError(f"search.space.{key}: sampler=grid tries every value, and a continuous range has no end "
                              f"of them: give choices, or a step")
    return values


def override(key: str, value: Any) -> str:
    """key=value as a command-line override that gives exactly this value."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{key}={value!r}"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{text}'"


def _leaf(base: DictConfig, key: str, where: str):
    """The node of a searched key: a value of the config, not a group or another search setting."""
    if key.split(".")[0] in KEYS_NOT_SEARCHED:
        raise ConfigError(f"{where}: {key} belongs to the command, not to a trial: search the training's keys")
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(base, parent_key) if parent_key else base
    node = parent._get_node(name) if isinstance(parent, DictConfig) and name in parent else None
    if node is None:
        raise ConfigError(f"{where}: {key} is not a config key: check the spelling; --cfg job lists every key")
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        raise ConfigError(f"{where}: {key} is a section of the config, not a value: search its keys "
                          f"({key}.{next(iter(node), 'x') if isinstance(node, DictConfig) else '0'}, ...)")
    return node


def _check_value(base: DictConfig, key: str, value: Any, check: Callable[[DictConfig], object], where: str) -> None:
    """The base config with key=value passes the checks a run makes of its config."""
    config = copy.deepcopy(base)
    try:
        with open_dict(config):
            OmegaConf.update(config, key, value, merge=False)
        check(config)
    except UserError as e:
        raise ConfigError(f"{where}: {key}={value} fails the config's checks: {str(e).rstrip('.')}; drop it from "
                          f"the search") from e
    except Exception as e:  # OmegaConf's: a value of the wrong type for the key
        if type(e).__module__.startswith("omegaconf"):
            raise ConfigError(f"{where}: {key}={value} is not a value of {key}: {one_line(e)}") from e
        raise
