"""The paper's equations, one test (or more) each, on hand-made or seeded inputs."""
import math

import pytest
import torch

from imitate_nat import ATDemonstrator, LossConfig, NATLearner, preset
from imitate_nat.data import make_batch
from imitate_nat.imitation import ImitationModule, action_usage_entropy, sharpened_target
from imitate_nat.losses import at_loss, demonstrator_policies, imitation_loss, nat_loss
from imitate_nat.nat import Encoded, soft_copy_weights, uniform_copy_index


def tiny(**kw):
    return preset("tiny", vocab_size=40, dropout=0.0, **kw)


def toy_batch(seed=0, n=6, vocab=40):
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randint(4, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    tgts = [torch.randint(4, vocab, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return make_batch(srcs, tgts)


# ---- eq 3-5: policy and expected action embedding --------------------------------------------
def test_eq4_policy_is_a_distribution_and_eq5_u_is_pi_times_E():
    torch.manual_seed(0)
    m = ImitationModule(d_model=8, d_ffn=16, n_actions=5)
    o = torch.randn(2, 3, 8)
    out, log_pi = m(o)
    pi = log_pi.exp()
    assert torch.allclose(pi.sum(-1), torch.ones(2, 3), atol=1e-6)
    assert torch.allclose(pi, torch.softmax(m.policy(o), -1), atol=1e-6)       # eq 4
    u = torch.einsum("btn,nd->btd", pi, m.action_embedding)                      # eq 5 by hand
    assert torch.allclose(out, o + u, atol=1e-5)                                 # input to Transfer, eq 6
    # u is the expectation of δ(a): with a one-hot policy it is exactly that action's embedding
    with torch.no_grad():
        m.policy[-1].bias.copy_(torch.tensor([0, 0, 80.0, 0, 0]))
        m.policy[-1].weight.zero_()
    out, _ = m(o)
    assert torch.allclose(out - o, m.action_embedding[2].expand(2, 3, 8), atol=1e-5)


# ---- eq 7: moving average of action usage ---------------------------------------------------
def test_eq7_usage_after_two_updates_matches_hand_computation():
    m = ImitationModule(d_model=4, d_ffn=4, n_actions=3, alpha=0.9)
    c0 = torch.full((3,), 1 / 3)
    pi1 = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]])   # last position is padding
    mask1 = torch.tensor([[1.0, 1.0, 0.0]])
    pi2 = torch.tensor([[[0.2, 0.2, 0.6]], [[0.0, 1.0, 0.0]]])
    mask2 = torch.ones(2, 1)
    m.update_usage(pi1, mask1)
    m.update_usage(pi2, mask2)
    mean1 = torch.tensor([0.3, 0.2, 0.5])            # (0.5+0.1)/2, (0.3+0.1)/2, (0.2+0.8)/2
    mean2 = torch.tensor([0.1, 0.6, 0.3])
    c1 = 0.9 * c0 + 0.1 * mean1
    c2 = 0.9 * c1 + 0.1 * mean2
    assert torch.allclose(m.usage, c2, atol=1e-6)
    assert "usage" in m.state_dict()                 # c is model state, saved with the weights


def test_usage_is_updated_only_in_training():
    m = ImitationModule(4, 4, 3)
    log_pi = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]]))
    m.eval()
    m.regularization_loss(log_pi, torch.ones(1, 1))
    assert torch.allclose(m.usage, torch.full((3,), 1 / 3))
    m.train()
    m.regularization_loss(log_pi, torch.ones(1, 1))
    assert not torch.allclose(m.usage, torch.full((3,), 1 / 3))


# ---- eq 8: re-normalized target ---------------------------------------------------------------
def test_eq8_target_on_hand_example():
    pi = torch.tensor([[0.5, 0.3, 0.2]])
    c = torch.tensor([0.5, 0.25, 0.25])
    w = torch.tensor([0.25 / 0.5, 0.09 / 0.25, 0.04 / 0.25])   # π²/c = 0.5, 0.36, 0.16
    expected = w / w.sum()                                     # / 1.02
    got = sharpened_target(pi, c)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(1))
    assert got[0, 0] < pi[0, 0]        # the over-used action 0 loses mass …
    assert got[0, 1] > pi[0, 1]        # … to a less used one


