"""imitate_nat: the paper's models in pure PyTorch (Wei et al., 2019, "Imitation Learning for
Non-Autoregressive Neural Machine Translation"). No Ray, MLflow or CLI code lives here.

Read in this order: config → layers → imitation (eq 3-9) → at (DAT) → nat (eq 10-11) →
losses (eq 12-15) → decode (beam, NAT, LPD) → cpu (int8/bf16 CPU inference) → tokenizer, metrics, checkpoint, data.
"""
from .config import LossConfig, ModelConfig, preset

__all__ = ["ATDemonstrator", "NATLearner", "ModelConfig", "LossConfig", "preset"]


def __getattr__(name: str):
    # The models load PyTorch (~1 s); importing the package for its config (a job spec being
    # checked, `--help`) should not.
    if name == "ATDemonstrator":
        from .at import ATDemonstrator
        return ATDemonstrator
    if name == "NATLearner":
        from .nat import NATLearner
        return NATLearner
    raise AttributeError(f"module 'imitate_nat' has no attribute {name!r}")
