"""Checkpoint averaging (teacher/student average_last, average_pick): the pure averaging of
model weights, the stage's identity, and one short real Ray Train run whose kept checkpoints
are averaged, scored and picked from (again, with other settings, on the same checkpoints)."""
import json
import logging
import shutil

import pytest
import torch
from mlflow import MlflowClient

from imitate_nat import ATDemonstrator, preset
from imitate_nat.checkpoint import CheckpointError, average_model_files, average_state_dicts, load_model, save_model
from orchestrator.run.hashing import can_extend, extend_key, stage_hashes
from orchestrator.run.manifest import Manifest
from orchestrator.spec.loading import spec_from_dict

from helpers import MICRO_MODEL, micro_train


# ------------------------------------------------------------------------- pure averaging --

def test_average_of_state_dicts_is_the_element_wise_mean_in_fp32_with_dtypes_kept():
    bf16 = torch.bfloat16
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([256.0], dtype=bf16), "n": torch.tensor([3])}
    b = {"w": torch.tensor([3.0, 5.0]), "h": torch.tensor([1.0], dtype=bf16), "n": torch.tensor([3])}
    c = {"w": torch.tensor([5.0, 8.0]), "h": torch.tensor([1.0], dtype=bf16), "n": torch.tensor([3])}
    mean = average_state_dicts(iter([a, b, c]))
    assert torch.equal(mean["w"], torch.tensor([3.0, 5.0]))
    # Summed in bf16, 256 + 1 + 1 stays 256 (8 bits of mantissa) and the mean would be 85.5.
    assert mean["h"].dtype == bf16 and torch.equal(mean["h"], torch.tensor([86.0], dtype=bf16))
    assert torch.equal(mean["n"], torch.tensor([3]))               # integer buffers: equal, kept
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))           # the inputs are left alone


def test_average_of_state_dicts_refuses_what_cannot_be_averaged():
    w = {"w": torch.zeros(2), "n": torch.tensor([1])}
    with pytest.raises(CheckpointError, match="no state dicts"):
        average_state_dicts([])
    with pytest.raises(CheckpointError, match="different keys"):
        average_state_dicts([w, {"w": torch.zeros(2)}])
    with pytest.raises(CheckpointError, match="shapes"):
        average_state_dicts([w, {"w": torch.zeros(3), "n": torch.tensor([1])}])
    with pytest.raises(CheckpointError, match="differs"):
        average_state_dicts([w, {"w": torch.zeros(2), "n": torch.tensor([2])}])


def test_average_of_model_files_builds_the_model_of_their_mean(tmp_path):
    cfg = preset("tiny", vocab_size=50, **{k: v for k, v in MICRO_MODEL.items() if k != "size"})
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(save_model(ATDemonstrator(cfg), tmp_path / f"m{seed}.pt", meta={"step": seed}))
    model, metas = average_model_files(paths)
    first, second = (load_model(p)[0].state_dict() for p in paths)
    assert metas == [{"step": 1}, {"step": 2}] and not model.training
    for k, v in model.state_dict().items():
        assert torch.allclose(v, (first[k] + second[k]) / 2), k
    other = preset("tiny", vocab_size=60, **{k: v for k, v in MICRO_MODEL.items() if k != "size"})
    save_model(ATDemonstrator(other), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="another kind or config"):
        average_model_files([paths[0], tmp_path / "other.pt"])


# ------------------------------------------------------------------------------ identity --

def test_averaging_is_part_of_the_training_stage_identity_only_when_on():
    base = spec_from_dict({"name": "x"})
    hashes = stage_hashes(base)
    # Off, its fields change nothing (and run dirs from before they existed keep their hashes).
    assert stage_hashes(spec_from_dict({"name": "x", "teacher": {"average_pick": "averaged"}})) == hashes
    on = spec_from_dict({"name": "x", "teacher": {"average_last": 5}})
    assert [s for s in hashes if stage_hashes(on)[s] != hashes[s]] == ["teacher", "distill", "student", "evaluate"]
    picked = spec_from_dict({"name": "x", "teacher": {"average_last": 5, "average_pick": "averaged"}})
    assert stage_hashes(picked)["teacher"] != stage_hashes(on)["teacher"]
    # Not an extension of a run that kept other checkpoints: the stage retrains.
    trained = Manifest(stage="teacher", input_hash=hashes["teacher"], status="done",
                       extend_key=extend_key(base, "teacher"), max_steps=base.teacher.max_steps)
    assert can_extend(trained, spec_from_dict({"name": "x", "teacher": {"max_steps": 200000}}), "teacher")
    assert not can_extend(trained, on, "teacher")
    assert not can_extend(trained, spec_from_dict({"name": "x", "teacher": {"average_last": 5,
                                                                            "max_steps": 200000}}), "teacher")


