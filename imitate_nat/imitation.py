"""The imitation module (eq 3-6) and the action-distribution regularizer (eq 7-9).

Every decoder layer l of the AT demonstrator and of the NAT learner starts with one:
    π_l(o_t) = softmax(FFN_l(o_t))                 eq 4   (the policy over n actions)
    a_t      = argmax π_l(o_t)                      eq 3   (only for inspection: not differentiable)
    u_t      = E_{a~π_l(o_t)} δ(a) = π_l(o_t) · E   eq 5   (expected action embedding)
    next     = Transfer_l(u_t + o_t)                eq 6   (TransferLayer in layers.py)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImitationModule(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_actions: int, alpha: float = 0.9):
        super().__init__()
        self.policy = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(), nn.Linear(d_ffn, n_actions))  # FFN of eq 4
        self.action_embedding = nn.Parameter(torch.randn(n_actions, d_model) * d_model ** -0.5)  # δ(a), E: n×k
        self.alpha = alpha
        # c of eq 7: the cumulative activation level of each action. It is model state (saved in the
        # state dict) but not a parameter; it starts uniform, i.e. no action is favoured yet.
        self.register_buffer("usage", torch.full((n_actions,), 1.0 / n_actions))

    def forward(self, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o: observations (B, T, d). Returns (u + o, log π) with log π of shape (B, T, n)."""
        log_pi = F.log_softmax(self.policy(o).float(), dim=-1)          # eq 4, in fp32 for stable KL/CE
        u = log_pi.exp().to(o.dtype) @ self.action_embedding.to(o.dtype)  # eq 5
        return u + o, log_pi

    @torch.no_grad()
    def update_usage(self, pi: torch.Tensor, mask: torch.Tensor) -> None:
        """eq 7: c <- α·c + (1-α)·mean_t π(o_t), the mean taken over the real (unpadded) tokens
        of the batch (the paper averages over the T' steps of one sentence)."""
        m = mask.unsqueeze(-1).to(pi.dtype)
        mean_pi = (pi * m).sum(dim=(0, 1)) / m.sum().clamp_min(1.0)
        self.usage.mul_(self.alpha).add_((1.0 - self.alpha) * mean_pi.to(self.usage.dtype))

    def regularization_loss(self, log_pi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """eq 9: L_π = KL(π' ‖ π) averaged over real tokens, π' the fixed (detached) target of eq 8.

        In training, c is first updated with this batch (eq 7), then used in eq 8."""
        if self.training:
            self.update_usage(log_pi.detach().exp(), mask)
        target = sharpened_target(log_pi.detach().exp(), self.usage)
        kl = (target * (target.clamp_min(1e-12).log() - log_pi)).sum(-1)  # eq 9
        return (kl * mask).sum() / mask.sum().clamp_min(1)


def sharpened_target(pi: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """eq 8: π'(o_t) = (π(o_t)² / c) / Σ_j (π(o_t)_j² / c_j). Squaring sharpens each row (the
    convex map favours its confident actions); dividing by c penalizes actions already in
    heavy use, which balances the assignment over the action space (Xie et al., 2016)."""
    w = pi.pow(2) / usage.clamp_min(1e-12)
    return w / w.sum(-1, keepdim=True)


def action_usage_entropy(log_pis: list[torch.Tensor], mask: torch.Tensor) -> float:
    """Entropy (nats) of the histogram of argmax actions (eq 3) over real tokens and layers:
    the 'space usage' of Figure 4. log(n) means every action is used equally."""
    counts = None
    for log_pi in log_pis:
        actions = log_pi.argmax(-1)[mask.bool()]
        c = torch.bincount(actions, minlength=log_pi.size(-1)).float()
        counts = c if counts is None else counts + c
    return usage_entropy(counts)


def usage_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of an action histogram (counts of argmax actions, eq 3)."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log()).sum())
