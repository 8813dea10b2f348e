"""tokenizer: one joint SentencePiece model on prepare's train.src + train.tgt -> spm.model.

Metrics: vocab_size (actual pieces; the spec's value is an upper bound on tiny corpora) and
avg_src_pieces / avg_tgt_pieces, the mean number of pieces per sentence on valid (or, when
valid is empty, on up to 1000 training sentences).
"""
from __future__ import annotations

import logging
import random

from imitate_nat.data import read_lines
from imitate_nat.tokenizer import train_sentencepiece

from ..run.layout import SPM
from ..run.runner import StageContext, StageResult

log = logging.getLogger("imitate_orch")

SAMPLE = 1000


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
        src, tgt = (read_lines(p) for p in train_files)
        if len(src) > SAMPLE:
            idx = sorted(random.Random(ctx.spec.seed).sample(range(len(src)), SAMPLE))
            src, tgt = [src[i] for i in idx], [tgt[i] for i in idx]
    metrics = {"vocab_size": tok.vocab_size,
               "avg_src_pieces": _avg_pieces(tok, src), "avg_tgt_pieces": _avg_pieces(tok, tgt)}
    log.info("tokenizer: %s vocab %d (asked %d), pieces/sentence src %.1f tgt %.1f", spec.model_type,
             metrics["vocab_size"], spec.vocab_size, metrics["avg_src_pieces"], metrics["avg_tgt_pieces"])
    return StageResult(outputs={SPM: SPM}, metrics=metrics)
