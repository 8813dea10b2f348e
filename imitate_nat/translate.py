"""Text in, text out: tokenize, batch by length, decode with any decoder, restore order."""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from .data import source_tensor, token_batches
from .decode import beam_search, greedy_search, lpd_decode, nat_decode
from .graphs import GraphedLPD
from .tokenizer import Tokenizer

Decoder = Callable[[torch.Tensor], list[list[int]]]


def translate(lines: Sequence[str], tok: Tokenizer, decoder: Decoder, batch_tokens: int = 4096,
              device: str | torch.device = "cpu", max_src_len: int | None = None, cost_factor: int = 1,
              max_length_ratio: float | None = None) -> list[str]:
    """Translate `lines` with `decoder(src_tensor) -> token ids`, batched by source length so
    that (sentences × longest × cost_factor) ≤ batch_tokens (cost_factor: beam size or LPD
    candidates; max_length_ratio: see token_batches). Output i is the translation of line i; an
    empty line gives an empty output."""
    ids = tok.encode_batch(lines)
    if max_src_len is not None:
        ids = [s[: max_src_len - 1] for s in ids]  # room for EOS
    out: list[str] = [""] * len(lines)
    todo = [i for i, s in enumerate(ids) if s]
    for batch in token_batches([len(ids[i]) * cost_factor for i in todo], batch_tokens,
                               max_length_ratio=max_length_ratio):
        idx = [todo[j] for j in batch]
        src = source_tensor([ids[i] for i in idx]).to(device)
        for i, hyp in zip(idx, decoder(src)):
            # One output line per input line, always: a line break would shift every later line.
            out[i] = tok.decode(hyp).replace("\r", " ").replace("\n", " ")
    return out


def at_beam(at, beam_size: int = 4, length_penalty: float = 1.0, max_len_a: float = 1.5, max_len_b: int = 10,
            min_len: int = 0) -> Decoder:
    if beam_size == 1:
        return partial(greedy_search, at, max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len)
    return partial(beam_search, at, beam_size=beam_size, length_penalty=length_penalty,
                   max_len_a=max_len_a, max_len_b=max_len_b, min_len=min_len)


def _graphs_apply(model, cuda_graphs: bool) -> bool:
    return cuda_graphs and next(model.parameters()).is_cuda and not model.training


def nat_one_pass(nat, cuda_graphs: bool = False) -> Decoder:
    """cuda_graphs: on a GPU, small batches replay CUDA graphs (graphs.py; same outputs). For
    decoders that are kept and called many times (evaluation, serving), not one-off calls."""
    if _graphs_apply(nat, cuda_graphs):
        return GraphedLPD(nat, None, delta_t=0)
    return partial(nat_decode, nat)


def nat_lpd(nat, at, delta_t: int = 3, length_penalty: float = 1.0, cuda_graphs: bool = False) -> Decoder:
    if _graphs_apply(nat, cuda_graphs) and not at.training:
        return GraphedLPD(nat, at, delta_t=delta_t, length_penalty=length_penalty)
    return partial(lpd_decode, nat, at, delta_t=delta_t, length_penalty=length_penalty)
