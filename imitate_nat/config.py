"""Configuration dataclasses for the AT demonstrator and the imitate-NAT learner.

One `ModelConfig` describes both models: the NAT is "the same decoder structure" as the AT
(paper §3.3), so a NAT built from an AT's config can be initialized from its parameters.
Loss weights live apart in `LossConfig` because they change training, not the architecture.
Defaults are the paper's (base Transformer, 512 actions, α = 0.9, λ1 = λ2 = 0.001).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
COPIES = ("soft", "uniform", "uniform_encoder")   # ModelConfig.copy
IL_REDUCTIONS = ("mean", "sum")                   # LossConfig.il_reduction
CPU_MODES = ("auto", "int8", "bf16", "off")       # the CPU inference path (cpu.py)


@dataclass
class ModelConfig:
    vocab_size: int = 32000          # joint source+target SentencePiece vocabulary
    d_model: int = 512
    n_heads: int = 8
    d_ffn: int = 2048                 # base Transformer's FFN (§4 says "base Transformer" but d_hidden = 512)
    enc_layers: int = 6
    dec_layers: int = 6
    dropout: float = 0.1
    max_positions: int = 1024         # longest sequence the positional encoding covers
    n_actions: int = 512              # size n of the action space A (paper §4: 512)
    action_alpha: float = 0.9         # α of the moving average c in eq 7
    # NAT decoder inputs: "soft" (SoftCopy, eq 10-11, of the encoder's top states); "uniform"
    # (UniformCopy as the paper describes it: the source *embeddings*, no global information);
    # "uniform_encoder" (uniform copying of the encoder's top states: this project's
    # UniformCopy before 2026-12, kept to compare with).
    copy: str = "soft"
    # False: the NAT has no imitation modules (a normal NAT, the paper's baseline that
    # "degenerates" without imitation); the AT demonstrator always has them.
    imitation_modules: bool = True
    tau_init: float = 1.0             # initial SoftCopy temperature τ (trainable)
    max_length_offset: int = 64       # length classifier predicts T' - T in [-M, M]
    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.copy not in COPIES:
            raise ValueError(f"copy must be one of {', '.join(map(repr, COPIES))}, got {self.copy!r}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ffn", "enc_layers", "dec_layers",
                     "n_actions", "max_positions", "max_length_offset"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.action_alpha < 1.0:
            raise ValueError(f"action_alpha must be in [0, 1), got {self.action_alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tau_init <= 0:
            raise ValueError(f"tau_init must be positive, got {self.tau_init}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class LossConfig:
    label_smoothing: float = 0.1
    lambda1: float = 0.001            # eq 14: weight of the action-distribution regularizer
    lambda2: float = 0.001            # eq 15: weight of the imitation loss
    imitation: bool = True            # False: "NAT without imitation" (Table 2 ablation)
    # How L_IL is normalized (the paper does not say). "mean": per real target token, like the
    # cross-entropy, so λ2 weighs per-token quantities. "sum": summed over the batch's real
    # tokens while the cross-entropy stays a mean, i.e. a per-token weight of λ2 × the tokens
    # in a batch (one worker's micro-batch): what λ2 = 0.001 means if the paper summed.
    il_reduction: str = "mean"
    length_weight: float = 0.1        # weight of the target-length classifier loss

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("lambda1", "lambda2", "length_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.il_reduction not in IL_REDUCTIONS:
            raise ValueError(f"il_reduction must be 'mean' or 'sum', got {self.il_reduction!r}")


# Named sizes. "base" and "iwslt_small" are the paper's; "tiny" trains on a CPU in minutes.
PRESETS: dict[str, dict] = {
    "base": dict(d_model=512, n_heads=8, d_ffn=2048, enc_layers=6, dec_layers=6),
    "iwslt_small": dict(d_model=278, n_heads=2, d_ffn=507, enc_layers=5, dec_layers=5),
    "small": dict(d_model=256, n_heads=4, d_ffn=1024, enc_layers=3, dec_layers=3),
    "tiny": dict(d_model=128, n_heads=4, d_ffn=256, enc_layers=2, dec_layers=2, n_actions=64),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