# ------------------------------------------------------------------ one real Ray Train run --

@pytest.mark.slow
def test_a_run_averages_its_last_checkpoints_and_keeps_what_the_job_asks(ray_local, prepared_run, tmp_path,
                                                                         monkeypatch, caplog):
    """30 steps, a checkpoint every 10, average_last 5: the 3 checkpoints there are are averaged.
    Through the runner: model.pt, the stage's metrics in the manifest and in MLflow. Then the
    same kept checkpoints again: "averaged" writes their mean; "better" keeps whichever scores
    higher on valid; a damaged checkpoint is left out with a warning."""
    from orchestrator.run.layout import run_dir
    from orchestrator.run.manifest import read_manifest
    from orchestrator.run.runner import StageContext, run_stage
    from orchestrator.run.tracking import Tracker
    from orchestrator.stages import train, train_average

    src, raw = prepared_run
    shutil.copytree(src, tmp_path / "t")
    raw = {**raw, "workdir": str(tmp_path),
           "teacher": micro_train(max_steps=30, checkpoint_every=10, eval_every=10, average_last=5)}
    spec = spec_from_dict(raw)
    results, run_trainer = [], train.run_trainer

    def keeping_the_result(*args, **kw):   # Ray Train's result, to pick from its checkpoints again below
        results.append(run_trainer(*args, **kw))
        return results[-1]

    monkeypatch.setattr(train, "run_trainer", keeping_the_result)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "test", tmp_path / "artifacts")
    with tracker.parent("t", {}) as _:
        metrics = run_stage(spec, "teacher", train.teacher, tracker=tracker, progress=False)

    stage_dir = run_dir(spec) / "teacher"
    kept = sorted((p for p in (stage_dir / "ray").rglob("checkpoint_*") if p.is_dir()),
                  key=lambda p: json.loads((p / "progress.json").read_text())["step"])
    assert len(kept) == 3 and metrics["averaged_checkpoints"] == 3           # fewer than 5: all there are
    bleus = {"averaged": metrics["averaged_valid_bleu"], "best": metrics["best_valid_bleu"]}
    assert metrics["averaged_kept"] == float(bleus["averaged"] >= bleus["best"])    # "better" by default
    _, meta = load_model(stage_dir / "model.pt")
    assert meta["valid_bleu"] == max(bleus.values())
    assert read_manifest(stage_dir).metrics == metrics                       # `status` reads them there
    logged = MlflowClient(tracker.tracking_uri).get_run(tracker.last_child["teacher"]).data.metrics
    for key in ("averaged_valid_bleu", "best_valid_bleu", "averaged_kept"):
        assert logged[key] == metrics[key]

    def pick(pick, averaged_bleu=None):
        """The stage's model.pt from the same checkpoints with average_pick `pick` (and the
        average's valid BLEU forced to `averaged_bleu`)."""
        if averaged_bleu is not None:
            monkeypatch.setattr(train_average, "valid_bleu", lambda *a: averaged_bleu)
        s = spec_from_dict({**raw, "teacher": {**raw["teacher"], "average_pick": pick}})
        ctx = StageContext(s, run_dir(s), "teacher", progress=False)
        out = train_average.write_average_or_best(ctx, train.worker_config(ctx, "at"), results[0])
        return out, load_model(stage_dir / "model.pt")

    def mean_of(checkpoints):
        states = [load_model(d / "model.pt")[0].state_dict() for d in checkpoints]
        return {k: sum(s[k] for s in states) / len(states) for k in states[0]}

    out, (model, meta) = pick("averaged")
    assert out["averaged_kept"] == 1.0 and meta["averaged_steps"] == [30, 20, 10]
    for k, v in mean_of(kept).items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    best_single = load_model(kept[-1] / "best-model.pt")
    out, (model, meta) = pick("better", averaged_bleu=best_single[1]["valid_bleu"] - 1)
    assert out["averaged_kept"] == 0.0 and meta == best_single[1]
    out, (model, meta) = pick("better", averaged_bleu=best_single[1]["valid_bleu"] + 1)
    assert out["averaged_kept"] == 1.0 and meta["valid_bleu"] == best_single[1]["valid_bleu"] + 1

    (kept[1] / "model.pt").write_bytes(b"bit rot")                            # the checkpoint at step 20
    with caplog.at_level(logging.WARNING, logger="imitate_orch"):
        out, (model, meta) = pick("averaged")
    assert "skipping damaged checkpoint" in caplog.text and "model.pt checksum mismatch" in caplog.text
    assert out["averaged_checkpoints"] == 2 and meta["averaged_steps"] == [30, 10]
    for k, v in mean_of([kept[0], kept[2]]).items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
