"""How long a run trains: max_iters, or one budget, and where the lr schedule's horizon lies.

A budget ends the run where it is spent instead of at max_iters (config.py checks that at most
one is given):

    max_tokens  tokens trained over all processes: the run ends at the last whole step within it,
                max_tokens // (global batch x block_size).
    max_flops   training FLOPs, counted as MFU counts them (model.flops_per_token: 6N + 12 L C T
                per token, the PaLM paper's appendix B, as nanoGPT's estimate_mfu): likewise,
                max_flops // (FLOPs per token x tokens per step).
    max_time    training time over all starts of the run: the optimizer steps only. Evaluation,
                checkpoint saves and start-up are not counted (the NanoGPT speedrun times its
                records the same way); a compile in the first steps is. The run ends after the step
                at which it is spent, evaluates, saves, and is done; continued with a bigger
                max_time, it counts the time already spent.

The schedule's horizon follows the budget when optim.decay_iters is max_iters (its default): a
token or FLOP budget moves it to the step the budget ends at; under a time budget the decay
(cosine, or wsd's cooldown) follows the fraction of max_time spent (optim.learning_rate_by_time).
A run continued with a bigger budget keeps the horizon it started with, as a run extended with a
bigger max_iters keeps its decay (docs/runs.md): for a full decay at the bigger budget, start a
fresh run. A decay_iters set apart from max_iters is the user's and stays where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nanogpt.config import TrainConfig, seconds
from nanogpt.errors import UserError


@dataclass(frozen=True)
class Budget:
    """What ends a run, resolved for its model and batch."""

    name: str  # max_iters | max_tokens | max_flops | max_time: the knob that ends the run
    max_steps: int | None  # the step the run ends at; None under max_time (time decides)
    max_seconds: float | None = None  # max_time, in seconds of training
    decay_follows: bool = True  # the schedule's horizon is the budget's (optim.decay_iters was max_iters)

    @property
    def by_time(self) -> bool:
        return self.max_seconds is not None

    def describe(self, config: TrainConfig, tokens_per_step: int, flops_per_token: float) -> str:
        """One log line: the budget and the step or time it ends the run at."""
        if self.name == "max_iters":
            return f"the run ends at max_iters={self.max_steps}"
        horizon = " (and so does the lr schedule's decay)" if self.decay_follows else (
            f" (the lr schedule keeps optim.decay_iters={config.optim.decay_iters}, set apart from max_iters)")
        if self.by_time:
            return f"max_time={config.max_time}: the run ends after {self.max_seconds:g} s of training{horizon}"
        tokens = self.max_steps * tokens_per_step
        return (f"{self.name}={getattr(config, self.name):g}: the run ends at step {self.max_steps} "
                f"({tokens:,} tokens, {tokens * flops_per_token:.3g} FLOPs){horizon}")


def resolve(config: TrainConfig, tokens_per_step: int, flops_per_token: float) -> Budget:
    """The budget of a run whose optimizer steps train tokens_per_step tokens (global batch x
    block_size) at flops_per_token FLOPs each. Raises UserError for a budget under one step."""
    follows = config.optim.decay_iters == config.max_iters
    if config.max_time is not None:
        return Budget("max_time", None, seconds(config.max_time), follows)
    for name, per_step, unit in (("max_tokens", tokens_per_step, "tokens"),
                                 ("max_flops", tokens_per_step * flops_per_token, "FLOPs")):
        value = getattr(config, name)
        if value is None:
            continue
        steps = int(value // per_step)
        if steps < 1:
            what = f"{per_step:,} tokens" if unit == "tokens" else f"{per_step:.4g} FLOPs ({tokens_per_step:,} tokens)"
            raise UserError(f"{name}={value:g} is less than one optimizer step, which trains {what}, global batch x "
                            f"block_size: raise {name}, or lower global_batch_size or block_size")
        return Budget(name, steps, None, follows)
    return Budget("max_iters", config.max_iters, None, True)


def check(config: TrainConfig, vocab_size: int, world_size: int) -> Budget:
    """The budget a run of config will have, resolved before its dir exists (preflight): a budget
    under one step is refused before any compute."""
    return resolve(config, *per_step(config, vocab_size, world_size))


def per_step(config: TrainConfig, vocab_size: int, world_size: int) -> tuple[int, float]:
    """The tokens of one optimizer step and the training FLOPs per token of a run of config, before
    it starts: the model is built on the meta device (no memory, no initialisation)."""
    import torch

    from nanogpt.model import GPT

    with torch.device("meta"):
        model = GPT(replace(config.model, vocab_size=config.model.vocab_size or vocab_size))
    batch = config.global_batch_size or config.batch_size * world_size  # batch_size=auto always has the former
    return batch * config.block_size, model.flops_per_token(config.block_size)
