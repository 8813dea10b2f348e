"""Transformer building blocks: attention with a KV cache, feed-forward, encoder and
decoder ("Transfer", eq 6) layers, sinusoidal positions.

Pre-norm residual blocks (LayerNorm before each sublayer, one final LayerNorm per stack):
a deviation from the paper's post-norm Transformer, chosen because pre-norm trains stably
without long warm-up on small data and CPU budgets. Documented in README.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# A decoding cache is a plain dict so it can be reordered (beam search) with one function.
# Keys: f"self{l}" -> (k, v) grown one step at a time; f"cross{l}" -> (k, v) of the encoder.
Cache = dict[str, tuple[torch.Tensor, torch.Tensor]]


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """Vaswani et al.'s fixed positional encoding, shape (length, dim)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return pe


class Dropout(nn.Module):
    """Inverted dropout, as nn.Dropout, with a cheaper random mask on the CPU.

    On the CPU, F.dropout draws one Mersenne-Twister number per element, serially, which is a
    large part of a small model's training step. Here one 64-bit draw gives four 15-bit
    uniforms, so the drop probability is p rounded to a multiple of 1/32768. On accelerators
    F.dropout (a fused Philox kernel) is used unchanged."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
        uniform15 = words.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF
        keep = uniform15 >= round(self.p * 32768)
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, Dh)
        return x.view(x.size(0), x.size(1), self.n_heads, self.d_head).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(memory)), self.split(self.v(memory))

    def forward(self, x, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """x: queries (B, Tq, D); kv: projected keys/values (B, H, Tk, Dh);
        mask: bool, broadcastable to (B, H, Tq, Tk), True = may attend."""
        q = self.split(self.q(x))
        k, v = kv
        drop = self.dropout if self.training else 0.0
        if causal and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            if causal:
                tri = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=x.device).tril()
                mask = tri if mask is None else (mask & tri)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(), Dropout(dropout), nn.Linear(d_ffn, d_model))

    def forward(self, x):
        return self.net(x)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ffn = FeedForward(d_model, d_ffn, dropout)
        self.drop = Dropout(dropout)

    def forward(self, x, src_mask):
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, self.attn.project_kv(h), src_mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class TransferLayer(nn.Module):
    """Transfer(·) of eq 6: self-attention, encoder-decoder attention, FFN.

    `causal=True` for the AT demonstrator; the NAT learner attends to all target positions.
    With a cache, `x` holds only the newest positions and keys/values are appended.
    `memory`/`src_mask` may hold one row per sentence while `x` holds g rows per sentence,
    consecutively (beam search's hypotheses): the g rows then share one copy of the source."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ffn = FeedForward(d_model, d_ffn, dropout)
        self.drop = Dropout(dropout)

    def forward(self, x, memory, src_mask, tgt_mask=None, causal=False, cache: Cache | None = None, layer: int = 0):
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)
        if cache is not None:
            if f"self{layer}" in cache:
                pk, pv = cache[f"self{layer}"]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            cache[f"self{layer}"] = (k, v)
            # Incremental steps see only past keys already: no causal mask needed for one query.
            causal = causal and x.size(1) > 1
        x = x + self.drop(self.self_attn(h, (k, v), tgt_mask, causal=causal))
        h = self.norm2(x)
        if cache is not None and f"cross{layer}" in cache:
            mkv = cache[f"cross{layer}"]
        else:
            mkv = self.cross_attn.project_kv(memory)
            if cache is not None:
                cache[f"cross{layer}"] = mkv
        if memory.size(0) != x.size(0):
            # Beam search passes each source once for its k consecutive hypothesis rows: fold
            # the k rows into one sentence's queries. Attention is per query, so this equals
            # attending to k copies, but reads the source K/V once and runs k× bigger matmuls.
            y = self.cross_attn(h.reshape(memory.size(0), -1, h.size(-1)), mkv, src_mask).view(h.shape)
        else:
            y = self.cross_attn(h, mkv, src_mask)
        x = x + self.drop(y)
        return x + self.drop(self.ffn(self.norm3(x)))


def select_cache(cache: Cache, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
    """Keep self-attention rows `rows` (beam search: the chosen hypotheses, k per sentence) and,
    when given, cross-attention rows `sentences` (one per sentence: those still decoding).
    Cross-attention K/V are the same for every hypothesis of a sentence and hypotheses never
    move between sentences, so a beam reorder alone (no `sentences`) leaves them as they are."""
    for key, (k, v) in cache.items():
        index = rows if key.startswith("self") else sentences
        if index is not None:
            cache[key] = (k.index_select(0, index), v.index_select(0, index))


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True at real positions."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being recorded on t's device (no host syncs allowed then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def attention_mask(keep: torch.Tensor) -> torch.Tensor | None:
    """(B, Tk) keep-mask -> (B, 1, 1, Tk), broadcast over heads and queries.

    While decoding (no autograd), a mask that masks nothing is dropped (None): attention then
    takes its unmasked fast path, which on a GPU at batch 1 saves the mask-conversion kernels of
    every attention call. Training always keeps the mask: deciding costs a host sync, which a
    CUDA graph capture (graphs.py) cannot have either."""
    if not torch.is_grad_enabled() and not capturing(keep) and bool(keep.all()):
        return None
    return keep[:, None, None, :]
