"""The strict base every Loom config section builds on."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config object that rejects unknown keys and documents every field.

    Configs cross process boundaries as plain dicts (``model_dump``) and are
    validated again on the other side, so they must stay JSON-serialisable.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=False)
