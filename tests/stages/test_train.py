"""Teacher/student training through Ray Train on a real local Ray runtime: DeepSpeed ZeRO-2
with two workers (gloo, CPU), resume from a reported checkpoint, and data-parallel
equivalence (two workers ≡ one worker accumulating their two batches: update_freq). That a
raised max_steps trains on with exactly the losses of a run trained there at once (two
workers, dropout on) is tested with a damaged checkpoint in tests/run/test_faults.py."""
import json
import shutil

import pytest
import torch
from mlflow import MlflowClient

from imitate_nat import ATDemonstrator, NATLearner
from imitate_nat.checkpoint import load_model
from orchestrator.run.runner import StageContext
from orchestrator.run.tracking import Tracker
from orchestrator.spec.loading import spec_from_dict
from orchestrator.stages.train import student, teacher

from helpers import micro_train


def run_stage(fn, run_dir, raw, stage, tracker):
    spec = spec_from_dict(raw)
    (run_dir / stage).mkdir(parents=True, exist_ok=True)
    with tracker.parent("t", {}) as _:
        with tracker.child(stage) as h:
            result = fn(StageContext(spec, run_dir, stage, tracker=h, progress=False, experiment=tracker))
            return result, h.run_id


def history(tracker, run_id, key):
    return [(m.step, m.value) for m in sorted(MlflowClient(tracker.tracking_uri).get_metric_history(run_id, key),
                                               key=lambda m: m.step)]


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "test", tmp_path / "artifacts")


def copy_run(prepared_run, tmp_path):
    run_dir, raw = prepared_run
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst, dict(raw)


def test_deepspeed_zero2_two_workers_trains_checkpoints_and_resumes(ray_local, prepared_run, tmp_path, tracker):
    """...and on the CPU without JIT-compiling DeepSpeed's shared-memory all-reduce op (a minute
    of gcc per new node, for an op only inference uses)."""
    import os
    import time
    from pathlib import Path

    started = time.time()
    run_dir, raw = copy_run(prepared_run, tmp_path)
    raw["teacher"] = micro_train(max_steps=10, workers=2, strategy="deepspeed", zero_stage=2)
    result, run_id = run_stage(teacher, run_dir, raw, "teacher", tracker)
    model, meta = load_model(run_dir / "teacher" / "model.pt")
    assert isinstance(model, ATDemonstrator) and meta["step"] == 10
    # DeepSpeed wrote a partition per rank into the Ray checkpoint
    ckpts = sorted(p for p in (run_dir / "teacher" / "ray").rglob("checkpoint_*") if p.is_dir())
    assert ckpts and list(ckpts[-1].rglob("*zero_pp_rank_1*"))
    steps = [s for s, _ in history(tracker, run_id, "train/loss")]
    assert steps == list(range(1, 11))

    # Same storage, more steps: training restores the DeepSpeed checkpoint at step 10 and goes on.
    raw["teacher"]["max_steps"] = 20
    _, run_id2 = run_stage(teacher, run_dir, raw, "teacher", tracker)
    assert [s for s, _ in history(tracker, run_id2, "train/loss")] == list(range(11, 21))
    assert load_model(run_dir / "teacher" / "model.pt")[1]["step"] in (10, 20)
    extensions = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    assert [p for p in extensions.rglob("deepspeed_shm_comm*.so") if p.stat().st_mtime >= started] == []


def test_a_run_ended_by_early_stopping_does_not_train_on_when_max_steps_rises(ray_local, prepared_run, tmp_path,
                                                                                tracker):
    run_dir, raw = copy_run(prepared_run, tmp_path)
    # A learning rate too small to change any output: valid BLEU stays put, so patience 1
    # stops the run at its second evaluation (step 4).
    raw["teacher"] = micro_train(max_steps=20, lr=1e-12, eval_every=2, checkpoint_every=2, patience=1)
    _, run_id = run_stage(teacher, run_dir, raw, "teacher", tracker)
    assert [s for s, _ in history(tracker, run_id, "valid/bleu")] == [2, 4]
    raw["teacher"]["max_steps"] = 40
    _, run_id = run_stage(teacher, run_dir, raw, "teacher", tracker)
    assert history(tracker, run_id, "train/loss") == []      # as a 40-step run would have: stopped at 4


