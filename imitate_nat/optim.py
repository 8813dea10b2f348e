"""Optimizer and learning-rate schedule (Vaswani et al.: linear warm-up, then 1/sqrt(step))."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to peak_lr over warmup_steps, then inverse-sqrt decay. step counts from 1."""
    step = max(step, 1)
    if warmup_steps <= 0:
        return peak_lr
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * math.sqrt(warmup_steps / step)


def make_optimizer(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    # betas/eps of the Transformer paper; AdamW so weight decay (if any) is decoupled.
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=(0.9, 0.98), eps=1e-9,
                             weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
