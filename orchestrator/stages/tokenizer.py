"""tokenizer: one joint SentencePiece model on prepare's train.src + train.tgt -> spm.model
(trained in a Ray task: its memory, ~4 GB for a 1M-sentence sample at 32k pieces, is a worker
node's, not the driver's or the head's), then the training corpus binarized with it ->
train.src.bin/.idx, train.tgt.bin/.idx (Ray tasks encode it in parallel chunks:
orchestrator/binarize.py). The training stages read these memory-mapped; valid and test stay
text (they are decoded from text and scored as text).

Metrics: trainer_seconds and binarize_seconds (wall time of each part), vocab_size (actual
pieces; the spec's value is an upper bound on tiny corpora) and
avg_src_pieces / avg_tgt_pieces, the mean number of pieces per sentence on valid (or, when
valid is empty, on up to 1000 training sentences: a seeded sample picked while streaming the
files, so the corpus is never held in memory).
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import ray

from imitate_nat.data import count_lines, iter_lines, read_lines
from imitate_nat.indexed import IndexedDataset
from imitate_nat.tokenizer import Tokenizer, train_sentencepiece

from ..binarize import binarize_files
from ..run.cluster import init_ray
from ..run.layout import SPM, bin_prefix, split_path
from ..run.runner import StageContext, StageResult

log = logging.getLogger("imitate_orch")

SAMPLE = 1000
TRAINER_THREADS = 8   # SentencePiece's trainer gains little from more


@ray.remote(num_cpus=1, max_retries=1)
def _train_task(files: list[str], model_path: str, options: dict) -> dict:
    """train_sentencepiece on whichever node Ray picks, with up to TRAINER_THREADS threads of
    that node; the model file is written (atomically) into the shared run directory. Returns
    where it ran."""
    threads = min(TRAINER_THREADS, os.cpu_count() or 1)
    train_sentencepiece(files, model_path, **options, num_threads=threads)
    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "threads": threads}


def train_tokenizer(files: list[Path], model_path: Path, options: dict) -> Tokenizer:
    """Trains the SentencePiece model in a Ray task and loads it. The task reserves one CPU, so
    it can always be placed (on a cluster whose nodes are still being launched too: the
    autoscaler starts one for it), and trains with the threads of the node it lands on; no other
    work of the job runs meanwhile."""
    where = ray.get(_train_task.remote([str(Path(f).resolve()) for f in files], str(Path(model_path).resolve()),
                                       options))
    log.info("tokenizer: trained by a Ray task (%d threads) on node %s (pid %d)", where["threads"], where["node"],
             where["pid"])
    return Tokenizer(model_path)


def _train_sample(train_files, seed: int) -> tuple[list[str], list[str]]:
    """Up to SAMPLE aligned (source, target) training lines: the same seeded sample of line
    numbers as when the files were read whole, picked while streaming them (the sample of
    SAMPLE numbers is all that is held, whatever the corpus size)."""
    n = count_lines(train_files[0])
    idx = sorted(random.Random(seed).sample(range(n), SAMPLE)) if n > SAMPLE else range(n)
    chosen = iter(idx)
    nxt = next(chosen, None)
    src, tgt = [], []
    for i, (s, t) in enumerate(zip(iter_lines(train_files[0]), iter_lines(train_files[1]))):
        if nxt is None:
            break
        if i == nxt:
            src.append(s)
            tgt.append(t)
            nxt = next(chosen, None)
    return src, tgt


def _avg_pieces(tok, lines: list[str]) -> float:
    return sum(len(ids) for ids in tok.encode_batch(lines)) / len(lines) if lines else 0.0


def tokenizer(ctx: StageContext) -> StageResult:
    spec, prep = ctx.spec.tokenizer, "prepare"
    train_files = [ctx.stage_path(prep, "train.src"), ctx.stage_path(prep, "train.tgt")]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    init_ray(ctx.spec)
    started = time.perf_counter()
    tok = train_tokenizer(train_files, ctx.out_dir / SPM, dict(
        vocab_size=spec.vocab_size, model_type=spec.model_type, character_coverage=spec.character_coverage,
        max_sentences=spec.max_sentences, seed=ctx.spec.seed))
    trainer_seconds = time.perf_counter() - started

    src = read_lines(ctx.stage_path(prep, "valid.src"))
    tgt = read_lines(ctx.stage_path(prep, "valid.tgt"))
    if not src:
        src, tgt = _train_sample(train_files, ctx.spec.seed)
    metrics = {"vocab_size": tok.vocab_size, "trainer_seconds": trainer_seconds,
               "avg_src_pieces": _avg_pieces(tok, src), "avg_tgt_pieces": _avg_pieces(tok, tgt)}
    log.info("tokenizer: %s vocab %d (asked %d), pieces/sentence src %.1f tgt %.1f", spec.model_type,
             metrics["vocab_size"], spec.vocab_size, metrics["avg_src_pieces"], metrics["avg_tgt_pieces"])
    outputs, started = {SPM: SPM}, time.perf_counter()
    prefixes = {side: bin_prefix(ctx.run_dir, "tokenizer", f"train.{side}") for side in ("src", "tgt")}
    binarize_files([(split_path(ctx.run_dir, "train", side), prefix) for side, prefix in prefixes.items()],
                   ctx.out_dir / SPM, progress=ctx.progress)
    for side, prefix in prefixes.items():
        metrics[f"train_{side}_tokens"] = float(IndexedDataset(prefix).num_tokens)
        outputs.update({n: n for n in (f"train.{side}.bin", f"train.{side}.idx")})
    metrics["binarize_seconds"] = time.perf_counter() - started
    log.info("tokenizer: trained in %.0f s, train set binarized in %.0f s", metrics["trainer_seconds"],
             metrics["binarize_seconds"])
    return StageResult(outputs=outputs, metrics=metrics)
