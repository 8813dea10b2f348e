"""teacher and student stages: Ray Train TorchTrainer around the Ray Train worker (train_worker.py).

The run's Ray Train storage (checkpoints) lives in <stage dir>/ray unless the job names a
storage_path (e.g. s3://bucket/prefix). Starting the same stage again with the same storage
resumes from the latest reported checkpoint (Ray Train V2 restores a run by name + storage).
Remote storage is never wiped with the stage dir, so the run's name (`ray_run_name`) is what
keeps a fresh start from restoring an old run there: it carries the hash of the stage's inputs
other than max_steps (`run.hashing.extend_key`), the digests of the earlier stages' outputs, and
a nonce kept in the stage dir. A resumed or extended stage (dir kept) goes on with its run; a
changed, stale or --force'd one (dir wiped) starts a new one.
The best checkpoint by valid BLEU becomes the stage's model.pt, or, with average_last, the
average of the last checkpoints if the job asks for it (train_average.py).
"""
from __future__ import annotations

import logging
import secrets

from imitate_nat.checkpoint import read_model_file
from imitate_nat.config import LossConfig
from imitate_nat.indexed import write_batch_plan
from imitate_nat.tokenizer import Tokenizer

from ..run.cluster import init_ray
from ..run.files import atomic_write_bytes, atomic_write_text, sha256_json
from ..run.hashing import consumed_digests, extend_key
from ..run.layout import DISTILLED, MODEL, PLAN, bin_prefix, model_path, split_path, spm_path
from ..run.runner import StageContext, StageResult
from ..spec.schema import TrainSpec
from .train_average import write_average_or_best
from .train_checkpoints import intact_checkpoint_dirs
from .train_worker import WorkerConfig, train_loop

log = logging.getLogger("imitate_orch")
RUN_NONCE = "ray-run-nonce"   # in the stage dir: part of the Ray Train run's name (ray_run_name)


def _loss_config(spec, kind: str) -> LossConfig:
    if kind == "at":
        t = spec.teacher
        return LossConfig(label_smoothing=t.label_smoothing, lambda1=t.lambda1)
    s = spec.student
    return LossConfig(label_smoothing=s.label_smoothing, lambda2=s.lambda2, imitation=s.imitation,
                      il_reduction=s.il_reduction, length_weight=s.length_weight)


def worker_config(ctx: StageContext, kind: str) -> WorkerConfig:
    spec = ctx.spec
    t = spec.teacher if kind == "at" else spec.student
    tok = Tokenizer(spm_path(ctx.run_dir))
    student = {"copy": spec.student.copy, "imitation_modules": spec.student.imitation_modules} if kind == "nat" else {}
    if kind == "nat" and spec.student.targets == "distilled":
        train_tgt = bin_prefix(ctx.run_dir, "distill", DISTILLED)
    else:
        train_tgt = bin_prefix(ctx.run_dir, "tokenizer", "train.tgt")
    return WorkerConfig(
        kind=kind, seed=spec.training_seed("teacher" if kind == "at" else "student"), train=t, model=spec.model.to_model_config(tok.vocab_size, **student),
        losses=_loss_config(spec, kind), spm=str(spm_path(ctx.run_dir)),
        train_src=str(bin_prefix(ctx.run_dir, "tokenizer", "train.src")), train_tgt=str(train_tgt),
        train_plan=str(ctx.out_dir / PLAN),
        valid_src=str(split_path(ctx.run_dir, "valid", "src")), valid_tgt=str(split_path(ctx.run_dir, "valid", "tgt")),
        valid_sentences=t.valid_sentences, teacher=str(model_path(ctx.run_dir, "teacher")),
        init_from_teacher=kind == "nat" and spec.student.init_from_teacher, threads=max(1, int(t.cpus_per_worker)),
        progress=ctx.progress, tracker=ctx.experiment, run_id=ctx.tracker.run_id)


