"""Errors that reach users: each names the problem and the fix."""

from __future__ import annotations


class KVCompressError(Exception):
    """Base of every error kvcompress raises on purpose."""


class PluginError(KVCompressError):
    """A plugin failed to load, or two plugins claim one method name."""


class UnknownMethodError(KVCompressError):
    """A spec or call names a method no installed plugin provides."""


class SpecError(KVCompressError):
    """A spec file or dict is invalid. Carries every problem found, each with its field path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__("\n".join(f"{where}{p}" for p in problems))


class UnsupportedModelError(KVCompressError):
    """The model lacks what kvcompress needs to patch it."""
