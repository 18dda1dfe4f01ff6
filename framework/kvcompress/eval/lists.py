"""The comma-separated lists of `kvcompress eval`'s options (--lengths, --depths, --seed, --ruler-tasks)."""

from __future__ import annotations

from typing import Callable, TypeVar

from kvcompress.errors import KVCompressError

T = TypeVar("T")


def parse_list(text: str, convert: Callable[[str], T], option: str, example: str) -> tuple[T, ...]:
    """`text` split at commas, each part converted; a part `convert` refuses is an error naming the option."""
    try:
        return tuple(convert(part.strip()) for part in text.split(","))
    except ValueError:
        raise KVCompressError(f"{option} {text!r}: expected a comma-separated list such as {example}") from None
