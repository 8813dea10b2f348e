"""The AT demonstrator (DAT, paper §3.2): a Transformer encoder-decoder whose every decoder
layer starts with an imitation module (eq 3-6). The encoder and the imitation decoder are
shared with the NAT learner (nat.py), which is "the same decoder structure" (§3.3).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .imitation import ImitationModule
from .layers import Cache, Dropout, EncoderLayer, TransferLayer, attention_mask, sinusoidal_positions


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ffn, cfg.dropout)
                                    for _ in range(cfg.enc_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, src_keep: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(src_keep)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class ImitationDecoder(nn.Module):
    """Decoder layer l: (o + u, π_l) = imitation_l(o) (eq 4-5), then o' = Transfer_l(o + u) (eq 6).
    With modules=False (a NAT built without imitation modules) layer l is Transfer_l(o) alone
    and no π_l is returned."""

    def __init__(self, cfg: ModelConfig, modules: bool = True):
        super().__init__()
        self.imitations = nn.ModuleList(ImitationModule(cfg.d_model, cfg.d_ffn, cfg.n_actions, cfg.action_alpha)
                                        for _ in range(cfg.dec_layers if modules else 0))
        self.layers = nn.ModuleList(TransferLayer(cfg.d_model, cfg.n_heads, cfg.d_ffn, cfg.dropout)
                                    for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, o, memory, src_keep, tgt_keep=None, causal=False, cache: Cache | None = None,
                policies_only: bool = False):
        """Returns (top states after the final norm, [log π_l]). policies_only: stop once the last
        layer's π is known (its Transfer layer cannot change any π) and return (None, [log π_l])."""
        src_mask = attention_mask(src_keep)
        tgt_mask = None if tgt_keep is None else attention_mask(tgt_keep)
        log_pis = []
        for l, transfer in enumerate(self.layers):
            if self.imitations:
                o, log_pi = self.imitations[l](o)
                log_pis.append(log_pi)
                if policies_only and l == len(self.layers) - 1:
                    return None, log_pis
            o = transfer(o, memory, src_mask, tgt_mask, causal=causal, cache=cache, layer=l)
        return self.norm(o), log_pis


class EncoderDecoder(nn.Module):
    """What the AT and the NAT share: tied joint embeddings, encoder, imitation decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        with torch.no_grad():
            self.embed.weight[cfg.pad_id].zero_()
        self.encoder = Encoder(cfg)
        self.decoder = ImitationDecoder(cfg, cfg.imitation_modules)
        self.drop = Dropout(cfg.dropout)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
        # Inference only: a stand-in for the tied projection h·Eᵀ (cpu.py's int8 copy of E);
        # None: the projection reads the embedding itself.
        self.output_projection: nn.Module | None = None

    def scaled_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) * math.sqrt(self.cfg.d_model)

    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.scaled_embeddings(tokens)
        return self.drop(x + self.positions[start:start + tokens.size(1)].to(x.dtype))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) padded ids -> (top-layer states (B, S, d), keep-mask (B, S))."""
        if src.size(1) > self.cfg.max_positions:
            raise ValueError(f"source length {src.size(1)} exceeds max_positions={self.cfg.max_positions}")
        src_keep = src.ne(self.cfg.pad_id)
        return self.encoder(self.embed_tokens(src), src_keep), src_keep

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.output_projection is not None:
            return self.output_projection(h)
        return h @ self.embed.weight.t()  # output projection tied to the joint embedding


class ATDemonstrator(EncoderDecoder):
    def __init__(self, cfg: ModelConfig):
        if not cfg.imitation_modules:
            raise ValueError("the AT demonstrator always has imitation modules (imitation_modules=False is for a NAT)")
        super().__init__(cfg)

    def decode(self, tgt_in: torch.Tensor, memory, src_keep, cache: Cache | None = None, start: int = 0):
        """Causal decoding of tgt_in (B, T) starting at position `start`. With a cache, tgt_in holds
        only the new tokens and the cache grows in place. Returns (logits (B,T,V), [log π_l])."""
        h, log_pis = self.decode_states(tgt_in, memory, src_keep, cache, start)
        return self.output_logits(h), log_pis

    def decode_states(self, tgt_in: torch.Tensor, memory, src_keep, cache: Cache | None = None, start: int = 0):
        """decode() before the vocabulary projection: (top states (B, T, d), [log π_l])."""
        return self.decoder(self.embed_tokens(tgt_in, start), memory, src_keep, causal=True, cache=cache)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor):
        """Teacher forcing: tgt_in = BOS + y. Returns (logits, [log π_l] per decoder layer)."""
        memory, src_keep = self.encode(src)
        return self.decode(tgt_in, memory, src_keep)

    def policies(self, src: torch.Tensor, tgt_in: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced [log π_l] only (the demonstrator's side of eq 12-13): the same values as
        forward()'s, without the last Transfer layer and the vocabulary projection."""
        memory, src_keep = self.encode(src)
        return self.decoder(self.embed_tokens(tgt_in), memory, src_keep, causal=True, policies_only=True)[1]

    def imitation_modules(self) -> list[ImitationModule]:
        return list(self.decoder.imitations)
