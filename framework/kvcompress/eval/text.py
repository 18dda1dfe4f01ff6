"""The texts `kvcompress eval` and `kvcompress calibrate` read: a --text file, or a default every system has."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from kvcompress.errors import KVCompressError

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def pydoc_text() -> tuple[str, str]:
    """(text, source): Python's pydoc topics, long English prose present with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)), "pydoc_data.topics"


def default_text() -> tuple[str, str]:
    """(text, source): the GPL-3 license text where the system has it, else Python's pydoc topics."""
    if DEFAULT_TEXT.is_file():
        return DEFAULT_TEXT.read_text(encoding="utf-8"), str(DEFAULT_TEXT)
    return pydoc_text()


def read_text(path: str | None, default: Callable[[], tuple[str, str]] = default_text) -> tuple[str, str]:
    """(text, source) of --text FILE, or `default()` when no file is given."""
    if path is None:
        return default()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KVCompressError(f"--text {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise KVCompressError(f"--text {path}: not UTF-8 text") from None
    if not text.strip():
        raise KVCompressError(f"--text {path}: the file is empty")
    return text, str(path)
