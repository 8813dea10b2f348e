"""Does imitation work here? Teacher-forced measurements of the demonstrator's actions and of
how closely a student's policies follow them (the questions behind the paper's Table 2).

On (X, Y*) with the AT teacher-forced (its position t reads BOS y<t, the NAT's position t
copies the source; both predict y_t), per decoder layer l and averaged over real target tokens:
- H(π_AT)            how decided the demonstrator's policy is (log n: uniform, 0: one action);
- H(π_AT, π_NAT)     the imitation loss of eq 12-13 for that layer, and
  KL(π_AT ‖ π_NAT)   = H(π_AT, π_NAT) − H(π_AT): how far the student is from imitating;
- agreement          how often the two policies' argmax actions (eq 3) are the same;
- ‖u‖ / ‖o‖          the size of the expected action embedding (eq 5) against the observation
                     it is added to (eq 6): near 0, the actions barely change the decoder;
- I(a; y)            mutual information (nats) between the argmax action and the target token,
                     plug-in estimate from the counts, beside the same estimate with the tokens
                     shuffled (the estimator's bias with few tokens per (action, token) cell)
                     and H(y): whether actions carry information about what is generated.
`zeroed_actions` decodes the demonstrator with u = 0 in every layer: its BLEU drop says how
much the AT itself relies on the actions.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from .at import ATDemonstrator
from .data import Batch
from .nat import NATLearner


def mutual_information(a: torch.Tensor, y: torch.Tensor) -> float:
    """Plug-in I(a; y) in nats from paired integer samples (1-D tensors of one length)."""
    n = a.numel()
    if n == 0:
        return 0.0
    _, a_idx = torch.unique(a, return_inverse=True)
    _, y_idx = torch.unique(y, return_inverse=True)
    width = int(y_idx.max()) + 1
    joint, counts = torch.unique(a_idx * width + y_idx, return_counts=True)
    pa = torch.bincount(a_idx).double() / n
    py = torch.bincount(y_idx).double() / n
    pj = counts.double() / n
    return float((pj * (pj.log() - pa[joint // width].log() - py[joint % width].log())).sum())


def entropy_of(samples: torch.Tensor) -> float:
    """Plug-in entropy (nats) of integer samples."""
    p = torch.unique(samples, return_counts=True)[1].double() / max(samples.numel(), 1)
    return float(-(p * p.log()).sum())


@contextlib.contextmanager
def zeroed_actions(model):
    """Within the block every imitation module adds u = 0 (its policy is still computed):
    `Transfer_l(o)` instead of eq 6's `Transfer_l(u + o)`."""
    hooks = [m.register_forward_hook(lambda _m, args, out: (args[0], out[1])) for m in model.decoder.imitations]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _action_sizes(at: ATDemonstrator, sink: list):
    """Collects (‖u‖, ‖o‖) per position of every imitation module's forward, in layer order."""
    def hook(_m, args, out):
        o = args[0]
        sink.append(((out[0] - o).float().norm(dim=-1), o.float().norm(dim=-1)))
    hooks = [m.register_forward_hook(hook) for m in at.decoder.imitations]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def imitation_diagnostics(at: ATDemonstrator, students: dict[str, NATLearner], batches: Iterable[Batch],
                          seed: int = 0) -> dict:
    """The measurements above on `batches` (on the models' device). Students without imitation
    modules get no policy rows. Returns a JSON-able dict with per-layer lists."""
    at.eval()
    for nat in students.values():
        nat.eval()
    L, pad = at.cfg.dec_layers, at.cfg.pad_id
    h_at, u_norm, ratio = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64), \
        torch.zeros(L, dtype=torch.float64)
    imitating = {k: nat for k, nat in students.items() if nat.cfg.imitation_modules}
    ce = {k: torch.zeros(L, dtype=torch.float64) for k in imitating}
    agree = {k: torch.zeros(L, dtype=torch.float64) for k in imitating}
    actions, targets, tokens = [[] for _ in range(L)], [], 0
    for batch in batches:
        T = batch.tgt.size(1)
        keep = batch.tgt.ne(pad)
        sizes: list = []
        with _action_sizes(at, sizes):
            _, at_pis = at(batch.src, batch.tgt_in)
        at_pis = [lp[:, :T] for lp in at_pis]    # position T (EOS) has no NAT partner
        tokens += int(keep.sum())
        targets.append(batch.tgt[keep].cpu())
        for l, lp in enumerate(at_pis):
            h_at[l] += float((-(lp.exp() * lp).sum(-1))[keep].sum())
            u, o = sizes[l][0][:, :T], sizes[l][1][:, :T]
            u_norm[l] += float(u[keep].sum())
            ratio[l] += float((u / o.clamp_min(1e-12))[keep].sum())
            actions[l].append(lp.argmax(-1)[keep].cpu())
        for name, nat in imitating.items():
            _, nat_pis, _ = nat(batch.src, keep.sum(1))
            for l, (a_lp, n_lp) in enumerate(zip(at_pis, nat_pis, strict=True)):
                ce[name][l] += float((-(a_lp.exp() * n_lp).sum(-1))[keep].sum())
                agree[name][l] += float((a_lp.argmax(-1) == n_lp.argmax(-1))[keep].sum())
    if tokens == 0:
        raise ValueError("no target tokens to measure on")
    y = torch.cat(targets)
    shuffled = y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))]
    per_layer = lambda t: [round(float(v) / tokens, 6) for v in t]   # noqa: E731
    out = {"tokens": tokens, "n_actions": at.cfg.n_actions, "target_entropy": entropy_of(y),
           "at": {"policy_entropy": per_layer(h_at), "u_norm": per_layer(u_norm), "u_over_o": per_layer(ratio),
                  "mi_action_token": [mutual_information(torch.cat(a), y) for a in actions],
                  "mi_action_token_shuffled": [mutual_information(torch.cat(a), shuffled) for a in actions],
                  "action_entropy": [entropy_of(torch.cat(a)) for a in actions]},
           "students": {}}
    for name in students:
        if name not in imitating:
            out["students"][name] = {"imitation_modules": False}
            continue
        cross = per_layer(ce[name])
        out["students"][name] = {"imitation_modules": True, "cross_entropy": cross,
                                 "kl": [round(c - h, 6) for c, h in zip(cross, out["at"]["policy_entropy"])],
                                 "argmax_agreement": per_layer(agree[name])}
    return out
