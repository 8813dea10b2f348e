"""Model files: weights + config in one torch file, written atomically, loaded safely.

A model file is {"format": 2, "kind": "at"|"nat", "config": ModelConfig dict, "state_dict": ...,
"meta": small JSON-able dict}. Loading always uses torch.load(weights_only=True): only tensors
and plain containers are unpickled, never code. Format 1 (before 2026-12) differs only in the
name of one copy: its NAT "uniform" copied the encoder's states, which is "uniform_encoder"
now ("uniform" copies the source embeddings, as the paper); it is read as that.

Checkpoint averaging (fairseq's scripts/average_checkpoints.py): the element-wise mean of the
weights of several model files of one model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .at import ATDemonstrator
from .atomic import atomic_writer
from .config import ModelConfig
from .nat import NATLearner

FORMAT = 2
READABLE = (1, 2)
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
    if not isinstance(blob, dict) or blob.get("format") not in READABLE or blob.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: not an imitate_nat model file (format {FORMAT})")
    if blob["format"] == 1 and blob["config"].get("copy") == "uniform":
        blob["config"] = {**blob["config"], "copy": "uniform_encoder"}
    return blob


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model the file describes and load its weights. Returns (model, meta)."""
    blob = read_model_file(path)
    cfg = ModelConfig.from_dict(blob["config"])
    model = KINDS[blob["kind"]](cfg)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), blob["meta"]


def average_state_dicts(states: Iterable[dict]) -> dict:
    """Element-wise mean of state dicts with the same keys and shapes. Floating tensors are summed
    in fp32 (a bf16 sum of several checkpoints would round at every addition) and the mean is cast
    back to each tensor's dtype; other tensors (integer buffers) are counts, not weights, and must
    agree. `states` may be a generator: one state dict is held at a time besides the sum."""
    total, first, n = None, None, 0
    for state in states:
        if total is None:
            first = {k: v.dtype for k, v in state.items()}
            total = {k: v.detach().to(torch.float32, copy=True) if v.is_floating_point() else v.detach().clone()
                     for k, v in state.items()}
        elif state.keys() != total.keys():
            raise CheckpointError(f"cannot average state dicts with different keys: {sorted(state.keys() ^ total.keys())}")
        else:
            for k, v in state.items():
                if v.shape != total[k].shape:
                    raise CheckpointError(f"cannot average {k}: shapes {tuple(total[k].shape)} and {tuple(v.shape)}")
                if v.is_floating_point():
                    total[k] += v.detach().float()
                elif not torch.equal(v, total[k]):
                    raise CheckpointError(f"cannot average {k}: a {v.dtype} tensor that differs between checkpoints")
        n += 1
    if total is None:
        raise CheckpointError("no state dicts to average")
    return {k: (v / n).to(first[k]) if v.is_floating_point() else v for k, v in total.items()}


def average_model_files(paths: Iterable[str | Path]):
    """The model whose weights are the mean of the model files' (one kind and config; read one
    at a time). Returns (model in eval mode on the CPU, the files' metas)."""
    metas, first = [], {}   # first: the first file's path, kind and config

    def states():
        for path in paths:
            blob = read_model_file(path)
            first.setdefault("file", (path, blob["kind"], blob["config"]))
            if (blob["kind"], blob["config"]) != first["file"][1:]:
                raise CheckpointError(f"{path}: another kind or config than {first['file'][0]}, cannot average")
            metas.append(blob["meta"])
            yield blob["state_dict"]

    averaged = average_state_dicts(states())
    _, kind, config = first["file"]
    model = KINDS[kind](ModelConfig.from_dict(config))
    model.load_state_dict(averaged)
    return model.eval(), metas
