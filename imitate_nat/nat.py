"""The imitate-NAT learner (paper §3.3): the AT demonstrator's encoder and imitation decoder,
decoding all target positions at once (no causal mask), its inputs copied from the encoder's
top-layer states by SoftCopy (eq 10-11) or from the source embeddings by UniformCopy, and a
target-length classifier.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .at import ATDemonstrator, EncoderDecoder
from .config import ModelConfig
from .layers import padding_mask

# Parameters the NAT has and the AT lacks: everything else is initialized from the AT.
NAT_ONLY_PREFIXES = ("log_tau", "length_head.")
# What the AT has and a NAT built without imitation modules lacks (left behind at init).
IMITATION_PREFIX = "decoder.imitations."


class Encoded(NamedTuple):
    """The NAT's view of a batch of sources. Rows may be shared by g consecutive target rows
    (LPD's length candidates): see NATLearner.decode."""
    memory: torch.Tensor                    # encoder top states (B, S, d): cross-attention, SoftCopy
    src_keep: torch.Tensor                  # (B, S) True at real source positions
    embedded: torch.Tensor | None = None    # scaled source embeddings (B, S, d): UniformCopy's source


def soft_copy_weights(src_keep: torch.Tensor, tgt_len: int, tau: torch.Tensor) -> torch.Tensor:
    """eq 10: w_ji = softmax_i(-|j - i| / τ) over the real source positions i. Shape (B, T', S)."""
    S = src_keep.size(1)
    j = torch.arange(tgt_len, device=src_keep.device, dtype=torch.float32).unsqueeze(1)
    i = torch.arange(S, device=src_keep.device, dtype=torch.float32).unsqueeze(0)
    scores = -(j - i).abs() / tau                                  # (T', S)
    scores = scores.unsqueeze(0).masked_fill(~src_keep.unsqueeze(1), float("-inf"))
    return scores.softmax(-1)


def uniform_copy_index(src_len: torch.Tensor, tgt_len: torch.Tensor, T: int) -> torch.Tensor:
    """UniformCopy (Gu et al. 2017, Lee et al. 2018): target position j copies source position
    round(j · S / T'), clamped to the source. Shape (B, T) of source indices."""
    j = torch.arange(T, device=src_len.device, dtype=torch.float32).unsqueeze(0)
    ratio = src_len.float().unsqueeze(1) / tgt_len.clamp_min(1).float().unsqueeze(1)
    return torch.minimum(torch.round(j * ratio).long(), (src_len - 1).unsqueeze(1))


class NATLearner(EncoderDecoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # τ > 0 is kept positive by learning log τ.
        self.log_tau = nn.Parameter(torch.tensor([float(cfg.tau_init)]).log())  # shape (1,): DeepSpeed cannot broadcast 0-d tensors
        # Length as classification over T' - T in [-M, M] from mean-pooled encoder states (Lee et al. 2018).
        self.length_head = nn.Linear(cfg.d_model, 2 * cfg.max_length_offset + 1)

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp()

    def encode(self, src: torch.Tensor) -> Encoded:
        memory, src_keep = super().encode(src)
        # The paper's UniformCopy "directly copies the source embeddings without considering the
        # global information": the scaled word embeddings, before positions (the decoder adds
        # its own target positions) and dropout.
        return Encoded(memory, src_keep, self.scaled_embeddings(src) if self.cfg.copy == "uniform" else None)

    # --- decoder inputs -------------------------------------------------------------------------
    def copy_inputs(self, enc: Encoded, tgt_lengths: torch.Tensor, T: int | None = None) -> torch.Tensor:
        """Decoder inputs for target lengths `tgt_lengths`, padded to T (default: their max).
        `enc` may hold one row per source for g consecutive length candidates (LPD)."""
        T = int(tgt_lengths.max()) if T is None else T
        memory, src_keep = enc.memory, enc.src_keep
        g = tgt_lengths.size(0) // memory.size(0)
        if self.cfg.copy == "soft":
            # eq 10 depends on the source and on j, not on T': one copy serves all g candidates.
            w = soft_copy_weights(src_keep, T, self.tau).to(memory.dtype)
            y = w @ memory                                           # eq 11: y_j = Σ_i w_ji h_i
            return y if g == 1 else y.repeat_interleave(g, 0)
        source = enc.embedded if self.cfg.copy == "uniform" else memory
        src_len = src_keep.sum(1)
        idx = uniform_copy_index(src_len if g == 1 else src_len.repeat_interleave(g), tgt_lengths, T)
        idx = idx.view(source.size(0), g * T, 1).expand(-1, -1, source.size(-1))
        return source.gather(1, idx).view(-1, T, source.size(-1))

    # --- target length --------------------------------------------------------------------------
    def length_logits(self, enc: Encoded) -> torch.Tensor:
        keep = enc.src_keep.unsqueeze(-1).to(enc.memory.dtype)
        pooled = (enc.memory * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.length_head(pooled)

    def length_targets(self, src_keep, tgt_lengths) -> torch.Tensor:
        M = self.cfg.max_length_offset
        return (tgt_lengths - src_keep.sum(1)).clamp(-M, M) + M

    def predict_lengths(self, enc: Encoded) -> torch.Tensor:
        """T̂ = T + argmax offset, kept within [1, max_positions]."""
        offset = self.length_logits(enc).argmax(-1) - self.cfg.max_length_offset
        return (enc.src_keep.sum(1) + offset).clamp(1, self.cfg.max_positions)

    # --- decoding -------------------------------------------------------------------------------
    def decode(self, enc: Encoded, tgt_lengths: torch.Tensor, width: int | None = None):
        """All positions in parallel at the given lengths. Returns (logits (B,T',V), [log π_l];
        no π without imitation modules). `enc` may hold one row per source for g consecutive
        rows of `tgt_lengths`: the candidates then share the source's copy and cross-attention
        keys (see TransferLayer). `width` ≥ max length pads the decoder wider (masked: same
        outputs), without a host sync."""
        h, log_pis = self.decode_states(enc, tgt_lengths, width)
        return self.output_logits(h), log_pis

    def decode_states(self, enc: Encoded, tgt_lengths: torch.Tensor, width: int | None = None):
        """decode() before the vocabulary projection: (top states (B, T', d), [log π_l])."""
        T = int(tgt_lengths.max()) if width is None else width  # host sync: the decoder's width
        if T > self.cfg.max_positions:
            raise ValueError(f"target length {T} exceeds max_positions={self.cfg.max_positions}")
        x = self.copy_inputs(enc, tgt_lengths, T)
        x = self.drop(x + self.positions[: x.size(1)].to(x.dtype))
        tgt_keep = padding_mask(tgt_lengths, x.size(1))
        return self.decoder(x, enc.memory, enc.src_keep, tgt_keep=tgt_keep, causal=False)

    def forward(self, src: torch.Tensor, tgt_lengths: torch.Tensor):
        """Training pass at the reference lengths. Returns (logits, [log π_l], length logits)."""
        enc = self.encode(src)
        logits, log_pis = self.decode(enc, tgt_lengths)
        return logits, log_pis, self.length_logits(enc)

    # --- initialization from the demonstrator (paper §4, "Model Settings") -------------------------
    @torch.no_grad()
    def init_from_at(self, at: ATDemonstrator) -> None:
        """Every parameter the two share; without imitation modules the AT's are left behind."""
        nat_only = {"copy": self.cfg.copy, "imitation_modules": self.cfg.imitation_modules}
        if at.cfg.to_dict() | nat_only != self.cfg.to_dict():
            raise ValueError("NAT and AT configs differ in architecture; cannot initialize the NAT from this AT")
        state = at.state_dict()
        if not self.cfg.imitation_modules:
            state = {k: v for k, v in state.items() if not k.startswith(IMITATION_PREFIX)}
        missing, unexpected = self.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(NAT_ONLY_PREFIXES)]
        if bad or unexpected:
            raise ValueError(f"AT -> NAT initialization mismatch: missing {bad}, unexpected {unexpected}")


def token_argmax(logits: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Argmax per position over real tokens only: a NAT output never contains pad/unk/bos/eos
    (the special ids are 0..3, before every real piece; slicing avoids copying the logits)."""
    first_real = max(cfg.pad_id, cfg.unk_id, cfg.bos_id, cfg.eos_id) + 1
    # max(-1).indices: argmax's result (the first of tied maxima), several times faster on a CPU.
    return logits[..., first_real:].max(-1).indices + first_real
