"""Corpus BLEU and chrF from sacreBLEU on detokenized text, with their signatures."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF


@dataclass(frozen=True)
class Score:
    name: str
    score: float
    signature: str

    def __str__(self) -> str:
        return f"{self.name} = {self.score:.2f}  ({self.signature})"


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not refs:
        raise ValueError("cannot score an empty test set")


def bleu(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a") -> Score:
    _check(hyps, refs)
    metric = BLEU(tokenize=tokenize)
    s = metric.corpus_score(list(hyps), [list(refs)])
    return Score("BLEU", float(s.score), str(metric.get_signature()))


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> Score:
    _check(hyps, refs)
    metric = CHRF()
    s = metric.corpus_score(list(hyps), [list(refs)])
    return Score("chrF", float(s.score), str(metric.get_signature()))
