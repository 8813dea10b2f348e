"""Corpus BLEU, chrF and TER from sacreBLEU on detokenized text, with their signatures.

References are one stream (a line per hypothesis) or several (a list of such streams, for a
test set with more than one reference translation per sentence), as sacreBLEU takes them.
`paired_bootstrap` tests whether one system's BLEU is above another's (Koehn, 2004), each
system possibly several runs (seeds) of one configuration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from sacrebleu.metrics import BLEU, CHRF, TER

References = Union[Sequence[str], Sequence[Sequence[str]]]
BLEU_TOKENIZERS = tuple(BLEU.TOKENIZERS)   # 13a (sacreBLEU's default), intl, zh, char, none, ja-mecab, ...
# These import optional packages (sacrebleu[ja], sacrebleu[ko]) when built: sacreBLEU raises then.
_TOKENIZERS_WITH_EXTRAS = ("ja-mecab", "ko-mecab")


@dataclass(frozen=True)
class Score:
    name: str
    score: float
    signature: str

    def __str__(self) -> str:
        return f"{self.name} = {self.score:.2f}  ({self.signature})"


def check_bleu_tokenize(name: str) -> str:
    """`name` if sacreBLEU's BLEU can tokenize with it here, else ValueError saying why (an
    unknown name, or a tokenizer whose optional package is not installed)."""
    if name not in BLEU_TOKENIZERS:
        raise ValueError(f"{name!r} is not a sacreBLEU BLEU tokenizer; one of {', '.join(BLEU_TOKENIZERS)}")
    if name in _TOKENIZERS_WITH_EXTRAS:
        try:
            BLEU(tokenize=name)
        except (ImportError, RuntimeError) as e:
            raise ValueError(f"tokenizer {name!r} is not usable here: {' '.join(str(e).split())}") from None
    return name


def _streams(hyps: Sequence[str], refs: References) -> list[list[str]]:
    """The reference streams of `refs`, each checked to have a line per hypothesis."""
    streams = [list(refs)] if all(isinstance(r, str) for r in refs) else [list(s) for s in refs]
    if not streams or not streams[0]:
        raise ValueError("cannot score an empty test set")
    for s in streams:
        if len(hyps) != len(s):
            raise ValueError(f"{len(hyps)} hypotheses but {len(s)} references")
    return streams


def _corpus(metric, name: str, hyps: Sequence[str], refs: References) -> Score:
    s = metric.corpus_score(list(hyps), _streams(hyps, refs))
    return Score(name, float(s.score), str(metric.get_signature()))


def bleu(hyps: Sequence[str], refs: References, tokenize: str = "13a") -> Score:
    return _corpus(BLEU(tokenize=tokenize), "BLEU", hyps, refs)


def chrf(hyps: Sequence[str], refs: References) -> Score:
    return _corpus(CHRF(), "chrF", hyps, refs)


def ter(hyps: Sequence[str], refs: References) -> Score:
    """Translation edit rate (lower is better), with sacreBLEU's defaults."""
    return _corpus(TER(), "TER", hyps, refs)


def paired_bootstrap(a: Sequence[Sequence[str]], b: Sequence[Sequence[str]], refs: References,
                     tokenize: str = "13a", resamples: int = 1000, seed: int = 12345) -> dict:
    """Paired bootstrap resampling of corpus BLEU: systems A and B, each one or more runs
    (seeds) of hypotheses for the same sentences. Every resample draws the sentences with
    replacement, the same draw for every run, and compares A's mean BLEU over its runs with
    B's. Returns {"a": mean BLEU of A's runs, "b": B's, "delta": a - b, "p": the share of
    resamples in which A's mean is not above B's (one-sided: small p, A better), "resamples"}.
    Sentence statistics are sacreBLEU's own (as in its paired-bs), summed per resample."""
    metric = BLEU(tokenize=tokenize)
    streams = _streams(a[0], refs)
    stats = [[np.asarray(metric._extract_corpus_statistics(list(h), streams), dtype=np.int64) for h in runs]
             for runs in (a, b)]
    n = len(streams[0])
    rng = np.random.default_rng(seed)
    draws = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)])  # (R, n)

    def mean_bleu(system: list, weights: np.ndarray) -> np.ndarray:
        """Mean over the runs of BLEU, for each row of weights (sentence counts)."""
        return np.mean([[metric._compute_score_from_stats(row).score for row in weights @ s] for s in system], axis=0)

    observed = [float(mean_bleu(system, np.ones((1, n), dtype=np.int64))[0]) for system in stats]
    diff = mean_bleu(stats[0], draws) - mean_bleu(stats[1], draws)
    return {"a": observed[0], "b": observed[1], "delta": observed[0] - observed[1],
            "p": float(np.mean(diff <= 0)), "resamples": resamples}
