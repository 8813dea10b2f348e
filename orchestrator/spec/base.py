"""What every spec section shares: no unknown keys, and errors that name their field."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldError(ValueError):
    """A cross-field error raised inside a model validator that names the offending field.

    pydantic reports model-validator errors at the model's location (`data`); `SpecError`
    appends `field` so the user reads `data.dir: ...`.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
