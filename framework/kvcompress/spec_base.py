"""The base of every method's spec model (the one piece of the spec layer plugins import)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class MethodSpec(BaseModel):
    """Base of a method's parameters. Subclasses add `method: Literal["name"]` and their fields.

    Field descriptions are the documentation: `kvcompress schema` and docs/specs.md come from them.
    Fields are strict: a string or a float where an integer is asked (`group: "32"`, `group: 32.0`, `window:
    true`) is an error, not converted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: str
