"""CUDA-graph LPD (imitate_nat/graphs.py). The properties the graphs rely on (a wider decoder and
padded source columns change nothing) are checked on the CPU; recording and replaying graphs
needs a GPU, so those tests run only where CUDA is available (bench/gpu_check.sh runs them)."""
import pytest
import torch

from imitate_nat import ATDemonstrator, NATLearner, preset
from imitate_nat.data import source_tensor
from imitate_nat.config import COPIES
from imitate_nat.decode import lpd_candidates, lpd_decode, nat_decode, pick_best
from imitate_nat.graphs import GraphCache, GraphedLPD

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (none on this machine)")


def model_pair(copy="soft", vocab=40, device="cpu"):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=vocab, dropout=0.0, n_actions=8, d_model=32, n_heads=2, d_ffn=64,
                 copy=copy, max_length_offset=6)
    at, nat = ATDemonstrator(cfg), NATLearner(cfg)
    with torch.no_grad():
        at.embed.weight.mul_(3.0)  # sharper logits: no near-ties for float noise to flip
    nat.init_from_at(at)
    return at.to(device).eval(), nat.to(device).eval()


def sources(vocab, n, seed, lo=2, hi=12):
    g = torch.Generator().manual_seed(seed)
    return source_tensor([torch.randint(4, vocab, (int(k),), generator=g).tolist()
                          for k in torch.randint(lo, hi, (n,), generator=g)])


@pytest.mark.parametrize("copy", COPIES)
def test_lpd_ignores_extra_decoder_width_and_padded_source_columns(copy):
    """What one graph per (width, source) bucket relies on: padding is masked everywhere."""
    at, nat = model_pair(copy)
    src = sources(40, n=5, seed=1)
    eager = lpd_decode(nat, at, src, delta_t=2)
    padded = torch.cat([src, torch.zeros(src.size(0), 5, dtype=torch.long)], 1)  # 5 extra pad columns
    with torch.no_grad():
        nat_enc = nat.encode(src)  # unpadded, natural width
        _, cand_len, scores = lpd_candidates(nat, at, nat_enc, at.encode(src), nat.predict_lengths(nat_enc), 2)
        nat_enc, at_enc = nat.encode(padded), at.encode(padded)
        lengths = nat.predict_lengths(nat_enc)
        W = int(cand_len.max()) + 7
        wide_tokens, wide_len, wide_scores = lpd_candidates(nat, at, nat_enc, at_enc, lengths, 2, width=W)
        best, best_len = pick_best(wide_tokens, wide_len, wide_scores)
    assert wide_tokens.size(1) == W
    assert torch.equal(wide_len, cand_len)
    torch.testing.assert_close(wide_scores, scores, atol=1e-5, rtol=1e-5)
    assert [row[:k] for row, k in zip(best.tolist(), best_len.tolist())] == eager


def test_graphed_lpd_refuses_models_off_the_gpu_or_in_training_mode():
    at, nat = model_pair()
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedLPD(nat, at)
    if torch.cuda.is_available():
        at, nat = model_pair(device="cuda")
        with pytest.raises(ValueError, match="eval"):
            GraphedLPD(nat.train(), at)


@cuda
@pytest.mark.parametrize("copy", COPIES)
@pytest.mark.parametrize("delta_t", [0, 3])
def test_graphed_lpd_equals_eager_lpd(copy, delta_t):
    at, nat = model_pair(copy, device="cuda")
    graphed = GraphedLPD(nat, at, delta_t=delta_t, max_batch=8)
    for seed, n in enumerate([1, 3, 1, 8, 3, 5]):  # repeated shapes replay, new ones record
        src = sources(40, n, seed).cuda()
        assert graphed(src) == lpd_decode(nat, at, src, delta_t=delta_t), (seed, n)
    recorded = graphed.graphs
    assert 0 < recorded <= 2 * 6
    src = sources(40, 1, 0).cuda()
    assert graphed(src) == lpd_decode(nat, at, src, delta_t=delta_t)
    assert graphed.graphs == recorded  # the shape of the first call: replayed, not recorded again


@cuda
def test_graphed_lpd_honours_given_lengths_and_runs_large_batches_eagerly():
    at, nat = model_pair(device="cuda")
    graphed = GraphedLPD(nat, at, delta_t=0, max_batch=4)
    src = sources(40, 3, 7).cuda()
    lengths = torch.tensor([4, 9, 2], device="cuda")
    assert graphed(src, lengths) == nat_decode(nat, src, lengths)
    assert [len(h) for h in graphed(src, lengths)] == [4, 9, 2]
    before = graphed.graphs
    big = sources(40, 6, 8).cuda()
    assert graphed(big) == nat_decode(nat, big)
    assert graphed.graphs == before


def test_decoder_factories_choose_graphs_only_for_eval_models_on_a_gpu():
    from imitate_nat.translate import nat_lpd, nat_one_pass

    at, nat = model_pair()
    assert not isinstance(nat_lpd(nat, at, cuda_graphs=True), GraphedLPD)  # CPU: eager
    if torch.cuda.is_available():
        at, nat = model_pair(device="cuda")
        assert isinstance(nat_lpd(nat, at, cuda_graphs=True), GraphedLPD)
        assert isinstance(nat_one_pass(nat, cuda_graphs=True), GraphedLPD)
        assert not isinstance(nat_lpd(nat, at), GraphedLPD)  # opt-in
        assert not isinstance(nat_one_pass(nat.train(), cuda_graphs=True), GraphedLPD)  # training: eager


def test_graph_cache_drops_the_least_recently_used_graphs_with_their_choosers():
    """A server sees every source length: the graphs kept are capped (each holds GPU memory).
    A chooser reads its encoder's outputs, so it never outlives it."""
    recorded = []

    def record(name):
        return lambda *_: recorded.append(name) or name

    cache = GraphCache(max_graphs=4)
    for b in (1, 2):
        cache.encoder((b, 8), record(f"e{b}"))
        cache.chooser((b, 8), 8, record(f"c{b}"))
    assert cache.encoder((1, 8), record("e1 again")) == "e1" and len(cache) == 4   # replayed, now the newest
    cache.encoder((4, 8), record("e4"))              # over the cap: (2, 8), the oldest, goes with its chooser
    assert len(cache) == 3 and cache.chooser((1, 8), 8, record("c1 again")) == "c1"
    assert cache.encoder((2, 8), record("e2 again")) == "e2 again"
    assert recorded == ["e1", "c1", "e2", "c2", "e4", "e2 again"]

    single = GraphCache(max_graphs=2)                # one encoder: its oldest chooser goes, never the encoder
    single.encoder((1, 8), record("e"))
    for width in (8, 16):
        single.chooser((1, 8), width, record(f"w{width}"))
    assert len(single) == 2 and single.chooser((1, 8), 8, record("w8 again")) == "w8 again"


@cuda
def test_graphed_lpd_keeps_at_most_max_graphs_and_still_equals_eager_lpd():
    at, nat = model_pair(device="cuda")
    graphed = GraphedLPD(nat, at, delta_t=2, max_graphs=3)
    for seed, hi in enumerate((4, 12, 20, 28, 12, 4)):   # several source widths, some again
        src = sources(40, n=2, seed=seed, lo=hi - 2, hi=hi).cuda()
        assert graphed(src) == lpd_decode(nat, at, src, delta_t=2)
        assert graphed.graphs <= 3
