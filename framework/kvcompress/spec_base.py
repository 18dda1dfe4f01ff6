"""The base of every method's spec model (the one piece of the spec layer plugins import)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MethodSpec(BaseModel):
    """Base of a method's parameters. Subclasses add `method: Literal["name"]` and their fields.

    Field descriptions are the documentation: `kvcompress schema` and docs/specs.md come from them.
    Fields are strict: a string or a float where an integer is asked (`group: "32"`, `group: 32.0`, `window:
    true`) is an error, not converted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    method: str


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