def test_eq8_rows_sum_to_one_on_random_input():
    torch.manual_seed(1)
    pi = torch.softmax(torch.randn(4, 7, 16), -1)
    c = torch.softmax(torch.randn(16), -1)
    assert torch.allclose(sharpened_target(pi, c).sum(-1), torch.ones(4, 7), atol=1e-6)


# ---- eq 9: KL regularizer ---------------------------------------------------------------------
# The two real tokens of the hand examples below, with c = (0.5, 0.25, 0.25):
#   π = (0.5, 0.3, 0.2): π²/c = (0.5, 0.36, 0.16), sum 1.02, so π' = (25, 18, 8) / 51 and
#     KL(π' ‖ π) = 25/51·ln(50/51) + 18/51·ln(20/17) + 8/51·ln(40/51)
#                = -0.009707 + 0.057360 - 0.038109 = 0.009543
#   π = (0.6, 0.2, 0.2): π²/c = (0.72, 0.16, 0.16), sum 1.04, so π' = (9, 2, 2) / 13 and
#     KL(π' ‖ π) = 9/13·ln(15/13) + 2·(2/13)·ln(10/13) = 0.099070 - 0.080727 = 0.018342
USAGE = (0.5, 0.25, 0.25)
PI_A, KL_A = (0.5, 0.3, 0.2), 0.009543
PI_B, KL_B = (0.6, 0.2, 0.2), 0.018342


def test_eq9_kl_to_the_fixed_sharpened_target_on_hand_example():
    m = ImitationModule(d_model=4, d_ffn=4, n_actions=3).eval()  # eval: c stays as set here
    m.usage.copy_(torch.tensor(USAGE))
    logits = torch.tensor([[PI_A, PI_B, (0.1, 0.1, 0.8)]]).log().requires_grad_()  # 3rd token: padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = m.regularization_loss(torch.log_softmax(logits, -1), mask)
    assert loss.item() == pytest.approx((KL_A + KL_B) / 2, abs=1e-5)   # mean over real tokens: 0.013943
    # π' is a fixed target, so d loss / d logits = (π - π') / 2 at each real token (2 of them):
    #   ((0.5, 0.3, 0.2) - (0.490196, 0.352941, 0.156863)) / 2 = (0.004902, -0.026471, 0.021569)
    #   ((0.6, 0.2, 0.2) - (0.692308, 0.153846, 0.153846)) / 2 = (-0.046154, 0.023077, 0.023077)
    loss.backward()
    expected = torch.tensor([[[0.004902, -0.026471, 0.021569], [-0.046154, 0.023077, 0.023077], [0.0, 0.0, 0.0]]])
    assert torch.allclose(logits.grad, expected, atol=1e-5)


