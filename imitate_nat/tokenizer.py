"""Joint source+target SentencePiece model with the project's fixed special ids."""
from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from .atomic import atomic_write_bytes
from .config import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def train_sentencepiece(files: Sequence[str | Path], model_path: str | Path, vocab_size: int = 8000,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        max_sentences: int = 2_000_000, seed: int = 0, num_threads: int | None = None) -> "Tokenizer":
    """Train one joint model on the non-blank lines of `files` (source and target sides
    together) and write it to `model_path` atomically. Returns the loaded tokenizer.

    Memory is bounded by max_sentences, not by the corpus: the files are read twice, one line
    at a time, first to count the lines, then to hand them (all of them, or with more than
    `max_sentences` a seeded uniform sample of that many, in corpus order) to SentencePiece
    through an iterator it consumes lazily; only SentencePiece holds the sentences it trains
    on. `num_threads`: SentencePiece's trainer threads (default: every CPU of the machine).
    `vocab_size` is an upper bound: tiny corpora get what they support (hard_vocab_limit
    off) rather than an error.

    Not SentencePiece's own input=/input_sentence_size sampling: with sentencepiece 0.2.3 its
    reservoir sample differs from run to run whatever set_random_generator_seed says, and
    input= would write the files' absolute paths into the model file (the same corpus would
    give different spm.model bytes in different run dirs). With at most max_sentences lines
    the model is byte-identical to what the former in-memory version wrote; above that the
    sample differs from the former one (random.Random(seed).sample of all lines held in
    memory) but is as reproducible."""
    n = sum(1 for _ in _text_lines(files))
    if not n:
        raise ValueError(f"no text to train a tokenizer on in {list(map(str, files))}")
    lines = _text_lines(files)
    if n > max_sentences:
        lines = _selection_sample(lines, n, max_sentences, seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False, num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    # Trained in memory (model_writer), so the file appears whole or not at all: fsynced, renamed, no debris.
    model_path = atomic_write_bytes(model_path, model.getvalue())
    return Tokenizer(model_path)


def _text_lines(files: Sequence[str | Path]) -> Iterator[str]:
    """The lines a tokenizer trains on, streamed: every line of every file that is not all
    whitespace, without its newline."""
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")


def _selection_sample(items: Iterable[str], n: int, k: int, seed: int) -> Iterator[str]:
    """A uniform sample of k of the n items, in their order, in one pass and O(1) memory
    (Knuth's selection sampling, TAOCP 3.4.2 Algorithm S): item i is taken with probability
    (k still to take) / (n - i)."""
    rng = random.Random(seed)
    for i, item in enumerate(items):
        if (n - i) * rng.random() < k:
            yield item
            k -= 1
            if not k:
                return


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"{self.path}: special ids {ids} differ from pad/unk/bos/eos = 0/1/2/3")

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenized text; special ids are dropped."""
        return self.sp.decode([i for i in ids if i > EOS_ID])
