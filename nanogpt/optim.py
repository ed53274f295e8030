"""The optimizer and the learning-rate schedule, built from the optim group.

optim.name=adamw is nanoGPT's AdamW. optim.name=muon is the NanoGPT speedrun's split: Muon
(torch.optim.Muon: momentum, then the update orthogonalised by Newton-Schulz iterations) for the
2-D matrices inside the blocks, and AdamW for what Muon is not meant for, the embeddings, the
output head, norm gains and biases, each with its own learning rate. The two live in one
torch.optim.Optimizer, so checkpoints, gradient scaling and FSDP see one optimizer.

Every param group carries `lr_scale`, its lr relative to optim.lr: the schedule moves all of them
by the same factor.
"""

from __future__ import annotations

import math

import torch

from nanogpt.config import OptimConfig, Schedule


def fused_adamw_devices() -> tuple[str, ...]:
    """The device types PyTorch has a fused AdamW kernel for (CPU, CUDA and MPS in torch 2.4+)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch that moved it: the devices of torch 2.4
        return ("cpu", "cuda", "mps")
    return tuple(_get_fused_kernels_supported_devices())


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    # The fused kernel updates every parameter in one pass (nanoGPT uses it on CUDA only). On an idle
    # 2-core CPU the default recipe's AdamW step took 1.87 ms as foreach ops and 0.65 ms fused, of a
    # ~33 ms step. Its results differ from foreach's in the last bit of float32 (the same math, fused
    # into one expression).
    fused = device_type in fused_adamw_devices() if cfg.fused is None else cfg.fused
    adamw_options = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **({"fused": True} if fused else {}))
    if cfg.name == "muon":
        return MuonWithAdamW(model, cfg, adamw_options)
    # nanoGPT's two groups: weight decay on every parameter of 2 or more dimensions (matmul weights,
    # embeddings), none on 1-D ones (biases, LayerNorm gains), which only shift or scale and gain
    # nothing from being pulled to zero.
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, **adamw_options)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the blocks' matrices, AdamW for the rest: one optimizer whose param groups are the
    two inner optimizers' own (the same dicts) and whose state they share, so state_dict() and
    load_state_dict() cover both."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, adamw_options: dict):
        matrices, embeddings, head, scalars = [], [], [], []
        for name, p in model.named_parameters():  # a tied head is the token embedding: listed once
            if not p.requires_grad:
                continue
            if p.dim() < 2:
                scalars.append(p)
            elif name.startswith("lm_head."):
                head.append(p)
            elif ".wte." in f".{name}" or ".wpe." in f".{name}":
                embeddings.append(p)
            else:
                matrices.append(p)

        def scale(lr):
            return (cfg.lr if lr is None else lr) / cfg.lr

        adamw_groups = [
            {"params": embeddings, "weight_decay": cfg.weight_decay, "lr_scale": scale(cfg.embed_lr)},
            {"params": head, "weight_decay": cfg.weight_decay, "lr_scale": scale(cfg.head_lr)},
            {"params": scalars, "weight_decay": 0.0, "lr_scale": scale(cfg.scalar_lr)},
        ]
        muon_groups = [{"params": matrices, "weight_decay": cfg.muon_weight_decay, "lr_scale": scale(cfg.muon_lr)}]
        adamw_groups = [g for g in adamw_groups if g["params"]]
        for group in adamw_groups + muon_groups:
            group["lr"] = cfg.lr * group["lr_scale"]
        self.adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, **adamw_options)
        self.muon = torch.optim.Muon(muon_groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                                    ns_steps=cfg.muon_ns_steps)
        super().__init__(self.adamw.param_groups + self.muon.param_groups, defaults={})
        self._share_state()

    def _share_state(self) -> None:
        n = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces the group dicts and the state: share them again
        self._share_state()

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        self.adamw.step()
        self.muon.step()


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig, lr: float | None = None) -> float:
    """Set every group's lr for this step; returns optim.lr's value (the one logged). lr: that value,
    where the caller's schedule computed it (learning_rate_by_time); None: learning_rate's."""
    lr = learning_rate(step, cfg) if lr is None else lr
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """Linear warmup over warmup_iters, then constant, cosine decay to min_lr at decay_iters, or
    warmup-stable-decay: lr until the last cooldown_fraction of decay_iters, then linear to min_lr."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == Schedule.constant:
        return cfg.lr
    if step > cfg.decay_iters:
        return cfg.min_lr
    if cfg.schedule == Schedule.wsd:
        cooldown_start = cfg.decay_iters * (1 - cfg.cooldown_fraction)
        if step < cooldown_start:
            return cfg.lr
        progress = (step - cooldown_start) / max(1e-9, cfg.decay_iters - cooldown_start)
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def learning_rate_by_time(step: int, spent: float, warmup_spent: float, cfg: OptimConfig) -> float:
    """learning_rate under a time budget (nanogpt/runs/budgets.py): the warmup still counts steps, and
    the decay follows `spent`, the fraction of max_time trained so far (0 to 1), where learning_rate's
    follows step / decay_iters: cosine from the fraction at which the warmup ended (warmup_spent) to
    min_lr at 1, or wsd's lr until the last cooldown_fraction of the time, then linear to min_lr."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == Schedule.constant:
        return cfg.lr
    if spent >= 1:  # the time is spent (a run continued with more goes on at min_lr, as past decay_iters)
        return cfg.min_lr
    spent = max(spent, 0.0)
    if cfg.schedule == Schedule.wsd:
        cooldown_start = 1 - cfg.cooldown_fraction
        if spent < cooldown_start:
            return cfg.lr
        return cfg.lr + (spent - cooldown_start) / cfg.cooldown_fraction * (cfg.min_lr - cfg.lr)
    if warmup_spent >= 1:  # the warmup took the whole budget
        return cfg.min_lr
    progress = max(0.0, (spent - warmup_spent) / (1 - warmup_spent))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def schedule_warnings(cfg: OptimConfig, max_iters: int, length: str | None = None) -> list[str]:
    """Where the schedule does not fit a run of max_iters steps, one line each (none: it fits).

    Warnings, not errors: a smoke test of a few steps may well mean its warmup. What they report
    changes what a run, or a sweep over optim.lr or max_iters, compares: an lr that never reaches
    optim.lr, one that drops from it at once because the decay ends (wsd: its cooldown starts)
    before the warmup does, or one that never decays to min_lr. A decay that ends before max_iters
    is no mistake: the run goes on at min_lr, as nanoGPT's schedule does and as a run extended on
    resume (which keeps the decay it started with) should. The caller warns at a run's first start."""
    if max_iters < 1:
        return []
    length = length or f"max_iters={max_iters}"  # what sets the run's length: a budget names itself
    last = max_iters - 1  # the 0-based step of the last update, logged as `iter {max_iters}`
    warmup, decay = cfg.warmup_iters, cfg.decay_iters
    if warmup >= max_iters:  # the run ends inside its warmup: nothing after it happens
        reached = learning_rate(last, cfg)
        return [f"optim.warmup_iters={warmup} is not shorter than the run ({length}): the lr never "
                f"reaches optim.lr={cfg.lr:g} and ends at {reached:.3g} ({reached / cfg.lr:.0%} of it), so runs that "
                f"differ in optim.lr or max_iters differ in how far they warmed up too; set optim.warmup_iters below "
                f"max_iters (e.g. optim.warmup_iters={max_iters // 20}: 5% of the run, as in nanoGPT's recipes)"]
    if cfg.schedule == Schedule.constant:
        return []
    if cfg.schedule == Schedule.wsd:
        cooldown_start = decay * (1 - cfg.cooldown_fraction)
        if cooldown_start < warmup:
            fix = ("lower optim.cooldown_fraction" if cfg.cooldown_fraction == 1 else
                   f"set optim.decay_iters to at least {math.ceil(warmup / (1 - cfg.cooldown_fraction))}")
            return [f"optim.decay_iters={decay} starts its cooldown (the last optim.cooldown_fraction="
                    f"{cfg.cooldown_fraction:g} of it) at step {cooldown_start:g}, before the warmup of "
                    f"optim.warmup_iters={warmup} ends: the lr climbs towards optim.lr={cfg.lr:g}, then drops at once "
                    f"to {learning_rate(warmup, cfg):.3g} at iter {warmup + 1}; {fix}, or lower optim.warmup_iters"]
    elif decay <= warmup and max(warmup, decay + 1) <= last:  # cosine: min_lr from the first step after decay_iters
        drop = max(warmup, decay + 1)
        return [f"optim.decay_iters={decay} ends the decay no later than the warmup of optim.warmup_iters={warmup}: the "
                f"lr climbs towards optim.lr={cfg.lr:g}, then drops at once to optim.min_lr={cfg.min_lr:g} at iter "
                f"{drop + 1}; set optim.decay_iters above {warmup} (by default it is max_iters), or lower "
                f"optim.warmup_iters"]
    if decay > max_iters:
        return [f"optim.decay_iters={decay} is beyond the run's end ({length}): the lr never decays to "
                f"optim.min_lr={cfg.min_lr:g} and ends at {learning_rate(last, cfg):.3g}; set "
                f"optim.decay_iters={max_iters} (by default it is max_iters), unless the run is to be extended"]
    return []
