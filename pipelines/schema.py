"""The strict base every Loom config section builds on."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: Marks a cross-field validation error that lists one "field: problem" per line, so that
#: ``loom validate`` reports each problem under its own key.
FIELD_PROBLEMS = "field problems:\n"


def field_problems(problems: list[tuple[str, str]]) -> ValueError:
    """The error a model validator raises for several problems, each named by its field."""
    return ValueError(FIELD_PROBLEMS + "\n".join(f"{field}: {message}" for field, message in problems))


class StrictModel(BaseModel):
    """A config object that rejects unknown keys and documents every field.

    Configs cross process boundaries as plain dicts (``model_dump``) and are
    validated again on the other side, so they must stay JSON-serialisable.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=False)
