"""The optimizer and the learning-rate schedule, built from the optim group."""

from __future__ import annotations

import math

import torch

from nanogpt.config import OptimConfig, Schedule


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW with nanoGPT's two groups: weight decay on every parameter of 2 or more dimensions
    (matmul weights, embeddings), none on 1-D ones (biases, LayerNorm gains), which only shift or
    scale and gain nothing from being pulled to zero."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda" if cfg.fused is None else cfg.fused  # the fused kernel is CUDA-only
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """Linear warmup over warmup_iters, then constant or cosine decay to min_lr at decay_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == Schedule.constant:
        return cfg.lr
    if step > cfg.decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