def test_two_workers_follow_one_worker_accumulating_two_micro_batches_and_bf16_autocast_stays_close(
        ray_local, prepared_run, tmp_path, tracker):
    """batch_tokens is per worker: 2 workers (update_freq 1) take the same 2 batches a step as 1
    worker accumulating 2 micro-batches (update_freq 2), weighted by their tokens, so they make
    the same updates (dropout off; c of eq 7 is updated per worker: tiny drift only).
    precision auto is resolved by each worker for its device: bf16 only where the CPU computes
    it natively (AVX512-BF16 or AMX; emulated elsewhere, ~30x slower than fp32). So one of the
    one-worker runs is `auto`, standing for the precision it resolves to here (three fits, not four)."""
    from imitate_nat.cpu import has_native_bf16

    native = has_native_bf16()
    # the precision each one-worker run asks for, by the precision it must train in
    asked = {"fp32": "fp32" if native else "auto", "bf16": "auto" if native else "bf16"}
    curves, trained_in = {}, {}
    for workers, update_freq, precision in ((1, 2, asked["fp32"]), (2, 1, "fp32"), (1, 2, asked["bf16"])):
        run_dir, raw = copy_run(prepared_run, tmp_path / f"w{workers}{precision}")
        raw["model"] = {**raw["model"], "dropout": 0.0}
        raw["teacher"] = micro_train(max_steps=12, workers=workers, update_freq=update_freq, strategy="ddp",
                                     eval_every=12, checkpoint_every=12, precision=precision, batch_tokens=512)
        _, run_id = run_stage(teacher, run_dir, raw, "teacher", tracker)
        curves[workers, precision] = [v for _, v in history(tracker, run_id, "train/loss")]
        tags = MlflowClient(tracker.tracking_uri).get_run(run_id).data.tags
        trained_in[workers, precision] = json.loads(tags["worker.0"])["precision"]
        tokens = [v for _, v in history(tracker, run_id, "train/tokens")]
        curves[workers, "tokens"] = tokens
    one, two, bf16 = curves[1, asked["fp32"]], curves[2, "fp32"], curves[1, asked["bf16"]]
    assert trained_in == {(1, asked["fp32"]): "fp32", (2, "fp32"): "fp32", (1, asked["bf16"]): "bf16"}
    assert len(one) == len(two) == len(bf16) == 12
    assert one[-1] < one[0]                       # it learns
    assert curves[1, "tokens"] == curves[2, "tokens"]   # the same target tokens in every update
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=2e-3), (one, two)
    # ddp + bf16 is torch autocast: bf16 matmuls change the losses (so it is really on), but only
    # by rounding; the weights it trains, and the model file, stay fp32.
    assert bf16 != one
    for a, b in zip(one, bf16):
        assert b == pytest.approx(a, rel=3e-2), (one, bf16)
    model, _ = load_model(tmp_path / f"w1{asked['bf16']}" / "run" / "teacher" / "model.pt")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_auto_precision_is_bf16_only_where_native_and_emulated_bf16_warns(monkeypatch):
    """worker_precision, no Ray: auto → bf16 where the device computes bf16 products natively,
    fp32 elsewhere; bf16 asked for on a CPU that emulates it is kept, with a warning that names
    the way out; DeepSpeed's config follows the resolved precision."""
    from orchestrator.spec.schema import TrainSpec
    from orchestrator.stages import train_worker

    warned, cpu = [], torch.device("cpu")
    monkeypatch.setattr(train_worker.log, "warning", lambda msg, *args: warned.append(msg % args))
    monkeypatch.setattr(train_worker, "has_native_bf16", lambda: False)
    assert train_worker.worker_precision("auto", cpu) == "fp32" and not warned
    assert train_worker.worker_precision("fp32", cpu) == "fp32" and not warned
    assert train_worker.worker_precision("bf16", cpu) == "bf16"
    assert len(warned) == 1 and "no AVX512-BF16 or AMX" in warned[0] and "precision: auto or fp32" in warned[0]
    monkeypatch.setattr(train_worker, "has_native_bf16", lambda: True)
    assert train_worker.worker_precision("auto", cpu) == "bf16" and train_worker.worker_precision("bf16", cpu) == "bf16"
    assert len(warned) == 1
    ds = TrainSpec(strategy="deepspeed", precision="auto")
    assert "bf16" not in train_worker.deepspeed_config(ds, "fp32")
    assert train_worker.deepspeed_config(ds, "bf16")["bf16"] == {"enabled": True}


def test_student_trains_from_teacher_with_imitation(ray_local, prepared_run, tmp_path, tracker):
    run_dir, raw = copy_run(prepared_run, tmp_path)
    raw["teacher"] = micro_train(max_steps=10)
    raw["student"] = micro_train(max_steps=10, targets="raw", copy="uniform")
    run_stage(teacher, run_dir, raw, "teacher", tracker)
    result, run_id = run_stage(student, run_dir, raw, "student", tracker)
    nat, meta = load_model(run_dir / "student" / "model.pt")
    assert isinstance(nat, NATLearner) and nat.cfg.copy == "uniform"
    assert all(v > 0 for _, v in history(tracker, run_id, "train/imitation"))
    assert "best_valid_bleu" in result.metrics