def test_eq8_9_division_by_usage_balances_the_action_assignment():
    """The regularizer's balancing comes from dividing by c in eq 8. Trained on the same
    observations for the same steps, the eq 8-9 regularizer ends with a far more even
    assignment of argmax actions (Figure 4's "space usage") than the same loss with the
    division removed (c held uniform: pure sharpening, which collapses onto few actions)."""
    def usage_entropy(balance: bool, seed: int) -> float:
        torch.manual_seed(seed)
        m = ImitationModule(32, 64, 16)
        o, mask = torch.randn(1, 300, 32), torch.ones(1, 300)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(60):
            _, log_pi = m(o)
            if not balance:
                m.usage.fill_(1 / 16)
                m.alpha = 1.0          # c stays uniform: eq 8 reduces to π² / Σ π²
            loss = m.regularization_loss(log_pi, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return action_usage_entropy([m(o)[1]], mask)

    for seed in range(3):
        sharpen_only, balanced = usage_entropy(False, seed), usage_entropy(True, seed)
        assert balanced > sharpen_only + 0.3, (seed, sharpen_only, balanced)


@pytest.mark.slow
def test_eq7_9_regularizer_raises_action_usage_entropy_over_a_short_training_run():
    """Figure 4's claim on a small scale: a tiny AT trained 300 steps on the synthetic language
    pair (eq 14) uses its actions more evenly with the regularizer than with λ1 = 0. λ1 = 0.01,
    10x the paper's default, makes the difference show within 300 steps; at the paper's
    λ1 = 0.001 it needs a real training run (BENCHMARKS.md)."""
    import random

    from imitate_nat.synthetic import generate_corpus

    pairs = generate_corpus(600, seed=1, vocab_words=60)
    ids = {w: i + 4 for i, w in enumerate(sorted({w for s, t in pairs for w in f"{s} {t}".split()}))}
    data = [([ids[w] for w in s.split()], [ids[w] for w in t.split()]) for s, t in pairs]
    held_out = make_batch(*zip(*data[:200]))

    def usage_entropy(lambda1: float, seed: int) -> float:
        torch.manual_seed(seed)
        rnd = random.Random(seed)
        at = ATDemonstrator(preset("tiny", vocab_size=len(ids) + 4, dropout=0.0, n_actions=32, d_model=64,
                                   n_heads=2, d_ffn=128))
        opt = torch.optim.Adam(at.parameters(), lr=2e-3)
        cfg = LossConfig(lambda1=lambda1, label_smoothing=0.0)
        for _ in range(300):
            loss, _ = at_loss(at, make_batch(*zip(*rnd.sample(data, 32))), cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        at.eval()
        with torch.no_grad():
            log_pis = at.policies(held_out.src, held_out.tgt_in)
        return action_usage_entropy(log_pis, held_out.tgt_out.ne(0))

    for seed in range(3):
        without, with_reg = usage_entropy(0.0, seed), usage_entropy(0.01, seed)
        assert with_reg > without + 0.15, (seed, without, with_reg)


# Hand-made model outputs over a 6-token vocabulary: ln 5 on the target id, 0 elsewhere, gives
# p = 5/10 = 0.5 on the target and 1/10 on each of the 5 others. Per token, with ε = 0.1:
#   NLL = ln 2 = 0.693147; smoothing term -mean_v log p = (5·ln 10 + ln 2) / 6 = 2.034345
#   label-smoothed CE = 0.9·0.693147 + 0.1·2.034345 = 0.827267
CE_TOKEN, NLL_TOKEN = 0.827267, 0.693147


def peaked_logits(targets: list[int], vocab: int = 6) -> torch.Tensor:
    logits = torch.zeros(1, len(targets), vocab)
    for t, y in enumerate(targets):
        logits[0, t, y] = math.log(5.0)
    return logits


def hand_model(cls, **kw):
    cfg = preset("tiny", **{"vocab_size": 6, "n_actions": 3, "dec_layers": 2, "dropout": 0.0, **kw})
    model = cls(cfg).eval()  # eval: no update of c, which is set by hand
    for m in model.decoder.imitations:
        m.usage.copy_(torch.tensor(USAGE))
    return model


def test_eq14_at_loss_on_hand_example():
    at = hand_model(ATDemonstrator)
    batch = make_batch([[4]], [[5]])  # tgt_in = BOS 5, tgt_out = 5 EOS: two AT positions
    log_pis = [torch.tensor([[PI_A, PI_A]]).log(), torch.tensor([[PI_B, PI_B]]).log()]  # layer 1, layer 2
    at.forward = lambda src, tgt_in: (peaked_logits([5, 3]), log_pis)
    loss, stats = at_loss(at, batch, LossConfig(label_smoothing=0.1, lambda1=0.5))
    # L_AT (eq 1) = 0.827267 per token; Σ_l L_π^l (eq 9) = 0.009543 + 0.018342 = 0.027885
    # eq 14: 0.827267 + 0.5·0.027885 = 0.841210
    assert float(loss) == pytest.approx(0.841210, abs=1e-5)
    assert stats["nll"] == pytest.approx(NLL_TOKEN, abs=1e-5)
    assert stats["action_reg"] == pytest.approx(0.027885, abs=1e-5)


# ---- eq 10-11: SoftCopy, and the UniformCopy baseline ---------------------------------------------
def test_eq10_softcopy_rows_sum_to_one_and_ignore_padding():
    keep = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    w = soft_copy_weights(keep, 6, torch.tensor(0.7))
    assert torch.allclose(w.sum(-1), torch.ones(2, 6), atol=1e-6)
    assert torch.all(w[0, :, 5:] == 0)
    # hand value: row j=0 of sentence 1: softmax(-|0-i|/0.7) over i=0..6
    e = torch.exp(-torch.arange(7.0) / 0.7)
    assert torch.allclose(w[1, 0], e / e.sum(), atol=1e-6)


def test_eq10_11_softcopy_small_tau_is_nearest_position_copy():
    torch.manual_seed(6)
    nat = NATLearner(tiny(tau_init=1e-3))
    memory = torch.randn(2, 5, nat.cfg.d_model)
    keep = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    lengths = torch.tensor([7, 4])
    y = nat.copy_inputs(Encoded(memory, keep), lengths)
    for b, S in enumerate([5, 3]):
        for j in range(int(lengths[b])):
            assert torch.allclose(y[b, j], memory[b, min(j, S - 1)], atol=1e-5)


def test_eq10_gradient_reaches_tau():
    torch.manual_seed(7)
    nat = NATLearner(tiny())
    batch = toy_batch()
    loss, _ = nat_loss(nat, batch, LossConfig(imitation=False))
    loss.backward()
    assert nat.log_tau.grad is not None and nat.log_tau.grad.abs() > 0
    assert nat.tau > 0


def test_uniform_copy_index():
    idx = uniform_copy_index(torch.tensor([4, 3]), torch.tensor([8, 2]), 8)
    assert idx[0].tolist() == [0, 0, 1, 2, 2, 2, 3, 3]       # round(j·4/8) = round(j/2), banker's rounding
    assert idx[1, :2].tolist() == [0, 2]                       # round(j·3/2) -> 0, 2 (1.5 rounds to 2)
    assert int(idx.max()) <= 3


# ---- eq 12-13, 15: imitation loss -----------------------------------------------------------------
def test_eq12_13_imitation_loss_equals_cross_entropy_by_hand():
    torch.manual_seed(8)
    at_lp = [torch.log_softmax(torch.randn(2, 3, 4), -1) for _ in range(2)]
    nat_lp = [torch.log_softmax(torch.randn(2, 3, 4), -1) for _ in range(2)]
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    by_hand = 0.0
    for a, n in zip(at_lp, nat_lp):
        total = 0.0
        for b in range(2):
            for t in range(3):
                if mask[b, t]:
                    total += -sum(a[b, t, k].exp() * n[b, t, k] for k in range(4))
        by_hand += total / 4
    assert torch.allclose(imitation_loss(at_lp, nat_lp, mask), torch.tensor(float(by_hand)), atol=1e-5)


def test_demonstrator_policies_equal_the_full_forward_passes():
    torch.manual_seed(10)
    at = ATDemonstrator(tiny(dec_layers=3)).eval()
    batch = toy_batch(seed=3)
    _, full = at(batch.src, batch.tgt_in)
    short = at.policies(batch.src, batch.tgt_in)
    assert len(short) == 3
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(short, full))


def test_imitation_pairs_nat_position_t_with_the_at_position_predicting_the_same_token():
    """The AT reads BOS y1 … y_T' and its position t predicts y_{t+1}, as NAT position t does: L_IL
    pairs those two; the AT's last position (it predicts EOS) has no partner."""
    at = hand_model(ATDemonstrator, dec_layers=1, max_length_offset=1)
    nat = hand_model(NATLearner, dec_layers=1, max_length_offset=1)
    batch = make_batch([[4, 5]], [[4, 5]])  # T' = 2: AT positions 0, 1 and 2 (EOS)
    peaked = [(0.8, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8)]
    nat_pi = torch.tensor([peaked[:2]])  # NAT position t favours action t …
    nat.forward = lambda src, lengths: (peaked_logits([4, 5]), [nat_pi.log()], torch.zeros(1, 3))

    def imitation(at_pi):
        at.policies = lambda src, tgt_in: [torch.tensor([at_pi]).log()]
        return nat_loss(nat, batch, LossConfig(), demonstrator=at)[1]["imitation"]

    # … and so does AT position t. Paired right, each NAT position costs the entropy of (0.8, 0.1, 0.1):
    #   -(0.8·ln 0.8 + 2·0.1·ln 0.1) = 0.178515 + 0.460517 = 0.639032
    # (paired off by one, with AT position t+1, it would cost
    #   -(0.1·ln 0.8 + 0.8·ln 0.1 + 0.1·ln 0.1) = 0.022314 + 1.842068 + 0.230259 = 2.094641 per position)
    assert imitation(peaked) == pytest.approx(0.639032, abs=1e-5)
    # A demonstrator one position late (uniform at BOS) must cost more, not less:
    #   position 0: -(1/3)·(ln 0.8 + 2·ln 0.1) = (0.223144 + 4.605170) / 3 = 1.609438
    #   position 1: 2.094641 as above; mean 1.852040
    late = [(1 / 3, 1 / 3, 1 / 3), peaked[0], peaked[1]]
    assert imitation(late) == pytest.approx(1.852040, abs=1e-5)


def test_demonstrator_policy_at_t_has_not_seen_the_token_nat_position_t_predicts():
    """With a real AT: π_AT at position t depends on y_1 … y_t (the prefix NAT position t is
    guided by), not on y_{t+1}, the token NAT position t must predict."""
    torch.manual_seed(12)
    at = ATDemonstrator(tiny()).eval()
    src, tgt = [5, 6, 7], [8, 9, 10, 11]
    base = demonstrator_policies(at, make_batch([src], [tgt]))
    assert [lp.shape[1] for lp in base] == [len(tgt)] * at.cfg.dec_layers
    for t in range(len(tgt)):
        changed = demonstrator_policies(at, make_batch([src], [tgt[:t] + [30] + tgt[t + 1:]]))  # y_{t+1} changed
        for before, after in zip(base, changed):
            assert torch.allclose(after[:, : t + 1], before[:, : t + 1], atol=1e-6), t
        if t + 1 < len(tgt):
            assert not torch.allclose(changed[-1][:, t + 1], base[-1][:, t + 1], atol=1e-4), t


def test_imitation_trains_nat_but_never_the_frozen_at():
    torch.manual_seed(9)
    at = ATDemonstrator(tiny())
    nat = NATLearner(tiny())
    nat.init_from_at(at)
    at.requires_grad_(False)
    usage_before = [m.usage.clone() for m in at.imitation_modules()]
    params_before = [p.clone() for p in at.parameters()]
    loss, stats = nat_loss(nat, toy_batch(), LossConfig(lambda2=1.0), demonstrator=at)
    loss.backward()
    assert stats["imitation"] > 0
    assert all(p.grad is None for p in at.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params_before, at.parameters()))
    assert all(torch.equal(a, m.usage) for a, m in zip(usage_before, at.imitation_modules()))
    assert nat.decoder.imitations[0].policy[0].weight.grad.abs().sum() > 0


