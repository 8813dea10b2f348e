"""The CPU inference path (imitate_nat/cpu.py): int8 and bf16 copies of the models decode close
to the fp32 models and leave them untouched; "auto" picks bf16 only with bf16 matrix units."""
import copy

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from imitate_nat import ATDemonstrator, NATLearner, preset
from imitate_nat import cpu
from imitate_nat.cpu import for_cpu, resolve_mode
from imitate_nat.data import source_tensor
from imitate_nat.decode import at_score, beam_search, lpd_decode, nat_decode

MODES = ["int8", "bf16"]


@pytest.fixture(scope="module")
def models():
    """A small AT and NAT with sharpened outputs (random weights give near-ties everywhere)."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=60, dropout=0.0, n_actions=16, d_model=64, n_heads=4, d_ffn=128)
    at = ATDemonstrator(cfg).eval()
    with torch.no_grad():
        at.embed.weight.mul_(4.0)
    nat = NATLearner(cfg).eval()
    nat.init_from_at(at)
    return at, nat


def sources(n=6, seed=1, vocab=60):
    g = torch.Generator().manual_seed(seed)
    return source_tensor([torch.randint(4, vocab, (int(l),), generator=g).tolist()
                          for l in torch.randint(3, 12, (n,), generator=g)])


@pytest.mark.parametrize("mode", MODES)
def test_the_copy_leaves_the_fp32_model_as_it_was(models, mode):
    at, _ = models
    before = {k: v.clone() for k, v in at.state_dict().items()}
    fast = for_cpu(at, mode)
    assert fast is not at and not fast.training
    assert at.output_projection is None and all(torch.equal(before[k], v) for k, v in at.state_dict().items())
    if mode == "int8":   # every linear layer and the tied output projection are int8
        assert not any(isinstance(m, nn.Linear) for m in fast.modules())
        assert isinstance(fast.output_projection, DynamicQuantizedLinear)
        assert fast.output_projection.weight().dtype == torch.qint8
    else:
        assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}


def test_off_is_the_model_itself(models):
    at, nat = models
    assert for_cpu(at, "off") is at and for_cpu(nat, "off") is nat


@pytest.mark.parametrize("mode", MODES)
def test_logits_and_lpd_scores_stay_close_to_fp32(models, mode):
    at, nat = models
    fast_at, fast_nat = for_cpu(at, mode), for_cpu(nat, mode)
    src = sources()
    lengths = torch.tensor([3, 5, 7, 4, 9, 6])
    with torch.no_grad():
        ref, _ = nat.decode(nat.encode(src), lengths)
        got, _ = fast_nat.decode(fast_nat.encode(src), lengths)
        real = torch.arange(ref.size(1)) < lengths.unsqueeze(1)
        assert ((got.float() - ref)[real].abs().max() / ref[real].abs().max()) < 0.05
        hyps = ref.argmax(-1).clamp_min(4)   # some hypotheses to rescore
        ref_scores = at_score(at, *at.encode(src), hyps, lengths)
        got_scores = at_score(fast_at, *fast_at.encode(src), hyps, lengths)
    assert got_scores.dtype == torch.float32
    assert (got_scores - ref_scores).abs().max() < 0.05 * ref_scores.abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_decoders_agree_with_fp32_on_most_tokens(models, mode):
    at, nat = models
    fast_at, fast_nat = for_cpu(at, mode), for_cpu(nat, mode)
    src = sources(n=8, seed=4)

    def agreement(a, b):
        pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
        return sum(x == y for x, y in pairs) / len(pairs)
    assert agreement(nat_decode(fast_nat, src), nat_decode(nat, src)) >= 0.9
    assert agreement(lpd_decode(fast_nat, fast_at, src, delta_t=2), lpd_decode(nat, at, src, delta_t=2)) >= 0.9
    assert agreement(beam_search(fast_at, src, max_len_b=8), beam_search(at, src, max_len_b=8)) >= 0.8


def test_auto_is_bf16_only_with_bf16_matrix_units_and_bad_modes_are_named(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_mode("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_mode("auto") == "int8" and resolve_mode("bf16") == "bf16" and resolve_mode("off") == "off"
    assert not cpu.has_bf16_matrix_units()
    with pytest.raises(ValueError, match="auto, int8, bf16, off.*'fast'"):
        resolve_mode("fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_on_a_gpu_is_refused(models):
    with pytest.raises(ValueError, match="on the CPU"):
        for_cpu(copy.deepcopy(models[0]).cuda(), "int8")
