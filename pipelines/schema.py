"""The strict base every Loom config section builds on."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

#: Marks a cross-field validation error that lists one "field: problem" per line, so that
#: ``loom validate`` reports each problem under its own key.
FIELD_PROBLEMS = "field problems:\n"


def field_problems(problems: list[tuple[str, str]]) -> ValueError:
    """The error a model validator raises for several problems, each named by its field."""
    return ValueError(FIELD_PROBLEMS + "\n".join(f"{field}: {message}" for field, message in problems))


def pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    """A pydantic error as (dotted key, message) pairs, a section's cross-field problems each under its own key."""
    problems = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] not in ("value_error", "assertion_error") and "input" in item:
            message = f"{message} (got {item['input']!r})"
        message = message.removeprefix("Value error, ")
        if item["type"] == "value_error" and message.startswith(FIELD_PROBLEMS):
            # A section's cross-field check lists one "field: problem" per line.
            for line in message.removeprefix(FIELD_PROBLEMS).splitlines():
                field, _, detail = line.partition(": ")
                problems.append((f"{key}.{field}" if key else field, detail))
            continue
        problems.append((key, message))
    return problems


class StrictModel(BaseModel):
    """A config object that rejects unknown keys and documents every field.

    Configs cross process boundaries as plain dicts (``model_dump``) and are
    validated again on the other side, so they must stay JSON-serialisable.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=False)
