"""CUDA graphs for Length Parallel Decoding (and NAT decoding, ΔT = 0) at small batches on a GPU.

Why: at batch 1 a GPU decoding a base-size model is launch-bound. An LPD call is a few hundred
small kernels (two encoders, the NAT decoder over 2ΔT+1 candidates, the AT rescoring pass),
and launching them from Python costs more than running them. A CUDA graph records the kernels
of one input shape once and replays them with a single launch.

How: two graphs per shape, because the decoder's width depends on the predicted length T̂,
which is data:
  encode (per batch size B and source width S): both encoders and the length prediction;
  choose (per B, S and decoder width W): decode.lpd_candidates and decode.pick_best.
Between them one host sync reads max T̂ to choose W. Sources are padded to a multiple of
BUCKET columns, widths rounded up alike and batches to a power of two (by repeating a
source), so a handful of graphs serves every input. Padding is masked, so the outputs are
those of eager `lpd_decode` (tests/imitate_nat/test_graphs.py compares them on a GPU).
Inputs are copied into each graph's static tensors and outputs read back before the call returns.
Each graph keeps its own GPU memory, and a server sees every source length: at most
`max_graphs` are kept, the least recently used dropped first (GraphCache).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .at import ATDemonstrator
from .decode import longest_candidate, lpd_candidates, lpd_decode, pick_best
from .nat import NATLearner

BUCKET = 8  # sources and decoder widths are padded to a multiple of this many columns


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def decoder_width(widest: int, max_positions: int, delta_t: int) -> int:
    """The bucketed decoder width for candidates up to `widest` long: rounded up to BUCKET, but
    never past decode.longest_candidate (rounding up to max_positions would overflow the AT's
    positional table in the rescoring pass, which reads one position more)."""
    return min(_round_up(max(widest, 1), BUCKET), longest_candidate(max_positions, delta_t))


def _capture(fn):
    """Run fn once on a side stream (lazy cuBLAS and allocator setup must not be recorded), then
    record it. Returns (graph, fn's outputs: the static tensors each replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphCache:
    """The graphs of one GraphedLPD: encoders by (B, S), each with its choosers by width W. At
    most `max_graphs` in all, the least recently used dropped first; a chooser reads its
    encoder's static output tensors, so the choosers go with their encoder."""

    def __init__(self, max_graphs: int):
        if max_graphs < 2:
            raise ValueError(f"max_graphs must be at least 2 (an encoder and a chooser), got {max_graphs}")
        self.max_graphs = max_graphs
        self._encoders: OrderedDict[tuple, tuple[Any, OrderedDict]] = OrderedDict()  # key -> (graph, choosers)

    def __len__(self) -> int:
        return sum(1 + len(choosers) for _, choosers in self._encoders.values())

    def encoder(self, key: tuple, record: Callable[[], Any]):
        if key in self._encoders:
            self._encoders.move_to_end(key)
        else:
            self._encoders[key] = (record(), OrderedDict())
            self._shrink(key)
        return self._encoders[key][0]

    def chooser(self, key: tuple, width: int, record: Callable[[Any], Any]):
        """The chooser at `width` of encoder `key` (used just before, so never dropped here);
        `record` gets that encoder."""
        encoder, choosers = self._encoders[key]
        if width in choosers:
            choosers.move_to_end(width)
        else:
            choosers[width] = record(encoder)
            self._shrink(key)
        return choosers[width]

    def _shrink(self, keep: tuple) -> None:
        while len(self) > self.max_graphs:
            oldest = next(iter(self._encoders))
            if oldest != keep:
                del self._encoders[oldest]
            else:  # the only encoder left: drop its oldest chooser (never the newest, in use)
                self._encoders[keep][1].popitem(last=False)


class GraphedLPD:
    """Callable like `lpd_decode(nat, at, src, delta_t, lengths)`; batches larger than
    `max_batch` (compute-bound anyway) and sources beyond the positional table run eagerly.
    With delta_t = 0 it is NAT decoding and `at` may be None."""

    def __init__(self, nat: NATLearner, at: ATDemonstrator | None, delta_t: int = 3, length_penalty: float = 1.0,
                 max_batch: int = 8, max_graphs: int = 128):
        if delta_t < 0 or max_batch < 1:
            raise ValueError(f"need delta_t >= 0 and max_batch >= 1 (got {delta_t}, {max_batch})")
        if at is None and delta_t > 0:
            raise ValueError("LPD with delta_t > 0 rescores with the AT: pass it")
        device = next(nat.parameters()).device
        models = [nat] if at is None else [nat, at]
        if device.type != "cuda" or any(next(m.parameters()).device != device for m in models):
            raise ValueError(f"CUDA graphs need the models on one CUDA device (NAT on {device}); "
                             "use decode.lpd_decode elsewhere")
        if any(m.training for m in models):
            raise ValueError("call .eval() on the models first: a graph would record dropout")
        self.nat, self.at, self.delta_t, self.length_penalty = nat, at, delta_t, length_penalty
        self.max_batch, self.device = max_batch, device
        # (B, S) -> (graph, src, lengths, outputs), each with W -> (graph, outputs)
        self._graphs = GraphCache(max_graphs)

    @property
    def graphs(self) -> int:
        """How many graphs are held (each holds its own GPU memory)."""
        return len(self._graphs)

    def _encoder(self, B: int, S: int):
        def record():
            nat, at, cfg = self.nat, self.at, self.nat.cfg
            src = torch.full((B, S), cfg.pad_id, dtype=torch.long, device=self.device)
            lengths = torch.ones(B, dtype=torch.long, device=self.device)  # T̂, or the caller's lengths

            def encode():
                nat_enc = nat.encode(src)
                at_enc = at.encode(src) if self.delta_t > 0 else None
                return nat_enc, at_enc, nat.predict_lengths(nat_enc)
            graph, out = _capture(encode)
            return graph, src, lengths, out
        return self._graphs.encoder((B, S), record)

    def _chooser(self, B: int, S: int, W: int):
        def record(encoder):
            _, _, lengths, (nat_enc, at_enc, _) = encoder

            def choose():
                tokens, cand_len, scores = lpd_candidates(self.nat, self.at, nat_enc, at_enc, lengths,
                                                          self.delta_t, self.length_penalty, width=W)
                return pick_best(tokens, cand_len, scores)
            return _capture(choose)
        return self._graphs.chooser((B, S), W, record)

    @torch.no_grad()
    def __call__(self, src: torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
        cfg, n, S = self.nat.cfg, src.size(0), src.size(1)
        Sb = _round_up(S, BUCKET)
        if n > self.max_batch or Sb > cfg.max_positions:
            return lpd_decode(self.nat, self.at, src, self.delta_t, lengths, self.length_penalty)
        B = 1 << (n - 1).bit_length()  # next power of two: rows n..B-1 repeat source 0
        graph, src_buf, len_buf, (_, _, predicted) = self._encoder(B, Sb)
        src_buf.fill_(cfg.pad_id)
        src_buf[:n, :S].copy_(src)
        src_buf[n:, :S].copy_(src[:1].expand(B - n, -1))
        graph.replay()
        len_buf.copy_(predicted)
        if lengths is not None:
            len_buf[:n].copy_(lengths)
        widest = int(len_buf.max()) + self.delta_t  # the one host sync between the two graphs
        W = decoder_width(widest, cfg.max_positions, self.delta_t)
        graph, (best, best_len) = self._chooser(B, Sb, W)
        graph.replay()
        return [row[:k] for row, k in zip(best[:n].tolist(), best_len[:n].tolist())]
