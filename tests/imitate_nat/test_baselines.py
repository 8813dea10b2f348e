"""The paper-faithful switches for the imitation study (issue: does imitation work?):
UniformCopy of the source embeddings, a NAT without imitation modules, L_IL summed, per-stage
seeds, and run dirs and model files from before them keeping their meaning."""
from __future__ import annotations

import math

import pytest
import torch

from imitate_nat import ATDemonstrator, LossConfig, NATLearner, preset
from imitate_nat.checkpoint import load_model, save_model
from imitate_nat.data import make_batch
from imitate_nat.losses import imitation_loss, nat_loss
from imitate_nat.nat import IMITATION_PREFIX, uniform_copy_index
from orchestrator.run.hashing import stage_hashes
from orchestrator.spec.loading import spec_from_dict


def tiny(**kw):
    return preset("tiny", vocab_size=20, n_actions=8, max_positions=32, **kw)


def _batch():
    return make_batch([[5, 6, 7, 8, 9], [10, 11, 12]], [[13, 14, 15, 16], [17, 18, 19, 5, 6, 7]])


def test_uniform_copy_copies_the_source_embeddings_and_uniform_encoder_the_encoder_states():
    """The paper's UniformCopy "directly copies the source embeddings": decoder input j is the
    scaled embedding of source token round(j·S/T'); uniform_encoder copies the encoder's top
    states at the same positions (this project's UniformCopy before 2026-12)."""
    torch.manual_seed(1)
    at = ATDemonstrator(tiny()).eval()
    src, lengths = _batch().src, torch.tensor([7, 2])
    idx = uniform_copy_index(src.ne(0).sum(1), lengths, 7)
    inputs = {}
    for copy in ("uniform", "uniform_encoder"):
        nat = NATLearner(tiny(copy=copy)).eval()
        nat.init_from_at(at)
        enc = nat.encode(src)
        x = nat.copy_inputs(enc, lengths)
        source = at.embed(src) * math.sqrt(at.cfg.d_model) if copy == "uniform" else enc.memory
        assert (enc.embedded is not None) == (copy == "uniform")
        for b in range(2):
            for j in range(int(lengths[b])):
                assert torch.allclose(x[b, j], source[b, idx[b, j]], atol=1e-6), (copy, b, j)
        inputs[copy] = x
    assert not torch.allclose(inputs["uniform"], inputs["uniform_encoder"], atol=1e-3)


def test_a_nat_without_imitation_modules_is_the_demonstrator_minus_its_modules():
    torch.manual_seed(2)
    at = ATDemonstrator(tiny())
    nat = NATLearner(tiny(imitation_modules=False))
    nat.init_from_at(at)
    theirs, ours = at.state_dict(), nat.state_dict()
    assert not any(k.startswith(IMITATION_PREFIX) for k in ours)
    assert {k for k in theirs if not k.startswith(IMITATION_PREFIX)} <= set(ours)
    assert all(torch.equal(ours[k], v) for k, v in theirs.items() if not k.startswith(IMITATION_PREFIX))
    # It decodes without policies, trains on the cross-entropy alone, and cannot imitate.
    batch = _batch()
    logits, log_pis, _ = nat(batch.src, batch.tgt.ne(0).sum(1))
    assert log_pis == [] and logits.shape[:2] == batch.tgt.shape
    loss, stats = nat_loss(nat, batch, LossConfig(imitation=False))
    loss.backward()
    assert "imitation" not in stats and nat.decoder.layers[0].ffn.net[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no imitation modules"):
        nat_loss(nat, batch, LossConfig(imitation=True), demonstrator=at)
    with pytest.raises(ValueError, match="always has imitation modules"):
        ATDemonstrator(tiny(imitation_modules=False))
    # Fewer parameters: exactly the demonstrator's modules.
    modules = sum(p.numel() for k, p in at.named_parameters() if k.startswith(IMITATION_PREFIX))
    with_modules = NATLearner(tiny())
    assert sum(p.numel() for p in with_modules.parameters()) - sum(p.numel() for p in nat.parameters()) == modules


def test_il_reduction_sum_is_the_mean_times_the_real_tokens():
    torch.manual_seed(3)
    at_lp = [torch.log_softmax(torch.randn(2, 4, 8), -1) for _ in range(2)]
    nat_lp = [torch.log_softmax(torch.randn(2, 4, 8), -1) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1.0]])
    mean = imitation_loss(at_lp, nat_lp, mask, "mean")
    assert torch.allclose(imitation_loss(at_lp, nat_lp, mask, "sum"), mean * 7)
    with pytest.raises(ValueError, match="il_reduction"):
        LossConfig(il_reduction="batch")


