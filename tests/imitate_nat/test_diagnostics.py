"""imitate_nat.diagnostics: the measurements `imitate-orch diagnose` reports, checked against
their definitions and against the training losses they mirror."""
from __future__ import annotations

import math

import torch

from imitate_nat import ATDemonstrator, NATLearner, preset
from imitate_nat.data import make_batch
from imitate_nat.decode import beam_search
from imitate_nat.diagnostics import entropy_of, imitation_diagnostics, mutual_information, zeroed_actions
from imitate_nat.losses import demonstrator_policies, imitation_loss


def tiny(**kw):
    return preset("tiny", vocab_size=24, n_actions=8, max_positions=32, dropout=0.0, **kw)


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (3, 2):
        src = [torch.randint(4, 24, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
        tgt = [torch.randint(4, 24, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
        out.append(make_batch(src, tgt))
    return out


def test_mutual_information_and_entropy_match_their_definitions():
    y = torch.tensor([0, 1, 2, 3] * 50)
    assert math.isclose(entropy_of(y), math.log(4), rel_tol=1e-9)
    assert math.isclose(mutual_information(y + 10, y), math.log(4), rel_tol=1e-9)   # a determines y
    assert abs(mutual_information(torch.tensor([0, 0, 1, 1] * 50), torch.tensor([0, 1, 0, 1] * 50))) < 1e-12
    # By hand: p(a, y) = [[.5, 0], [.25, .25]] -> I = .5 log 2 + .25 log(.5) + .25 log(.5 / .25) ... in sum:
    a, yy = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])
    pj, pa, py = {(0, 0): .5, (1, 0): .25, (1, 1): .25}, {0: .5, 1: .5}, {0: .75, 1: .25}
    expected = sum(p * math.log(p / (pa[i] * py[j])) for (i, j), p in pj.items())
    assert math.isclose(mutual_information(a, yy), expected, rel_tol=1e-9)


def test_zeroed_actions_is_the_demonstrator_with_no_action_embedding():
    torch.manual_seed(1)
    at = ATDemonstrator(tiny()).eval()
    plain = ATDemonstrator(tiny()).eval()
    plain.load_state_dict(at.state_dict())
    with torch.no_grad():
        for m in plain.decoder.imitations:
            m.action_embedding.zero_()     # u = π · 0 = 0
    b = _batches()[0]
    with torch.no_grad(), zeroed_actions(at):
        hooked, _ = at(b.src, b.tgt_in)
        hooked_beam = beam_search(at, b.src, beam_size=2)
    with torch.no_grad():
        assert torch.allclose(hooked, plain(b.src, b.tgt_in)[0], atol=1e-5)
        assert hooked_beam == beam_search(plain, b.src, beam_size=2)
        assert not torch.allclose(at(b.src, b.tgt_in)[0], hooked, atol=1e-4)   # the hooks are gone after


def test_diagnostics_cross_entropy_is_the_imitation_loss_and_kl_is_never_negative():
    torch.manual_seed(2)
    at = ATDemonstrator(tiny()).eval()
    nat = NATLearner(tiny()).eval()
    nat.init_from_at(at)
    with torch.no_grad():                  # a student whose policies moved away from the demonstrator's
        for p in nat.decoder.imitations.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    bare = NATLearner(tiny(imitation_modules=False)).eval()
    batches = _batches()
    r = imitation_diagnostics(at, {"imitating": nat, "bare": bare}, batches)
    L = at.cfg.dec_layers
    tokens = sum(int(b.tgt.ne(0).sum()) for b in batches)
    assert r["tokens"] == tokens and r["students"]["bare"] == {"imitation_modules": False}
    s = r["students"]["imitating"]
    assert all(len(x) == L for x in (s["cross_entropy"], s["kl"], s["argmax_agreement"], r["at"]["u_over_o"]))
    assert all(k >= -1e-6 for k in s["kl"]) and any(k > 1e-3 for k in s["kl"])
    assert all(0 < h <= math.log(8) + 1e-6 for h in r["at"]["policy_entropy"])
    # Σ_l H(π_AT, π_NAT) averaged over tokens is L_IL (eq 12-13) over the same tokens, with the
    # same alignment of AT and NAT positions as training uses.
    with torch.no_grad():
        total, n = 0.0, 0
        for b in batches:
            keep = b.tgt.ne(0)
            _, nat_pis, _ = nat(b.src, keep.sum(1))
            total += float(imitation_loss(demonstrator_policies(at, b), nat_pis, keep.float(), "sum"))
            n += int(keep.sum())
    assert math.isclose(sum(s["cross_entropy"]), total / n, rel_tol=1e-4)
    # With u = 0 the actions change nothing, and the ratio says so.
    with torch.no_grad():
        for m in at.decoder.imitations:
            m.action_embedding.zero_()
    assert imitation_diagnostics(at, {}, batches)["at"]["u_over_o"] == [0.0] * L
