"""Overfit 64 real Multi30k pairs: the AT must memorize them (≥ 95% token accuracy, teacher
forced) and the imitate-NAT, initialized from it and imitating it, must too (≥ 90% at the
reference length), its policies moving towards the AT's on the way. Catches anything that
blocks learning: masks, shifts, the copy, the losses.

Needs the shared data: IMITATE_DATA_DIR=../shared/data (set by .ci/run)."""
import os
from pathlib import Path

import pytest
import torch

from imitate_nat import ATDemonstrator, LossConfig, NATLearner, preset
from imitate_nat.data import make_batch, read_parallel
from imitate_nat.decode import greedy_search, nat_decode
from imitate_nat.losses import at_loss, demonstrator_policies, nat_loss
from imitate_nat.optim import lr_at, make_optimizer, set_lr
from imitate_nat.tokenizer import train_sentencepiece

DATA = os.environ.get("IMITATE_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "multi30k" / "train.en").is_file(),
                                reason="set IMITATE_DATA_DIR to the shared data folder (with multi30k/) to run")


@pytest.fixture(scope="module")
def pairs_and_vocab(tmp_path_factory):
    src, tgt = read_parallel(Path(DATA) / "multi30k" / "train.en", Path(DATA) / "multi30k" / "train.de")
    src, tgt = src[:64], tgt[:64]
    d = tmp_path_factory.mktemp("overfit")
    (d / "s.txt").write_text("\n".join(src) + "\n")
    (d / "t.txt").write_text("\n".join(tgt) + "\n")
    tok = train_sentencepiece([d / "s.txt", d / "t.txt"], d / "spm.model", vocab_size=600)
    batch = make_batch(tok.encode_batch(src), tok.encode_batch(tgt))
    return batch, tok


def train(model, loss_fn, steps, lr, warmup=30):
    opt = make_optimizer(model.parameters(), lr)
    model.train()
    for step in range(1, steps + 1):
        set_lr(opt, lr_at(step, lr, warmup))
        loss, stats = loss_fn()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return stats


def test_at_then_imitate_nat_memorize_64_real_pairs(pairs_and_vocab):
    batch, tok = pairs_and_vocab
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = preset("tiny", vocab_size=tok.vocab_size, dropout=0.0, d_model=64, d_ffn=128, n_heads=2, n_actions=32)
    losses = LossConfig(label_smoothing=0.0)  # the paper's λ1 for the AT

    at = ATDemonstrator(cfg)
    train(at, lambda: at_loss(at, batch, losses), steps=150, lr=3e-3)
    _, stats = at_loss(at, batch, losses)
    assert stats["acc"] >= 0.95, stats
    first = greedy_search(at, batch.src[:4])
    assert [tok.decode(h) for h in first] == [tok.decode(t[t.ne(0)].tolist()) for t in batch.tgt[:4]]

    nat = NATLearner(cfg)
    nat.init_from_at(at)
    at.requires_grad_(False)
    # λ2 = 0.1, not the paper's 0.001: strong enough for the imitation term to move π_NAT
    # visibly within 120 steps (cross-entropy alone moves it away from π_AT).
    losses = LossConfig(label_smoothing=0.0, lambda2=0.1)
    keep = batch.tgt.ne(0)
    at_entropy = sum(float(-(lp.exp() * lp).sum(-1)[keep].mean()) for lp in demonstrator_policies(at, batch))
    # L_IL = Σ_l H(π_AT, π_NAT) = Σ_l [H(π_AT) + KL(π_AT ‖ π_NAT)]: the KL part is what imitation closes.
    kl_before = nat_loss(nat, batch, losses, demonstrator=at)[1]["imitation"] - at_entropy
    train(nat, lambda: nat_loss(nat, batch, losses, demonstrator=at), steps=120, lr=2e-3)
    _, stats = nat_loss(nat, batch, losses, demonstrator=at)
    assert stats["acc"] >= 0.90, stats
    kl_after = stats["imitation"] - at_entropy
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    lengths = batch.tgt.ne(0).sum(1)
    out = nat_decode(nat, batch.src, lengths=lengths)
    correct = sum(int(a == b) for o, t in zip(out, batch.tgt.tolist()) for a, b in zip(o, t))
    assert correct / int(lengths.sum()) >= 0.90