def test_format_1_model_files_keep_their_uniform_copy(tmp_path):
    """A NAT saved before 2026-12 with copy "uniform" copied the encoder's states: read as
    uniform_encoder, it decodes as it did; new files say what they copy."""
    torch.manual_seed(4)
    nat = NATLearner(tiny(copy="uniform_encoder")).eval()
    blob = {"format": 1, "kind": "nat", "config": {**nat.cfg.to_dict(), "copy": "uniform"},
            "state_dict": nat.state_dict(), "meta": {}}
    blob["config"].pop("imitation_modules")   # not in format 1's configs
    torch.save(blob, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert old.cfg.copy == "uniform_encoder" and old.cfg.imitation_modules
    src = _batch().src
    with torch.no_grad():
        assert torch.equal(old.decode(old.encode(src), torch.tensor([3, 4]))[0],
                           nat.decode(nat.encode(src), torch.tensor([3, 4]))[0])
    new = NATLearner(tiny(copy="uniform"))
    again, _ = load_model(save_model(new, tmp_path / "new.pt"))
    assert again.cfg.copy == "uniform"


# The stage hashes of three jobs on the code before these switches (commit 46d76d8): run dirs
# made then are found again, except a `copy: uniform` student, whose copy changed meaning.
BEFORE = {
    "default": {"teacher": "5d9a8c9ae81c66a2e6985fdea3cbe417e802e98c874eb48190a3564fbb36b5d6",
                "student": "8508778c2107596d92fadd85083782ae6871e0a1a5c90d03ea574c8071d4347e",
                "evaluate": "6729fa6c06f644e42a9810b0a400a540b65488cde7a4d1f65cd5655bd6acf364"},
    "no-imitation": {"student": "1f45d22ea4f2dd5521e3c64e3827c7f351ac4687f2c9adf668fed8e3fade8165"},
    "uniform": {"student": "cfee6924367f73420b267735bf435abdee2812980efcdfce91b26a99d6999d33"},
}


def test_new_student_fields_at_their_defaults_keep_the_hashes_of_existing_run_dirs():
    default = stage_hashes(spec_from_dict({"name": "x"}))
    assert {k: default[k] for k in BEFORE["default"]} == BEFORE["default"]
    explicit = spec_from_dict({"name": "x", "teacher": {"seed": None, "valid_sentences": 500},
                               "student": {"seed": None, "imitation_modules": True, "il_reduction": "mean",
                                           "valid_sentences": 500}})
    assert stage_hashes(explicit) == default
    assert stage_hashes(spec_from_dict({"name": "x", "student": {"imitation": False}}))["student"] == \
        BEFORE["no-imitation"]["student"]
    # Without L_IL, λ2 and il_reduction are read by nothing: another value trains the same student.
    for student in ({"imitation": False, "lambda2": 0.1}, {"imitation": False, "lambda2": 1.0, "il_reduction": "sum"}):
        assert stage_hashes(spec_from_dict({"name": "x", "student": student}))["student"] == \
            BEFORE["no-imitation"]["student"], student
    modules_free = {"imitation": False, "imitation_modules": False}
    assert stage_hashes(spec_from_dict({"name": "x", "student": {**modules_free, "lambda2": 0.1}})) == \
        stage_hashes(spec_from_dict({"name": "x", "student": modules_free}))
    # The paper's UniformCopy is another model than the old "uniform": retrained.
    uniform = stage_hashes(spec_from_dict({"name": "x", "student": {"copy": "uniform"}}))
    assert uniform["student"] != BEFORE["uniform"]["student"]
    assert uniform["teacher"] == default["teacher"]
    # Each switch, and a student's own seed, changes the student and what follows, nothing before.
    for student in ({"imitation": False, "imitation_modules": False}, {"il_reduction": "sum"}, {"seed": 7},
                    {"copy": "uniform_encoder"}, {"valid_sentences": None}):
        h = stage_hashes(spec_from_dict({"name": "x", "student": student}))
        assert [s for s in h if h[s] != default[s]] == ["student", "evaluate"], student
    h = stage_hashes(spec_from_dict({"name": "x", "teacher": {"seed": 7}}))
    assert [s for s in h if h[s] != default[s]] == ["teacher", "distill", "student", "evaluate"]