def test_stage_model_comes_from_the_best_intact_checkpoint(tmp_path):
    """The stage's model.pt is the best checkpoint by valid BLEU whose checksum lists verify;
    a damaged best one is skipped for the next."""
    import json
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from orchestrator.stages.train import best_intact_model
    from orchestrator.stages.train_checkpoints import write_checksums

    ranked = []
    for name, bleu in (("good", 10.0), ("best", 20.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "model.pt").write_bytes(name.encode())
        (d / "progress.json").write_text(json.dumps({"step": 1, "best": bleu}))
        write_checksums(d, 0)
        ranked.append((Checkpoint.from_directory(str(d)), {"valid_bleu": bleu}))
    result = SimpleNamespace(best_checkpoints=ranked)
    assert best_intact_model(result, "teacher", 1) == b"best"
    (tmp_path / "best" / "model.pt").write_bytes(b"bit rot")
    assert best_intact_model(result, "teacher", 1) == b"good"
    (tmp_path / "good" / "model.pt").write_bytes(b"bit rot too")
    with pytest.raises(RuntimeError, match="no intact checkpoint"):
        best_intact_model(result, "teacher", 1)


def test_a_checkpoint_without_a_checksum_list_per_rank_is_damaged(tmp_path):
    """Checksum lists are required: a checkpoint with none (its progress.json alone once passed)
    or missing one rank's list (a partial copy) is damaged, like one whose files changed."""
    import json

    from orchestrator.stages.train_checkpoints import checkpoint_problems, write_checksums

    d = tmp_path / "checkpoint_000001"
    d.mkdir()
    (d / "model.pt").write_bytes(b"weights")
    (d / "progress.json").write_text(json.dumps({"step": 1, "best": 0.0}))
    assert checkpoint_problems(d, 1) == ["sha256-rank0.json missing"]
    write_checksums(d, 0)
    assert checkpoint_problems(d, 1) == []
    assert checkpoint_problems(d, 2) == ["sha256-rank1.json missing"]
    (d / "sha256-rank1.json").write_text("[]")
    assert checkpoint_problems(d, 2) == ["sha256-rank1.json unreadable"]


def test_remote_storage_never_restores_a_stale_run(tmp_path, monkeypatch):
    """A storage_path in another directory stands in for s3://: no wipe of the stage dir reaches
    it, and Ray Train restores a run by name from it. The fake TorchTrainer here does just that
    with the name run_trainer gives (<storage>/<name>/step: the last checkpointed step, trained
    on from there). --force and an upstream redo with new bytes (same spec) start a new run; an
    interrupted stage resumes its own run, and a raised max_steps extends it."""
    from pathlib import Path

    from ray.train import torch as ray_torch

    from helpers import fake_stages
    from orchestrator import pipeline
    from orchestrator.run.runner import StageFailed, StageResult
    from orchestrator.stages import train

    remote, trained, crash = tmp_path / "remote", [], {}

    class FakeTrainer:
        def __init__(self, loop, *, train_loop_config, run_config, **_):
            self.steps, self.run = train_loop_config["worker"].max_steps, run_config

        def fit(self):
            ckpt = Path(self.run.storage_path, self.run.name, "step")
            start, end = int(ckpt.read_text()) if ckpt.exists() else 0, crash.pop("at", self.steps)
            trained.append((start + 1, end))
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text(str(end))
            if end < self.steps:
                raise RuntimeError("driver killed")

    def fake_teacher(ctx):
        train.run_trainer(ctx, "at")
        (ctx.out_dir / "out.txt").write_text("teacher")
        return StageResult(outputs={"out.txt": "out.txt"})

    monkeypatch.setattr(ray_torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(train, "worker_config", lambda ctx, kind: ctx.spec.teacher)
    version = {"prepare": 0}
    fake_stages(monkeypatch, label=lambda stage: f"{stage}{version.get(stage, 0)}")
    fakes = pipeline.stage_functions()
    monkeypatch.setattr(pipeline, "stage_functions", lambda: {**fakes, "teacher": fake_teacher})

    def run(max_steps=10, **kw):
        raw = {"name": "fake", "workdir": str(tmp_path / "runs"),
               "teacher": {"max_steps": max_steps, "storage_path": str(remote)}}
        pipeline.run_pipeline(spec_from_dict(raw), "", progress=False, until="teacher", **kw)
        return trained[-1]

    assert run() == (1, 10)
    assert run(force="teacher") == (1, 10)                     # not (11, 10): the old run restored
    version["prepare"] = 1                                     # its redo writes other bytes
    (tmp_path / "runs" / "fake" / "prepare" / "out.txt").write_text("bit rot")
    assert run() == (1, 10)                                    # upstream changed: a new run
    crash["at"] = 4
    with pytest.raises(StageFailed, match="driver killed"):
        run(force="teacher")
    assert trained[-1] == (1, 4)
    assert run() == (5, 10)                                    # the interrupted stage resumes its run
    assert run(max_steps=25) == (11, 25)                       # extended from its last checkpoint
    assert len(list(remote.iterdir())) == 4                    # first, forced, upstream-redone, interrupted
