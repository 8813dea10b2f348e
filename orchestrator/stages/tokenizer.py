"""tokenizer: one joint SentencePiece model on prepare's train.src + train.tgt -> spm.model,
then the training corpus binarized with it -> train.src.bin/.idx, train.tgt.bin/.idx (Ray
tasks encode it in parallel chunks: orchestrator/binarize.py). The training stages read these
memory-mapped; valid and test stay text (they are decoded from text and scored as text).

Metrics: vocab_size (actual pieces; the spec's value is an upper bound on tiny corpora) and
avg_src_pieces / avg_tgt_pieces, the mean number of pieces per sentence on valid (or, when
valid is empty, on up to 1000 training sentences: a seeded sample picked while streaming the
files, so the corpus is never held in memory).
"""
from __future__ import annotations

import logging
import random

from imitate_nat.data import count_lines, iter_lines, read_lines
from imitate_nat.indexed import IndexedDataset
from imitate_nat.tokenizer import train_sentencepiece

from ..binarize import binarize
from ..run.cluster import init_ray
from ..run.layout import SPM, bin_prefix, split_path
from ..run.runner import StageContext, StageResult

log = logging.getLogger("imitate_orch")

SAMPLE = 1000


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
    tok = train_sentencepiece(train_files, ctx.out_dir / SPM, vocab_size=spec.vocab_size,
                              model_type=spec.model_type, character_coverage=spec.character_coverage,
                              max_sentences=spec.max_sentences, seed=ctx.spec.seed)

    src = read_lines(ctx.stage_path(prep, "valid.src"))
    tgt = read_lines(ctx.stage_path(prep, "valid.tgt"))
    if not src:
        src, tgt = _train_sample(train_files, ctx.spec.seed)
    metrics = {"vocab_size": tok.vocab_size,
               "avg_src_pieces": _avg_pieces(tok, src), "avg_tgt_pieces": _avg_pieces(tok, tgt)}
    log.info("tokenizer: %s vocab %d (asked %d), pieces/sentence src %.1f tgt %.1f", spec.model_type,
             metrics["vocab_size"], spec.vocab_size, metrics["avg_src_pieces"], metrics["avg_tgt_pieces"])
    init_ray(ctx.spec)
    outputs = {SPM: SPM}
    for side in ("src", "tgt"):
        prefix = bin_prefix(ctx.run_dir, "tokenizer", f"train.{side}")
        binarize(split_path(ctx.run_dir, "train", side), ctx.out_dir / SPM, prefix, progress=ctx.progress)
        metrics[f"train_{side}_tokens"] = float(IndexedDataset(prefix).num_tokens)
        outputs.update({n: n for n in (f"train.{side}.bin", f"train.{side}.idx")})
    return StageResult(outputs=outputs, metrics=metrics)
