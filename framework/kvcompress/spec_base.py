"""The base of every method's spec model (the one piece of the spec layer plugins import)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MethodSpec(BaseModel):
    """Base of a method's parameters. Subclasses add `method: Literal["name"]` and their fields.

    Field descriptions are the documentation: `kvcompress schema` and docs/specs.md come from them.
    Fields are strict: a string or a float where an integer is asked (`group: "32"`, `group: 32.0`, `window:
    true`) is an error, not converted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: str

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_choices(cls, data: Any) -> Any:
        """`bits: true` is not `bits: 1`: pydantic matches Literal choices by equality (True == 1), so a
        boolean given where the field takes no boolean is refused here."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and not _takes_bool(field.annotation):
                    raise ValueError(f"{name}: {value!r} is a boolean; this field takes {_describe(field.annotation)}")
        return data

    def relocated(self, source_dir: Path, target_dir: Path) -> "MethodSpec":
        """This stage as a spec file in `target_dir` must write it to mean what it means in a spec file in
        `source_dir` (`kvcompress tune` writes candidates' stages into a spec elsewhere). Methods whose fields
        name files relative to the spec file override this to rewrite them; the rest have nothing to move."""
        return self


class EvictionSpec(MethodSpec):
    """Base of an evictor's parameters: how many tokens a layer keeps, and when eviction runs.

    Exactly one of `keep` and `budget`. A layer's sinks and full-precision window are never evicted; the
    evictor chooses among the tokens before the window (the ones compressed or about to be).
    """

    keep: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Fraction of the sequence's tokens each layer holds after eviction (sinks and window "
        "included), per sequence and KV head on average.",
    )
    budget: int | None = Field(
        None, ge=1,
        description="Tokens each layer holds at most after eviction (sinks and window included), per sequence "
        "and KV head on average.",
    )
    every: int | None = Field(
        None, ge=1,
        description="During decoding, evict again each time this many new tokens have been seen (None: only at "
        "the end of a forward of several tokens, i.e. a prefill).",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> "EvictionSpec":
        if (self.keep is None) == (self.budget is None):
            raise ValueError("give exactly one of keep (a fraction of the tokens) and budget (a token count)")
        return self


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(arg) for arg in typing.get_args(annotation) if not isinstance(arg, (int, str, float)))


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_args(annotation):  # a union such as `Literal[...] | None`
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))
