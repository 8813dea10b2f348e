"""Decoding: beam search against exhaustive search, the KV cache against recomputation,
greedy against beam 1, NAT and Length Parallel Decoding (LPD)."""
import dataclasses
import itertools

import pytest
import torch

from imitate_nat import ATDemonstrator, NATLearner, preset
from imitate_nat.data import source_tensor
from imitate_nat import decode
from imitate_nat.decode import at_score, beam_search, greedy_search, lpd_candidates, lpd_decode, nat_decode
from imitate_nat.config import COPIES
from imitate_nat.layers import select_cache
from imitate_nat.nat import Encoded

SPECIALS = 4  # pad, unk, bos, eos


def model_pair(vocab=7, seed=0):
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=vocab, dropout=0.0, n_actions=8, d_model=32, n_heads=2, d_ffn=64)
    at, nat = ATDemonstrator(cfg).eval(), NATLearner(cfg).eval()
    # Sharper logits than the default init, so the search problems below are not near-ties.
    with torch.no_grad():
        at.embed.weight.mul_(3.0)
    nat.init_from_at(at)
    return at, nat


def sources(vocab, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return source_tensor([torch.randint(SPECIALS, vocab, (int(l),), generator=g).tolist()
                          for l in torch.randint(2, 7, (n,), generator=g)])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_room_for_every_hypothesis_equals_exhaustive_search(length_penalty):
    at, _ = model_pair(vocab=7, seed=1)
    src = sources(7, n=3, seed=2)
    L = 4  # at most 3 tokens + EOS; content tokens are unk and 4..6 (pad/bos are never emitted)
    content = [1, 4, 5, 6]
    space = [list(s) for n in range(L) for s in itertools.product(content, repeat=n)]  # 85 sequences
    hyps = beam_search(at, src, beam_size=len(space) + 5, length_penalty=length_penalty, max_len_a=0, max_len_b=L)
    memory, keep = at.encode(src)
    for b in range(src.size(0)):
        cand = torch.zeros(len(space), L - 1, dtype=torch.long)
        for i, s in enumerate(space):
            cand[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        lens = torch.tensor([len(s) for s in space])
        exact = at_score(at, memory[b:b + 1].expand(len(space), -1, -1), keep[b:b + 1].expand(len(space), -1),
                         cand, lens, length_penalty)
        best = int(exact.argmax())
        assert hyps[b] == space[best]


def test_small_beam_finds_no_worse_than_greedy():
    at, _ = model_pair(vocab=12, seed=3)
    src = sources(12, n=5, seed=4)
    hyps = beam_search(at, src, beam_size=4, max_len_a=0, max_len_b=8)
    greedy = greedy_search(at, src, max_len_a=0, max_len_b=8)
    memory, keep = at.encode(src)

    def rescore(seqs):
        t = torch.zeros(len(seqs), max(1, max(map(len, seqs))), dtype=torch.long)
        for i, s in enumerate(seqs):
            t[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return at_score(at, memory, keep, t, torch.tensor([len(s) for s in seqs]))

    assert torch.all(rescore(hyps) >= rescore(greedy) - 1e-5)


def test_cached_incremental_decoding_equals_full_recomputation():
    at, _ = model_pair(vocab=20, seed=5)
    src = sources(20, n=3, seed=6)
    memory, keep = at.encode(src)
    tgt = torch.cat([torch.full((3, 1), 2), torch.randint(SPECIALS, 20, (3, 6))], 1)
    full, full_pis = at.decode(tgt, memory, keep)
    cache, steps, step_pis = {}, [], []
    for t in range(tgt.size(1)):
        logits, pis = at.decode(tgt[:, t:t + 1], memory, keep, cache=cache, start=t)
        steps.append(logits)
        step_pis.append(pis[-1])
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert torch.allclose(torch.cat(step_pis, 1), full_pis[-1], atol=1e-5)


def test_greedy_takes_the_argmax_of_a_full_recomputation_at_every_step():
    at, _ = model_pair(vocab=15, seed=7)
    src = sources(15, n=6, seed=8)
    memory, keep = at.encode(src)
    for min_len in (0, 3):
        greedy = greedy_search(at, src, max_len_a=0, max_len_b=9, min_len=min_len)
        for b in range(src.size(0)):
            out = []  # reference: no cache, no batch, the whole prefix decoded again each step
            for step in range(9):
                prefix = torch.tensor([[2] + out])
                logits, _ = at.decode(prefix, memory[b:b + 1], keep[b:b + 1])
                lp = logits[0, -1].clone()
                lp[[0, 2]] = float("-inf")  # never PAD or BOS
                if step < min_len:
                    lp[3] = float("-inf")
                nxt = 3 if step == 8 else int(lp.argmax())  # out of room: EOS
                if nxt == 3:
                    break
                out.append(nxt)
            assert greedy[b] == out
            assert len(greedy[b]) >= min_len
    assert any(len(h) > 0 for h in greedy)
    assert greedy == beam_search(at, src, beam_size=1, max_len_a=0, max_len_b=9, min_len=min_len)


def test_batched_search_equals_one_sentence_at_a_time(monkeypatch):
    at, nat = model_pair(vocab=15, seed=9)
    src = sources(15, n=5, seed=10)
    # A random model ends every sentence at max length. Push EOS up once a step passes the
    # sentence's source length, so sentences end at different steps and leave the batch early.
    at_decode = at.decode

    def decode_with_eos_push(tgt, memory, keep, cache=None, start=0):
        logits, pis = at_decode(tgt, memory, keep, cache=cache, start=start)
        push = (start + 1 - keep.sum(1).float()).clamp_min(0) * 10.0  # per sentence
        logits[..., 3] += push.repeat_interleave(logits.size(0) // memory.size(0)).unsqueeze(1)
        return logits, pis

    monkeypatch.setattr(at, "decode", decode_with_eos_push)
    left = []  # sentences still decoding after each early exit from the batch
    monkeypatch.setattr(decode, "select_cache", lambda c, rows, sents=None:
                        (sents is not None and left.append(len(sents))) or select_cache(c, rows, sents))
    batched = beam_search(at, src, beam_size=3, max_len_a=0, max_len_b=10, min_len=2)
    assert left and left[0] < 5, left  # sentences did leave the batch early: the comparison covers it
    assert len(set(map(len, batched))) > 1
    nat_batched = lpd_decode(nat, at, src, delta_t=2)
    for i in range(src.size(0)):
        one = src[i:i + 1, : int(src[i].ne(0).sum())]
        assert beam_search(at, one, beam_size=3, max_len_a=0, max_len_b=10, min_len=2) == [batched[i]]
        assert lpd_decode(nat, at, one, delta_t=2) == [nat_batched[i]]


def test_min_len_fixes_output_length():
    at, _ = model_pair(vocab=15, seed=11)
    src = sources(15, n=3, seed=12)
    hyps = beam_search(at, src, beam_size=4, max_len_a=0, max_len_b=6, min_len=5)
    assert [len(h) for h in hyps] == [5, 5, 5]


def test_nat_decode_emits_exactly_the_requested_lengths_and_no_special_tokens():
    _, nat = model_pair(vocab=15, seed=13)
    src = sources(15, n=4, seed=14)
    out = nat_decode(nat, src, lengths=torch.tensor([1, 3, 5, 8]))
    assert [len(o) for o in out] == [1, 3, 5, 8]
    assert all(t not in (0, 2, 3) for o in out for t in o)
    predicted = nat_decode(nat, src)
    assert [len(o) for o in predicted] == nat.predict_lengths(nat.encode(src)).tolist()


def test_lpd_with_delta_zero_equals_nat_decoding():
    at, nat = model_pair(vocab=15, seed=15)
    src = sources(15, n=5, seed=16)
    assert lpd_decode(nat, at, src, delta_t=0) == nat_decode(nat, src)


def test_lpd_keeps_the_candidate_the_at_scores_best():
    at, nat = model_pair(vocab=15, seed=17)
    src = sources(15, n=4, seed=18)
    lengths = torch.tensor([2, 4, 6, 3])
    best = lpd_decode(nat, at, src, delta_t=2, lengths=lengths)
    with torch.no_grad():
        tokens, cand_len, scores = lpd_candidates(nat, at, nat.encode(src), at.encode(src), lengths, 2)
    cands, cand_len = tokens.view(4, 5, -1), cand_len.view(4, 5)
    assert cand_len.tolist()[0] == [1, 1, 2, 3, 4]                  # T̂-ΔT clamped at 1
    assert cand_len.tolist()[1] == [2, 3, 4, 5, 6]
    memory, keep = at.encode(src)
    for b in range(4):
        # rescore every candidate on its own (no batching, no padding) and compare
        own = [float(at_score(at, memory[b:b + 1], keep[b:b + 1], cands[b, c:c + 1, : int(cand_len[b, c])],
                              cand_len[b, c:c + 1])) for c in range(5)]
        assert scores[b].tolist() == pytest.approx(own, abs=1e-4)
        c = max(range(5), key=lambda i: own[i])
        assert best[b] == cands[b, c, : int(cand_len[b, c])].tolist()
    # The candidates differ in length, so the choice really depends on the AT's scores.
    assert len({len(x) for x in best}) > 1 or len(set(map(tuple, best))) > 1


@pytest.mark.parametrize("copy", COPIES)
def test_candidates_sharing_one_memory_row_equal_per_candidate_copies(copy):
    """LPD passes each source's memory once for its C consecutive length candidates (copy inputs
    and cross-attention fold them): the logits equal those of C repeated copies."""
    at, _ = model_pair(vocab=15, seed=23)
    nat = NATLearner(dataclasses.replace(at.cfg, copy=copy)).eval()
    nat.init_from_at(at)
    src, C = sources(15, n=3, seed=24), 5
    enc = nat.encode(src)
    cand_len = torch.tensor([[1, 2, 3, 4, 5], [4, 5, 6, 7, 8], [2, 3, 4, 5, 6]]).view(-1)
    shared, _ = nat.decode(enc, cand_len)
    copied, _ = nat.decode(Encoded(*(None if t is None else t.repeat_interleave(C, 0) for t in enc)), cand_len)
    real = torch.arange(shared.size(1)) < cand_len.unsqueeze(1)
    assert torch.allclose(shared[real], copied[real], atol=1e-5)


def test_lpd_sends_all_candidates_through_one_nat_and_one_at_pass():
    at, nat = model_pair(vocab=15, seed=19)
    src = sources(15, n=3, seed=20)
    calls = {"nat": [], "at": []}
    nat_decode_fn, at_decode_fn = nat.decode_states, at.decode_states
    nat.decode_states = lambda enc, lengths, **k: calls["nat"].append(len(lengths)) or nat_decode_fn(enc, lengths, **k)
    at.decode_states = lambda *a, **k: calls["at"].append(a[0].size(0)) or at_decode_fn(*a, **k)
    lpd_decode(nat, at, src, delta_t=3)
    assert calls == {"nat": [3 * 7], "at": [3 * 7]}


def test_projecting_only_real_positions_in_chunks_equals_projecting_every_position(monkeypatch):
    """Eager LPD projects only the candidates' real positions, a few rows at a time
    (packed_logits_apply); a fixed decoder width (CUDA graphs) projects every position: the
    same tokens and scores."""
    at, nat = model_pair(vocab=15, seed=25)
    src = sources(15, n=4, seed=26)
    lengths = torch.tensor([2, 5, 3, 6])
    monkeypatch.setattr(decode, "ROW_CHUNK", 4)   # several chunks, the last one short
    projected = []
    project = at.output_logits
    monkeypatch.setattr(at, "output_logits", lambda h: projected.append(h.size(0)) or project(h))
    with torch.no_grad():
        enc, at_enc = nat.encode(src), at.encode(src)
        packed = lpd_candidates(nat, at, enc, at_enc, lengths, 2)
        real_rows = int((packed[1] + 1).sum())          # y + EOS per candidate
        assert sum(projected) == real_rows and max(projected) == 4
        width = int(packed[1].max()) + 3
        dense = lpd_candidates(nat, at, enc, at_enc, lengths, 2, width=width)
    assert torch.equal(packed[0], dense[0][:, : packed[0].size(1)]) and dense[0][:, packed[0].size(1):].eq(0).all()
    assert torch.equal(packed[1], dense[1])
    assert torch.allclose(packed[2], dense[2], atol=1e-5)


def test_negative_delta_t_is_rejected():
    at, nat = model_pair()
    with pytest.raises(ValueError, match="delta_t"):
        lpd_decode(nat, at, sources(7), delta_t=-1)


def _models_with_positions(max_positions: int, vocab: int = 15):
    at, _ = model_pair(vocab=vocab, seed=25)
    cfg = dataclasses.replace(at.cfg, max_positions=max_positions, max_length_offset=4)
    at = ATDemonstrator(cfg).eval()
    nat = NATLearner(cfg).eval()
    nat.init_from_at(at)
    return at, nat


@pytest.mark.parametrize("delta_t", [1, 3])
def test_lpd_at_the_positional_table_clamps_candidates_instead_of_overflowing(delta_t):
    """A source filling the table (S tokens + EOS = max_positions) predicts T̂ up to max_positions;
    T̂+ΔT candidates, and the AT's BOS + y rescoring pass over them, must still fit the table
    (they overflowed it: a crash for every sentence batched with that source)."""
    P = 16
    at, nat = _models_with_positions(P)
    g = torch.Generator().manual_seed(26)
    src = source_tensor([torch.randint(SPECIALS, 15, (P - 1,), generator=g).tolist(), [5, 6, 7]])
    assert src.size(1) == P
    for lengths in (torch.tensor([P, 3]), None):               # T̂ at the table's end; predicted
        hyps = lpd_decode(nat, at, src, delta_t=delta_t, lengths=lengths)
        assert len(hyps) == 2 and all(1 <= len(h) <= P - 1 for h in hyps)
    with torch.no_grad():
        tokens, cand_len, _ = lpd_candidates(nat, at, nat.encode(src), at.encode(src), torch.tensor([P, 3]), delta_t)
    assert int(cand_len.max()) == P - 1 == decode.longest_candidate(P, delta_t)
    # Without rescoring (ΔT = 0) the NAT alone may use the whole table.
    assert len(lpd_decode(nat, at, src, delta_t=0, lengths=torch.tensor([P, 3]))[0]) == P


def test_graph_decoder_width_stays_within_what_the_at_rescores():
    """GraphedLPD's bucketed width (graphs.decoder_width) never passes longest_candidate: the
    width that rounding up to max_positions gave overflowed the AT pass. Here the width is fed to
    the eager lpd_candidates, which the recorded graph runs."""
    from imitate_nat.graphs import decoder_width

    P, delta_t = 16, 2
    at, nat = _models_with_positions(P)
    src = source_tensor([[SPECIALS + i % 11 for i in range(P - 1)]])
    lengths = torch.tensor([P - 2])
    W = decoder_width(int(lengths.max()) + delta_t, P, delta_t)
    assert W == P - 1
    with torch.no_grad():
        args = (nat, at, nat.encode(src), at.encode(src), lengths, delta_t)
        best, best_len = decode.pick_best(*lpd_candidates(*args, width=W))
        with pytest.raises(ValueError, match="decoder width"):
            lpd_candidates(*args, width=P)
    assert [best[0, : int(best_len[0])].tolist()] == lpd_decode(nat, at, src, delta_t=delta_t, lengths=lengths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_lpd_at_the_positional_table_equals_eager():
    from imitate_nat.graphs import GraphedLPD

    P = 32
    at, nat = (m.cuda() for m in _models_with_positions(P))
    src = source_tensor([list(range(SPECIALS, 15)) * 2 + [5] * (P - 1 - 22)]).cuda()
    for lengths in (torch.tensor([P], device="cuda"), None):
        assert GraphedLPD(nat, at, delta_t=2)(src, lengths) == lpd_decode(nat, at, src, delta_t=2, lengths=lengths)
