"""Tests for the embedded toy language pair (imitate_nat/synthetic.py)."""
import random

import pytest

from imitate_nat.synthetic import (ADJ_SUFFIX, CLOSED_CLASS, DETERMINERS, FUSED, SyntheticLanguage,
                                   generate_corpus, multimodality, write_splits)


@pytest.fixture(scope="module")
def lang():
    return SyntheticLanguage.build(seed=0, vocab_words=300)


def _first(d, pred=lambda v: True):
    return next(w for w, v in d.items() if pred(v))


def test_lexicon_and_corpus_are_deterministic():
    assert SyntheticLanguage.build(3).nouns == SyntheticLanguage.build(3).nouns
    assert SyntheticLanguage.build(3).verbs != SyntheticLanguage.build(4).verbs
    a, b = generate_corpus(200, seed=7), generate_corpus(200, seed=7)
    assert a == b
    assert generate_corpus(200, seed=8) != a
    # Another lexicon seed changes the target language but not the source sampling code path.
    assert [t for _, t in generate_corpus(50, 7, lang_seed=1)] != [t for _, t in a[:50]]


def test_verb_final_and_adjective_after_noun(lang):
    noun = _first(lang.nouns, lambda v: len(v[0][0]) == 1)         # one-word canonical noun
    adj, verb, obj = next(iter(lang.adjectives)), next(iter(lang.verbs)), list(lang.nouns)[1]
    tgt = lang.translate(f"the {adj} {noun} {verb} a {obj}").split()
    (noun_t,), gender = lang.nouns[noun][0]
    assert tgt[-1] == lang.verbs[verb][0][-1]                       # verb moved to the end
    assert tgt[1] == noun_t and tgt[2] == lang.adjectives[adj][0] + ADJ_SUFFIX[gender]
    # Verb-final also holds in every random variant, for every verb.
    rng = random.Random(0)
    for v in list(lang.verbs)[:30]:
        src = f"the {noun} {v} the {obj} quickly"
        assert lang.translate(src, rng).split()[-1] in {syn[-1] for syn in lang.verbs[v]}


def test_determiner_and_adjective_agree_with_noun_gender(lang):
    adj = next(iter(lang.adjectives))
    verb = next(iter(lang.verbs))
    genders = set()
    for noun, syns in lang.nouns.items():
        words, gender = syns[0]
        genders.add(gender)
        tgt = lang.translate(f"this {adj} {noun} {verb}").split()
        assert tgt[0] == DETERMINERS["this"][gender]
        assert tgt[1 + len(words)] == lang.adjectives[adj][0] + ADJ_SUFFIX[gender]
    assert genders == {"m", "f", "n"}


def test_length_changes(lang):
    pairs = generate_corpus(500, seed=3)
    diffs = [len(t.split()) - len(s.split()) for s, t in pairs]
    assert sum(d != 0 for d in diffs) > 100
    assert any(d > 0 for d in diffs) and any(d < 0 for d in diffs)
    # "some" leaves no article; "in the" fuses before a masculine/neuter noun.
    noun, verb = next(iter(lang.nouns)), next(iter(lang.verbs))
    assert len(lang.translate(f"some {noun} {verb}").split()) < len(lang.translate(f"the {noun} {verb}").split())
    mn = _first(lang.nouns, lambda v: v[0][1] in "mn" and len(v[0][0]) == 1)
    assert lang.translate(f"the {noun} {verb} in the {mn}").split()[-3:-1] == [FUSED[("in", lang.nouns[mn][0][1])],
                                                                                 lang.nouns[mn][0][0][0]]


def test_multimodal_references_and_consistent_canonical(lang):
    multi = [w for d in (lang.nouns, lang.adjectives, lang.verbs, lang.adverbs) for w, s in d.items() if len(s) > 1]
    assert 0.3 < len(multi) / 300 < 0.7
    noun = next(w for w in multi if w in lang.nouns)
    verb = next(iter(lang.verbs))
    src = f"the {noun} {verb}"
    rng = random.Random(0)
    variants = {lang.translate(src, rng) for _ in range(50)}
    assert len(variants) >= 2
    assert len({lang.translate(src) for _ in range(50)}) == 1
    # Adverb placement is a free choice as well: start of clause or just before the verb.
    adv = _first(lang.adverbs, lambda v: len(v) == 1)
    single_noun = _first(lang.nouns, lambda v: len(v) == 1)
    single_verb = _first(lang.verbs, lambda v: len(v) == 1)
    orders = {lang.translate(f"the {single_noun} {single_verb} {adv}", rng) for _ in range(50)}
    assert len(orders) == 2


def test_multimodality_measure(lang):
    rng = random.Random(1)
    srcs = [lang.sample_source(rng) for _ in range(100)]
    raw = [(s, lang.translate(s, rng)) for s in srcs for _ in range(4)]
    teacher = [(s, lang.translate(s)) for s in srcs for _ in range(4)]
    assert multimodality(teacher) == 1.0
    assert multimodality(raw) > 2.0
    assert multimodality([("a", "x"), ("a", "y"), ("b", "z"), ("b", "z"), ("c", "q")]) == 1.5


def test_source_vocabulary_bounded_and_lengths():
    pairs = generate_corpus(3000, seed=5, vocab_words=60)
    src_words = {w for s, _ in pairs for w in s.split()}
    assert len(src_words) <= 60 + len(CLOSED_CLASS)
    assert all(4 <= len(s.split()) <= 20 for s, _ in pairs)
    assert all(t.isascii() and t == t.lower() for _, t in pairs)


def test_translate_rejects_off_grammar(lang):
    with pytest.raises(ValueError):
        lang.translate("the the dog")
    with pytest.raises(ValueError):
        lang.translate("the xyzzy sees a dog")


def test_write_splits(tmp_path):
    paths = write_splits(tmp_path / "data", 120, 30, 20, seed=2)
    sizes = {"train": 120, "valid": 30, "test": 20}
    assert set(paths) == set(sizes)
    texts = {}
    for split, (sp, tp) in paths.items():
        assert sp.name == f"{split}.en" and tp.name == f"{split}.de"
        for p in (sp, tp):
            text = p.read_text(encoding="utf-8")
            lines = text.split("\n")
            assert text.endswith("\n") and len(lines) - 1 == sizes[split]
            assert all(line.strip() and "\t" not in line and "\r" not in line for line in lines[:-1])
        texts[split] = sp.read_text()
    assert texts["valid"] != texts["test"] and texts["valid"][:200] not in texts["train"]
    assert not [p for p in (tmp_path / "data").iterdir() if p.suffix == ".tmp"]
    # Rewriting is deterministic and replaces the files in place.
    again = write_splits(tmp_path / "data", 120, 30, 20, seed=2)
    assert again["train"][1].read_text() == paths["train"][1].read_text()