def test_eq15_nat_loss_on_hand_example():
    at, nat = hand_model(ATDemonstrator, max_length_offset=1), hand_model(NATLearner, max_length_offset=1)
    batch = make_batch([[4]], [[5]])  # source 4 EOS (S = 2), target 5 (T' = 1)
    nat_pis = [torch.tensor([[(0.25, 0.5, 0.25)]]), torch.tensor([[(0.5, 0.25, 0.25)]])]
    # Length classes are offsets T' - S = -1, 0, +1; the reference offset -1 gets p = 2/4 = 0.5.
    len_logits = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    nat.forward = lambda src, lengths: (peaked_logits([5]), [p.log() for p in nat_pis], len_logits)
    # π_AT at AT positions 0 and 1; position 1 predicts EOS and has no NAT partner.
    at_pis = [torch.tensor([[(0.5, 0.25, 0.25), (0.1, 0.1, 0.8)]])] * 2
    at.policies = lambda src, tgt_in: [p.log() for p in at_pis]
    loss, stats = nat_loss(nat, batch, LossConfig(label_smoothing=0.1, lambda2=0.5, length_weight=0.1),
                           demonstrator=at)
    # L_NAT (eq 2) = 0.827267; length loss = -ln 0.5 = 0.693147
    # L_IL (eq 12-13), H(π_AT, π_NAT) = -Σ_a π_AT(a)·ln π_NAT(a) per layer:
    #   layer 1: -(0.5·ln 0.25 + 0.25·ln 0.5 + 0.25·ln 0.25) = 0.693147 + 0.173287 + 0.346574 = 1.213008
    #   layer 2: -(0.5·ln 0.5 + 0.25·ln 0.25 + 0.25·ln 0.25) = 0.346574 + 0.346574 + 0.346574 = 1.039721
    #   L_IL = 2.252729
    # eq 15 (+ length term): 0.827267 + 0.1·0.693147 + 0.5·2.252729 = 2.022946
    assert float(loss) == pytest.approx(2.022946, abs=1e-5)
    assert stats["imitation"] == pytest.approx(2.252729, abs=1e-5)
    loss_off, stats_off = nat_loss(nat, batch, LossConfig(label_smoothing=0.1, imitation=False, length_weight=0.1))
    assert float(loss_off) == pytest.approx(0.896582, abs=1e-5) and "imitation" not in stats_off  # 0.827267 + 0.069315


