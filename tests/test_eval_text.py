"""kvcompress.eval.text: --text reads a file, or every file of a directory once, with errors that name the file."""

from __future__ import annotations

import pytest

from kvcompress.errors import KVCompressError
from kvcompress.eval.text import read_text, text_files


def test_a_file_is_read_as_it_is(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    assert read_text(str(tmp_path / "a.txt")) == ("alpha\n", str(tmp_path / "a.txt"))


def test_a_directory_gives_each_file_once_in_name_order(tmp_path):
    (tmp_path / "b").write_text("bravo")
    (tmp_path / "a").write_text("alpha")
    (tmp_path / "0").symlink_to(tmp_path / "a")  # a second name for a: read once, as a
    (tmp_path / "sub").mkdir()  # directories inside are not read
    (tmp_path / "sub" / "z").write_text("zulu")
    assert [f.name for f in text_files(str(tmp_path))] == ["a", "b"]
    assert read_text(str(tmp_path)) == ("alpha\nbravo", str(tmp_path))  # a line break between files, none added at the end


def test_bad_texts_are_named(tmp_path):
    with pytest.raises(KVCompressError, match="holds no files"):
        read_text(str(tmp_path))
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    with pytest.raises(KVCompressError, match="latin1: not UTF-8 text"):
        read_text(str(tmp_path))
    with pytest.raises(KVCompressError, match="cannot read it"):
        read_text(str(tmp_path / "missing"))
    (tmp_path / "latin1").write_text("  \n")
    with pytest.raises(KVCompressError, match="the text is empty"):
        read_text(str(tmp_path))
