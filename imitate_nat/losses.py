"""Training objectives: L*_AT (eq 14) and L*_NAT (eq 15), with their pieces.

Normalization: every term is averaged over real target tokens (the cross-entropy as usual,
L_π and L_IL likewise, summed over decoder layers), so λ1 and λ2 weigh per-token quantities
against a per-token cross-entropy, as the paper's sums over t do against the sums of eq 1 and 2.
The paper does not say how it normalized; LossConfig.il_reduction = "sum" sums L_IL over the
batch's real tokens instead (the cross-entropy stays a mean), the other reading of its λ2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .at import ATDemonstrator
from .config import LossConfig
from .data import Batch
from .nat import NATLearner


def unwrap(model):
    """The model behind a DDP or DeepSpeed wrapper (forward goes through the wrapper, so
    gradients are synchronized; attributes are read from the model itself)."""
    return getattr(model, "module", model)


def label_smoothed_ce(logits: torch.Tensor, target: torch.Tensor, pad_id: int, eps: float):
    """The token negative log-likelihood of eq 1 (L_AT) and eq 2 (L_NAT), label-smoothed.
    Returns (label-smoothed loss, plain NLL), both averaged over non-pad targets."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    keep = target.ne(pad_id)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.mean(-1)
    loss = (1.0 - eps) * nll + eps * smooth
    n = keep.sum().clamp_min(1)
    return (loss * keep).sum() / n, (nll * keep).sum() / n


def token_accuracy(logits: torch.Tensor, target: torch.Tensor, pad_id: int) -> float:
    keep = target.ne(pad_id)
    return float((logits.argmax(-1).eq(target) & keep).sum() / keep.sum().clamp_min(1))


def imitation_loss(at_log_pis: list[torch.Tensor], nat_log_pis: list[torch.Tensor], mask: torch.Tensor,
                   reduction: str = "mean"):
    """eq 12: L_IL = Σ_l H(π_AT, π_NAT), by eq 13 = -Σ_l E_{π_AT}[log π_NAT], averaged over real
    tokens ("mean") or summed over them ("sum"). π_AT is a fixed target: no gradient flows into
    the demonstrator."""
    n = mask.sum().clamp_min(1) if reduction == "mean" else 1
    total = 0.0
    for at_lp, nat_lp in zip(at_log_pis, nat_log_pis, strict=True):
        h = -(at_lp.detach().exp() * nat_lp).sum(-1)  # eq 13: -E_{π_AT}[log π_NAT] per position
        total = total + (h * mask).sum() / n
    return total


def at_loss(at: ATDemonstrator, batch: Batch, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """eq 14: L*_AT = L_AT + λ1 · Σ_l L_π^l. In training mode this also updates each layer's c (eq 7)."""
    logits, log_pis = at(batch.src, batch.tgt_in)
    core = unwrap(at)
    pad_id = core.cfg.pad_id
    ce, nll = label_smoothed_ce(logits, batch.tgt_out, pad_id, cfg.label_smoothing)  # L_AT, eq 1
    mask = batch.tgt_out.ne(pad_id).float()
    reg = sum(m.regularization_loss(lp, mask) for m, lp in zip(core.imitation_modules(), log_pis))
    loss = ce + cfg.lambda1 * reg
    return loss, {"loss": loss.item(), "nll": nll.item(), "action_reg": float(reg.detach()),
                  "acc": token_accuracy(logits, batch.tgt_out, pad_id)}


@torch.no_grad()
def demonstrator_policies(at: ATDemonstrator, batch: Batch) -> list[torch.Tensor]:
    """π_AT of the frozen demonstrator, teacher-forced on (X, Y*). Its position t reads BOS y<t and
    is aligned with NAT position t; the last AT position (predicting EOS) has no NAT partner."""
    was_training = at.training
    at.eval()  # frozen: no dropout, and no update of its action usage c
    log_pis = at.policies(batch.src, batch.tgt_in)
    at.train(was_training)
    T = batch.tgt.size(1)
    return [lp[:, :T] for lp in log_pis]


def nat_loss(nat: NATLearner, batch: Batch, cfg: LossConfig, demonstrator: ATDemonstrator | None = None):
    """eq 15: L*_NAT = L_NAT + λ2 · L_IL, plus the weighted target-length loss."""
    core = unwrap(nat)
    pad_id = core.cfg.pad_id
    tgt_keep = batch.tgt.ne(pad_id)
    lengths = tgt_keep.sum(1)
    logits, log_pis, len_logits = nat(batch.src, lengths)
    ce, nll = label_smoothed_ce(logits, batch.tgt, pad_id, cfg.label_smoothing)  # L_NAT, eq 2
    len_loss = F.cross_entropy(len_logits.float(), core.length_targets(batch.src.ne(pad_id), lengths))
    loss = ce + cfg.length_weight * len_loss
    stats = {"nll": nll.item(), "length_loss": len_loss.item(), "acc": token_accuracy(logits, batch.tgt, pad_id)}
    if cfg.imitation:
        if demonstrator is None:
            raise ValueError("imitation is on but no AT demonstrator was given")
        if not core.cfg.imitation_modules:
            raise ValueError("imitation is on but the NAT has no imitation modules to imitate with")
        il = imitation_loss(demonstrator_policies(demonstrator, batch), log_pis, tgt_keep.float(), cfg.il_reduction)
        loss = loss + cfg.lambda2 * il
        stats["imitation"] = il.item()
    stats["loss"] = loss.item()
    return loss, stats