def test_imitation_without_demonstrator_is_an_error():
    with pytest.raises(ValueError, match="demonstrator"):
        nat_loss(NATLearner(tiny()), toy_batch(), LossConfig(imitation=True))


# ---- §3.3: the NAT decodes all positions at once, the AT left to right --------------------------------
def test_nat_decoder_is_not_causal_and_at_decoder_is():
    torch.manual_seed(13)
    at = ATDemonstrator(tiny()).eval()
    nat = NATLearner(tiny()).eval()
    nat.init_from_at(at)
    src = make_batch([[5, 6, 7, 8]], [[9]]).src
    enc = nat.encode(src)
    lengths = torch.tensor([5])
    base, _ = nat.decode(enc, lengths)
    copy_inputs = nat.copy_inputs

    def last_input_changed(*args, **kw):
        x = copy_inputs(*args, **kw).clone()
        x[:, -1] += 1.0
        return x

    nat.copy_inputs = last_input_changed
    changed, _ = nat.decode(enc, lengths)
    assert not torch.allclose(changed[:, 0], base[:, 0], atol=1e-4)  # position 0 sees position 4's input

    memory, keep = at.encode(src)
    tgt_in = torch.tensor([[2, 9, 10, 11, 12]])
    base, _ = at.decode(tgt_in, memory, keep)
    changed, _ = at.decode(torch.tensor([[2, 9, 10, 11, 13]]), memory, keep)
    assert torch.allclose(changed[:, :-1], base[:, :-1], atol=1e-6)  # earlier positions never see it
    assert not torch.allclose(changed[:, -1], base[:, -1], atol=1e-4)


# ---- NAT initialization and length prediction -------------------------------------------------------
def test_nat_is_initialized_from_at_parameters():
    torch.manual_seed(11)
    at = ATDemonstrator(tiny())
    at.decoder.imitations[0].usage.fill_(0.25)
    nat = NATLearner(tiny())
    nat.init_from_at(at)
    nat_state = nat.state_dict()
    for k, v in at.state_dict().items():
        assert torch.equal(nat_state[k], v), k
    with pytest.raises(ValueError, match="differ"):
        NATLearner(tiny(d_ffn=128)).init_from_at(at)


def test_length_targets_and_prediction_are_offsets_from_source_length():
    nat = NATLearner(tiny(max_length_offset=4))
    keep = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    assert nat.length_targets(keep, torch.tensor([7, 20])).tolist() == [4 + 2, 8]   # 20-2 clamps to +4
    with torch.no_grad():
        nat.length_head.weight.zero_()
        nat.length_head.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 9.0, 0, 0]))  # offset +2
    assert nat.predict_lengths(Encoded(torch.zeros(2, 5, nat.cfg.d_model), keep)).tolist() == [7, 4]
