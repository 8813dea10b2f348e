"""Model files: weights + config in one torch file, written atomically, loaded safely.

A model file is {"format": 1, "kind": "at"|"nat", "config": ModelConfig dict, "state_dict": ...,
"meta": small JSON-able dict}. Loading always uses torch.load(weights_only=True): only tensors
and plain containers are unpickled, never code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .at import ATDemonstrator
from .atomic import atomic_writer
from .config import ModelConfig
from .nat import NATLearner

FORMAT = 1
KINDS = {"at": ATDemonstrator, "nat": NATLearner}


class CheckpointError(ValueError):
    pass


def _kind(model) -> str:
    for name, cls in KINDS.items():
        if type(model) is cls:
            return name
    raise TypeError(f"not an imitate_nat model: {type(model).__name__}")


def save_model(model, path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"format": FORMAT, "kind": _kind(model), "config": model.cfg.to_dict(),
            "state_dict": state, "meta": dict(meta or {})}
    with atomic_writer(path, "wb") as f:   # fsynced and renamed; no temp file left if torch.save fails
        torch.save(blob, f)
    return path


def read_model_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"{path}: cannot read model file ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or blob.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: not an imitate_nat model file (format {FORMAT})")
    return blob


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model the file describes and load its weights. Returns (model, meta)."""
    blob = read_model_file(path)
    cfg = ModelConfig.from_dict(blob["config"])
    model = KINDS[blob["kind"]](cfg)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), blob["meta"]
