"""A finished run's models as an `mlflow.pyfunc` model: sentences in, NAT + LPD translations out,
decoded as the evaluate stage and `eval` decode (decoding.decoders()["lpd"] and
imitate_nat.translate.translate) with the job's eval settings, logged as the model_config.

Logged and registered by registry.py at the end of a pipeline run. The class is pickled by
reference (orchestrator.pyfunc_model.TranslationModel): loading the model needs imitate-orch
installed (see registry.py for why no code is shipped with it).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.pyfunc import PythonModel


def input_texts(model_input: pd.DataFrame) -> list[str]:
    """The sentences of a DataFrame's one column ("text"; the pyfunc wrapper has made a list of
    strings or one string such a frame, as the model's signature says). A CSV's empty line
    arrives as NaN: an empty sentence, which translates to an empty line."""
    return [t if isinstance(t, str) else "" for t in model_input.iloc[:, 0].tolist()]


class TranslationModel(PythonModel):
    """predict(DataFrame with a "text" column, a list of str, or a str) -> list of translations (LPD)."""

    def load_context(self, context) -> None:
        import torch

        from .decoding import decoders, for_device, load_run_models

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # The artifacts are a run directory's model folders (tokenizer/, teacher/, student/).
        files = Path(context.artifacts["tokenizer"]).parent
        self.tok, at, nat = load_run_models(files, self.device)
        c = context.model_config
        self.settings = c
        self.max_src_len = at.cfg.max_positions
        # Models registered before eval.cpu_fast existed have no such setting: its default.
        at, nat, _ = for_device(at, nat, self.device, c.get("cpu_fast", "auto"))
        self.decode, self.cost = decoders(at, nat, c["beam_size"], c["delta_t"], c["length_penalty"])["lpd"]

    # The hint is one MLflow infers no signature from (the logged one is explicit) and stops its
    # warning about a predict without hints.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from imitate_nat.translate import translate

        return translate(input_texts(model_input), self.tok, self.decode, batch_tokens=self.settings["batch_tokens"],
                         device=self.device, max_src_len=self.max_src_len, cost_factor=self.cost)
