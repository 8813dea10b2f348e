"""Checkpoint averaging for the teacher and student stages (average_last N >= 2).

Ray Train keeps the run's last N checkpoints (train.checkpoint_config), each carrying the best
model file so far (train_checkpoints.BEST_MODEL). The stage averages the model weights of the
newest N that verify (a damaged one is skipped with a warning; fewer than N kept: those there
are), scores the average on the valid sentences training validates on with the same decoding
(train_worker.valid_bleu), and keeps the average or the best single checkpoint as `average_pick`
says. The score is computed on the driver's CPU: fine for the 500 sentences, and one place.
"""
from __future__ import annotations

import itertools
import logging

import torch

from imitate_nat.checkpoint import average_model_files, read_model_file, save_model
from imitate_nat.tokenizer import Tokenizer

from ..run.files import atomic_write_bytes
from ..run.layout import MODEL
from ..run.runner import StageContext
from .train_checkpoints import BEST_MODEL, intact_checkpoint_dirs
from .train_worker import WorkerConfig, valid_bleu, valid_set

log = logging.getLogger("imitate_orch")


def newest_first(result) -> list:
    """The checkpoints Ray Train kept, newest first."""
    return [cp for cp, _ in sorted(result.best_checkpoints or [], key=lambda cm: cm[1]["step"], reverse=True)]


def write_average_or_best(ctx: StageContext, c: WorkerConfig, result) -> dict[str, float]:
    """Write the stage's model.pt from an averaging run (`result`: Ray Train's) and return the
    stage's metrics: the best single checkpoint's valid BLEU and step, the average's valid BLEU,
    how many checkpoints it averages, and averaged_kept (1: model.pt is the average, 0: the best)."""
    t = c.train
    dirs = intact_checkpoint_dirs(newest_first(result), ctx.stage, t.workers)
    newest = next(dirs, None)
    if newest is None:
        raise RuntimeError(f"{ctx.stage}: training reported no intact checkpoint")
    best_file = (newest / BEST_MODEL).read_bytes()      # the newest intact one knows the best so far
    best = read_model_file(newest / BEST_MODEL)["meta"]
    # Read one at a time, each while its (possibly downloaded) checkpoint dir is open.
    files = itertools.chain([newest / MODEL], (d / MODEL for d in itertools.islice(dirs, t.average_last - 1)))
    model, metas = average_model_files(files)
    steps = [int(m["step"]) for m in metas]
    score = valid_bleu(model, c.kind, Tokenizer(c.spm), *valid_set(c), torch.device("cpu"))
    keep_average = t.average_pick == "averaged" or score >= best["valid_bleu"]
    log.info("%s: the average of the checkpoints at steps %s scores valid BLEU %.2f, the best checkpoint "
             "(step %d) %.2f: model.pt is the %s", ctx.stage, steps, score, best["step"], best["valid_bleu"],
             "average" if keep_average else "best checkpoint")
    if keep_average:
        save_model(model, ctx.out_dir / MODEL, meta={"step": steps[0], "valid_bleu": score, "kind": c.kind,
                                                     "averaged_steps": steps})
    else:
        atomic_write_bytes(ctx.out_dir / MODEL, best_file)
    return {"best_valid_bleu": float(best["valid_bleu"]), "best_step": float(best["step"]),
            "averaged_valid_bleu": float(score), "averaged_checkpoints": float(len(steps)),
            "averaged_kept": float(keep_average)}
