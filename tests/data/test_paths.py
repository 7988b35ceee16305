"""`contained_path`: the one place a key or manifest row becomes a local path, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertune.data.paths import UnsafePath, clashing, contained_path
from expertune.errors import DataError


def test_a_plain_name_lands_under_its_root(tmp_path: Path) -> None:
    assert contained_path(tmp_path, "a/b/c.png") == tmp_path / "a" / "b" / "c.png"
    assert contained_path(tmp_path, "é/ü.png") == tmp_path / "é" / "ü.png"


@pytest.mark.parametrize("name, words", [
    ("", "is empty"),
    ("/tmp/x/evil.png", "absolute path"),
    ("//x.png", "absolute path"),
    ("../x.png", "'..' component"),
    ("a/../../x.png", "'..' component"),
    ("a/./x.png", "'.' component"),
    ("a//x.png", "empty component"),
    ("a/", "empty component"),
    ("a\\..\\x.png", "backslash"),
    ("a\0.png", "NUL"),
    ("n" * 256 + ".png", "260 bytes"),
    ("é" * 128 + ".png", "260 bytes"),  # 128 two-byte characters
])
def test_names_that_could_leave_the_root_or_cannot_be_files_are_refused(tmp_path: Path, name: str, words: str) -> None:
    with pytest.raises(UnsafePath, match=words) as raised:
        contained_path(tmp_path, name)
    assert isinstance(raised.value, DataError)


def test_a_path_too_long_for_the_file_system_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafePath, match="over 4095 bytes"):
        contained_path(tmp_path, "/".join(["d" * 200] * 25))


def test_a_name_that_is_also_a_folder_clashes() -> None:
    assert clashing(["a.png", "a.png/b.png", "c/d.png", "c.png"]) == {"a.png"}
    assert clashing(["x/y.png", "x/y.png/z/w.png"]) == {"x/y.png"}
    assert clashing(["a.png", "b.png"]) == set()
