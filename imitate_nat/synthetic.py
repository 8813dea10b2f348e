"""A deterministic toy language pair: the embedded default corpus (no download).

The pair is built to have what makes non-autoregressive translation hard: the "highly
multimodal distribution of target translations" of paper §3.3.2, a target length the NAT
must predict (§3.3.1, §4 LPD), and word order and agreement that depend on other positions:

* reordering  - the target is verb-final in every clause and puts adjectives after the noun,
  prepositional phrases before the object;
* length change - some content words become two target words (compound nouns, separable
  verbs), "some" leaves no article, and "in/on the" fuse into one word before m/n nouns;
* agreement   - every target noun has a gender (m/f/n) that picks the determiner form and the
  adjective suffix, even though the adjectives now stand after the noun;
* multimodality - about half of the content words have 2-3 target synonyms (possibly with
  different genders and lengths), drawn at random per example, and a clause adverb goes
  either to the start of its clause or right before the verb.

`translate(src)` without an rng gives the canonical translation (first synonym, adverb
first): a consistent "teacher" whose outputs have no multimodality, which is what sequence-
level distillation should approach. With an rng it samples one valid reference among several,
as human data does.

Source grammar (English-like, lowercase, space-separated, 4-20 words):
    S      -> Clause (("and" | "but") Clause)?
    Clause -> NP "never"? Verb NP? (Prep NP)? Adverb?
    NP     -> Det ("very"? Adj){0,2} Noun
Only the standard library is used (and .atomic, itself stdlib only); `random.Random` with an
int seed is stable across Python versions, and no set is ever iterated, so everything is
reproducible from the seeds.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from .atomic import atomic_writer

GENDERS = ("m", "f", "n")
ADJ_SUFFIX = {"m": "o", "f": "a", "n": "e"}     # adjective ending chosen by the noun's gender
# Determiner -> form per gender. "some" vanishes in the target (zero article).
DETERMINERS = {
    "the": {"m": "dor", "f": "dia", "n": "dus"},
    "a": {"m": "ain", "f": "aina", "n": "ainu"},
    "this": {"m": "dis", "f": "disa", "n": "disu"},
    "every": {"m": "jed", "f": "jeda", "n": "jedu"},
    "my": {"m": "min", "f": "mina", "n": "minu"},
    "some": {"m": "", "f": "", "n": ""},
}
PREPOSITIONS = {"in": "ina", "on": "ubo", "with": "mit", "near": "bai", "under": "unta", "behind": "hintor"}
# "in the" / "on the" before a masculine or neuter noun fuse into one word (like German im/am).
FUSED = {("in", "m"): "imo", ("in", "n"): "imo", ("on", "m"): "umo", ("on", "n"): "umo"}
CONJUNCTIONS = {"and": "ond", "but": "abar"}
NEGATION = ("never", "nia")                    # moves to just before the verb
INTENSIFIER = ("very", "sehra")                # stays before its adjective
CLOSED_CLASS = tuple(DETERMINERS) + tuple(PREPOSITIONS) + tuple(CONJUNCTIONS) + (NEGATION[0], INTENSIFIER[0])
PARTICLES = ("ab", "zu", "vor", "weg", "aus")  # first word of a two-word (separable) verb

# A few real English words per class so samples read naturally; the rest are made up.
REAL = {
    "noun": "dog cat bird horse garden house river tree child teacher farmer king queen ship "
            "town road book table window friend".split(),
    "adj": "big small red old young green happy quiet dark bright".split(),
    "verb": "sees likes finds follows watches carries helps calls".split(),
    "adv": "quickly slowly often today again".split(),
}
SHARE = {"noun": 0.40, "adj": 0.20, "verb": 0.25, "adv": 0.15}   # of vocab_words
SYNONYM_RATE = 0.5     # fraction of content words with 2-3 target synonyms
TWO_WORD_RATE = 0.15   # chance that a noun/verb synonym is two target words
ZIPF = 0.8             # word frequency ~ 1 / rank**ZIPF inside each class


def _pseudo(rng: random.Random, onsets, vowels, codas, syllables: int) -> str:
    return "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(codas)


def _src_word(rng: random.Random, cls: str) -> str:
    """A pronounceable English-looking word whose ending marks its class (blorky, snemps)."""
    stem = _pseudo(rng, "b bl br d dr f fl g gl gr k kr m n p pl pr s sn st sp t tr v w z".split(),
                   "a e i o u oo ee".split(), "b d g k m mp nk nd sh t ck".split(), rng.choice((1, 1, 2)))
    return stem + {"noun": "", "adj": "y", "verb": "s", "adv": "ly"}[cls]


def _tgt_word(rng: random.Random, final_consonant: bool = False) -> str:
    """A made-up target word (lowercase ASCII, consonant-vowel syllables)."""
    codas = "n r l t s ch ck ng nd rt".split() + ([] if final_consonant else [""] * 4)
    return _pseudo(rng, "b d f g h k l m n p r s t v w z br dr gr kr st tr sp pl fl kl sch".split(),
                   "a e i o u ei au ie".split(), codas, rng.choice((1, 2, 2)))


@dataclass(repr=False)
class SyntheticLanguage:
    """The lexicon: source word -> list of target synonyms (index 0 is canonical)."""
    seed: int
    vocab_words: int
    nouns: dict[str, list[tuple[tuple[str, ...], str]]]   # word -> [(target words, gender)]
    adjectives: dict[str, list[str]]                       # word -> [stem] (+ gender suffix)
    verbs: dict[str, list[tuple[str, ...]]]                # word -> [target words]
    adverbs: dict[str, list[str]]                          # word -> [target word]

    @classmethod
    def build(cls, seed: int = 0, vocab_words: int = 300) -> "SyntheticLanguage":
        if vocab_words < 4:
            raise ValueError(f"vocab_words must be >= 4 (one word per class), got {vocab_words}")
        rng = random.Random(seed)
        counts = {c: max(1, round(vocab_words * s)) for c, s in SHARE.items() if c != "noun"}
        counts["noun"] = vocab_words - sum(counts.values())
        # Source words: the real ones first (most frequent under Zipf), then made-up ones.
        used_src = set(CLOSED_CLASS) | {w for ws in REAL.values() for w in ws}
        src = {}
        for c in ("noun", "adj", "verb", "adv"):
            words = REAL[c][:counts[c]]
            while len(words) < counts[c]:
                w = _src_word(rng, c)
                if w not in used_src:
                    used_src.add(w)
                    words.append(w)
            src[c] = words
        # Target words are unique across the whole lexicon (including adjective forms), so a
        # target word never has two meanings and each noun form has exactly one gender.
        used_tgt = {f for d in DETERMINERS.values() for f in d.values()} | set(PREPOSITIONS.values()) \
            | set(FUSED.values()) | set(CONJUNCTIONS.values()) | {NEGATION[1], INTENSIFIER[1], *PARTICLES}

        def fresh(final_consonant: bool = False) -> str:
            while True:
                w = _tgt_word(rng, final_consonant)
                forms = [w + s for s in ADJ_SUFFIX.values()] if final_consonant else [w]
                if not any(f in used_tgt for f in forms):
                    used_tgt.update(forms)
                    return w

        def n_syn() -> int:
            return rng.choice((2, 2, 3)) if rng.random() < SYNONYM_RATE else 1

        def maybe_two(head: str, first: str) -> tuple[str, ...]:
            return (first, head) if rng.random() < TWO_WORD_RATE else (head,)

        nouns = {w: [(maybe_two(fresh(), fresh()), rng.choice(GENDERS)) for _ in range(n_syn())] for w in src["noun"]}
        adjectives = {w: [fresh(final_consonant=True) for _ in range(n_syn())] for w in src["adj"]}
        verbs = {w: [maybe_two(fresh(), rng.choice(PARTICLES)) for _ in range(n_syn())] for w in src["verb"]}
        adverbs = {w: [fresh() for _ in range(n_syn())] for w in src["adv"]}
        return cls(seed, vocab_words, nouns, adjectives, verbs, adverbs)

    def __post_init__(self) -> None:
        # Word -> class for parsing, and Zipf cumulative weights for sampling.
        self.word_class: dict[str, str] = {}
        for c, d in (("noun", self.nouns), ("adj", self.adjectives), ("verb", self.verbs), ("adv", self.adverbs)):
            self.word_class.update(dict.fromkeys(d, c))
        self._cum = {c: list(accumulate(1.0 / (r + 1) ** ZIPF for r in range(len(d))))
                     for c, d in (("noun", self.nouns), ("adj", self.adjectives),
                                  ("verb", self.verbs), ("adv", self.adverbs))}
        self._lists = {"noun": list(self.nouns), "adj": list(self.adjectives),
                       "verb": list(self.verbs), "adv": list(self.adverbs)}

    def __repr__(self) -> str:
        return f"SyntheticLanguage(seed={self.seed}, vocab_words={self.vocab_words})"

    # ---- sampling sources -------------------------------------------------------------
    def _pick(self, rng: random.Random, c: str) -> str:
        return rng.choices(self._lists[c], cum_weights=self._cum[c])[0]

    def _np(self, rng: random.Random) -> list[str]:
        out = [rng.choices(list(DETERMINERS), weights=(5, 3, 1, 1, 1, 1))[0]]
        for _ in range(rng.choices((0, 1, 2), weights=(50, 35, 15))[0]):
            out += ([INTENSIFIER[0]] if rng.random() < 0.15 else []) + [self._pick(rng, "adj")]
        return out + [self._pick(rng, "noun")]

    def _clause(self, rng: random.Random) -> list[str]:
        out = self._np(rng) + ([NEGATION[0]] if rng.random() < 0.1 else []) + [self._pick(rng, "verb")]
        if rng.random() < 0.7:
            out += self._np(rng)
        if rng.random() < 0.35:
            out += [rng.choice(list(PREPOSITIONS))] + self._np(rng)
        if rng.random() < 0.3:
            out.append(self._pick(rng, "adv"))
        return out

    def sample_source(self, rng: random.Random) -> str:
        """One source sentence of 4-20 words (resampled until the length fits)."""
        while True:
            words = self._clause(rng)
            if rng.random() < 0.25:
                words += [rng.choice(list(CONJUNCTIONS))] + self._clause(rng)
            if 4 <= len(words) <= 20:
                return " ".join(words)

    # ---- translation ----------------------------------------------------------------
    def _parse_np(self, toks: list[str], i: int):
        """-> ((det, [(very, adj)], noun), next index). Raises ValueError off-grammar."""
        if i >= len(toks) or toks[i] not in DETERMINERS:
            raise ValueError(f"expected a determiner at word {i} of {' '.join(toks)!r}")
        det, adjs, i = toks[i], [], i + 1
        while i < len(toks) and (toks[i] == INTENSIFIER[0] or self.word_class.get(toks[i]) == "adj"):
            very = toks[i] == INTENSIFIER[0]
            i += very
            if i >= len(toks) or self.word_class.get(toks[i]) != "adj":
                raise ValueError(f"'very' must precede an adjective in {' '.join(toks)!r}")
            adjs.append((very, toks[i]))
            i += 1
        if i >= len(toks) or self.word_class.get(toks[i]) != "noun":
            raise ValueError(f"expected a noun at word {i} of {' '.join(toks)!r}")
        return (det, adjs, toks[i]), i + 1

    def _choose(self, options: list, rng: random.Random | None):
        return options[0] if rng is None else rng.choice(options)

    def _render_np(self, np, rng, prep: str | None = None) -> list[str]:
        det, adjs, noun = np
        words, gender = self._choose(self.nouns[noun], rng)
        if prep is not None and det == "the" and (prep, gender) in FUSED:
            head = [FUSED[(prep, gender)]]                  # "in the" -> one word
        else:
            head = ([PREPOSITIONS[prep]] if prep else []) + [DETERMINERS[det][gender]]
        out = [w for w in head if w] + list(words)          # noun first, adjectives after it
        for very, adj in adjs:
            out += ([INTENSIFIER[1]] if very else []) + [self._choose(self.adjectives[adj], rng) + ADJ_SUFFIX[gender]]
        return out

    def _translate_clause(self, toks: list[str], rng: random.Random | None) -> list[str]:
        subj, i = self._parse_np(toks, 0)
        neg = i < len(toks) and toks[i] == NEGATION[0]
        i += neg
        if i >= len(toks) or self.word_class.get(toks[i]) != "verb":
            raise ValueError(f"expected a verb at word {i} of {' '.join(toks)!r}")
        verb, i = toks[i], i + 1
        obj = pp = adv = None
        if i < len(toks) and toks[i] in DETERMINERS:
            obj, i = self._parse_np(toks, i)
        if i < len(toks) and toks[i] in PREPOSITIONS:
            prep = toks[i]
            pp_np, i = self._parse_np(toks, i + 1)
            pp = (prep, pp_np)
        if i < len(toks) and self.word_class.get(toks[i]) == "adv":
            adv, i = toks[i], i + 1
        if i != len(toks):
            raise ValueError(f"unexpected word {toks[i]!r} in {' '.join(toks)!r}")
        # Render in a fixed left-to-right order so rng draws are reproducible.
        subj_t = self._render_np(subj, rng)
        verb_t = list(self._choose(self.verbs[verb], rng))
        obj_t = self._render_np(obj, rng) if obj else []
        pp_t = self._render_np(pp[1], rng, prep=pp[0]) if pp else []
        adv_t = [self._choose(self.adverbs[adv], rng)] if adv else []
        # Free word order: canonical puts the adverb first; a variant puts it before the verb.
        adv_first = rng is None or rng.random() < 0.5
        middle = subj_t + pp_t + obj_t
        neg_t = [NEGATION[1]] if neg else []
        if adv_first:
            return adv_t + middle + neg_t + verb_t
        return middle + adv_t + neg_t + verb_t       # verb-final either way

    def translate(self, src: str, rng: random.Random | None = None) -> str:
        """Canonical translation when rng is None, else one random valid variant."""
        toks = src.split()
        out, clause = [], []
        for t in toks + [None]:
            if t is None or t in CONJUNCTIONS:
                out += self._translate_clause(clause, rng)
                if t is not None:
                    out.append(CONJUNCTIONS[t])
                clause = []
            else:
                clause.append(t)
        return " ".join(out)


def generate_corpus(n: int, seed: int, vocab_words: int = 300, lang_seed: int = 0) -> list[tuple[str, str]]:
    """n (source, reference) pairs; references are random variants (one of several valid)."""
    lang = SyntheticLanguage.build(lang_seed, vocab_words)
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        src = lang.sample_source(rng)
        pairs.append((src, lang.translate(src, rng)))
    return pairs


def _write_atomic(path: Path, lines: list[str]) -> None:
    with atomic_writer(path) as f:
        f.write("".join(line + "\n" for line in lines))


def write_splits(out_dir, train_size: int, valid_size: int, test_size: int, seed: int = 1,
                 vocab_words: int = 300, src_lang: str = "en", tgt_lang: str = "de",
                 lang_seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Write {train,valid,test}.{src_lang,tgt_lang} (one sentence a line, atomically).

    The splits share the lexicon (lang_seed) but use different sampling seeds, so they are
    independent draws from the same language. Returns split -> (source path, target path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for k, (split, size) in enumerate((("train", train_size), ("valid", valid_size), ("test", test_size))):
        pairs = generate_corpus(size, seed + 1_000_003 * k, vocab_words, lang_seed)
        sp, tp = out / f"{split}.{src_lang}", out / f"{split}.{tgt_lang}"
        _write_atomic(sp, [s for s, _ in pairs])
        _write_atomic(tp, [t for _, t in pairs])
        paths[split] = (sp, tp)
    return paths


def multimodality(pairs) -> float:
    """Average number of distinct targets per source, over sources seen at least twice.

    1.0 means every repeated source always got the same translation (e.g. a deterministic
    teacher's output); larger means more variation among references. A corpus without
    repeated sources gives 1.0 (no evidence of variation). To measure the raw synthetic
    data's multimodality reliably, translate a fixed set of sources several times each.
    """
    targets, counts = defaultdict(set), defaultdict(int)
    for src, tgt in pairs:
        targets[src].add(tgt)
        counts[src] += 1
    repeated = [len(targets[s]) for s, c in counts.items() if c >= 2]
    return sum(repeated) / len(repeated) if repeated else 1.0