def ray_run_name(ctx: StageContext) -> str:
    """The name Ray Train stores and restores this stage's run under. The nonce is made when
    the stage dir holds none: the runner empties the dir for a fresh start (first run, --force,
    stale upstream, changed inputs) and keeps it to resume after an interruption or to extend,
    so the nonce, unlike one drawn per invocation, tells those apart. The upstream digests tie
    the run to the bytes it trains on whoever kept the dir (a caller other than the runner)."""
    nonce = ctx.out_dir / RUN_NONCE
    if not nonce.is_file():
        atomic_write_text(nonce, secrets.token_hex(8))
    key = sha256_json({"extend_key": extend_key(ctx.spec, ctx.stage), "nonce": nonce.read_text().strip(),
                       "upstream": consumed_digests(ctx.run_dir, ctx.stage)})
    return f"{ctx.spec.name}-{ctx.stage}-{key[:12]}"


def checkpoint_config(t: TrainSpec):
    """The checkpoints Ray Train keeps: the 2 best by valid BLEU, or for averaging the last
    average_last (Ray also keeps the latest, which resuming needs)."""
    import ray.train

    if t.average_last:
        return ray.train.CheckpointConfig(num_to_keep=t.average_last, checkpoint_score_attribute="step",
                                          checkpoint_score_order="max")
    return ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="valid_bleu",
                                      checkpoint_score_order="max")


def run_trainer(ctx: StageContext, kind: str, callbacks=()):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = ctx.spec.teacher if kind == "at" else ctx.spec.student
    storage = t.storage_path or str((ctx.out_dir / "ray").resolve())
    resources = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"worker": worker_config(ctx, kind)},
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend=None if t.backend == "auto" else t.backend),
        run_config=ray.train.RunConfig(
            name=ray_run_name(ctx), storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=checkpoint_config(t),
            callbacks=list(callbacks)),  # e.g. Tune's report callback in a sweep trial
    )
    return trainer.fit()


def train_model(ctx: StageContext, kind: str, callbacks=()) -> StageResult:
    """Train the AT ("at") or NAT ("nat") of this stage; its best checkpoint (or the average of
    its last ones) becomes model.pt."""
    init_ray(ctx.spec)   # a no-op under `run` or a sweep, which started (or joined) the cluster
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    t = ctx.spec.teacher if kind == "at" else ctx.spec.student
    per_update = t.batch_tokens * t.workers * t.update_freq
    log.info("%s: up to %d tokens per update (batch_tokens %d per worker × %d worker(s) × update_freq %d; "
             "padding included)", ctx.stage, per_update, t.batch_tokens, t.workers, t.update_freq)
    ctx.tracker.log_params({"tokens_per_update_max": per_update})   # the real count: metric train/tokens
    # Planned once, here, into the (shared) stage dir; the workers memory-map it (kept on resume).
    c = worker_config(ctx, kind)
    plan = write_batch_plan(c.train_src, c.train_tgt, c.model.max_positions, t.batch_tokens, c.train_plan)
    log.info("%s: %d training pairs in %d batches", ctx.stage, plan["pairs"], plan["batches"])
    result = run_trainer(ctx, kind, callbacks)
    if t.average_last:
        metrics = write_average_or_best(ctx, c, result)
    else:
        atomic_write_bytes(ctx.out_dir / MODEL, best_intact_model(result, ctx.stage, t.workers))
        meta = read_model_file(ctx.out_dir / MODEL)["meta"]
        metrics = {"best_valid_bleu": float(meta["valid_bleu"]), "best_step": float(meta["step"])}
    log.info("%s: best valid BLEU %.2f at step %d", ctx.stage, metrics["best_valid_bleu"], metrics["best_step"])
    return StageResult(outputs={MODEL: MODEL},
                       metrics={**metrics, "final_valid_bleu": float(result.metrics.get("valid_bleu", float("nan")))})


def best_intact_model(result, stage: str, ranks: int) -> bytes:
    """model.pt of the best checkpoint by valid BLEU whose `ranks` checksum lists (one per
    worker) are all there and verify (a damaged one is skipped with a warning, as when resuming)."""
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get("valid_bleu", float("-inf")),
                    reverse=True)
    for d in intact_checkpoint_dirs([checkpoint for checkpoint, _ in ranked], stage, ranks):
        return (d / MODEL).read_bytes()
    raise RuntimeError(f"{stage}: training reported no intact checkpoint")


def teacher(ctx: StageContext) -> StageResult:
    return train_model(ctx, "at")


def student(ctx: StageContext) -> StageResult:
    return train_model(ctx, "nat")


