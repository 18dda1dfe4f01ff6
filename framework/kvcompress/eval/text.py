"""The texts `kvcompress eval` and `kvcompress calibrate` read: a --text file or directory, or a default every
system has."""

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


def text_files(path: str) -> list[Path]:
    """The files --text PATH names: the file itself, or every file of a directory in name order, each once (a link
    to another file of the directory is skipped). A directory of texts, e.g. /usr/share/common-licenses (about 56k
    tokens), gives a perplexity protocol many more windows than one license text."""
    where = Path(path)
    if not where.is_dir():
        return [where]
    entries = sorted(entry for entry in where.iterdir() if entry.is_file())
    real = {entry.resolve() for entry in entries if not entry.is_symlink()}
    files, seen = [], set()
    for entry in entries:
        target = entry.resolve()
        if (entry.is_symlink() and target in real) or target in seen:
            continue
        seen.add(target)
        files.append(entry)
    if not files:
        raise KVCompressError(f"--text {path}: the directory holds no files")
    return files


def read_text(path: str | None, default: Callable[[], tuple[str, str]] = default_text) -> tuple[str, str]:
    """(text, source) of --text PATH (a file, or a directory's files one after the other, each ending in a newline),
    or `default()` when none is given."""
    if path is None:
        return default()
    parts = []
    for file in text_files(path):
        try:
            parts.append(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise KVCompressError(f"--text {file}: cannot read it ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise KVCompressError(f"--text {file}: not UTF-8 text") from None
    last = len(parts) - 1
    text = "".join(part if part.endswith("\n") or i == last else part + "\n" for i, part in enumerate(parts))
    if not text.strip():
        raise KVCompressError(f"--text {path}: the text is empty")
    return text, str(path)
