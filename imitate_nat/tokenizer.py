"""Joint source+target SentencePiece model with the project's fixed special ids."""
from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from .config import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def train_sentencepiece(files: Sequence[str | Path], model_path: str | Path, vocab_size: int = 8000,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        max_sentences: int = 2_000_000, seed: int = 0) -> "Tokenizer":
    """Train one joint model on all lines of `files` (source and target sides together) and
    write it to `model_path` atomically. Returns the loaded tokenizer.

    `vocab_size` is an upper bound: tiny corpora get what they support (hard_vocab_limit off)
    rather than an error."""
    lines: list[str] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            lines.extend(line.rstrip("\n") for line in fh if line.strip())
    if not lines:
        raise ValueError(f"no text to train a tokenizer on in {list(map(str, files))}")
    if len(lines) > max_sentences:  # deterministic subsample: SentencePiece holds all in memory
        lines = random.Random(seed).sample(lines, max_sentences)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False, num_threads=os.cpu_count() or 1,
        minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, model_path)
    return Tokenizer(model_path)


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
