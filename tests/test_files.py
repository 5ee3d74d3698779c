"""inferflux.files: a write either publishes the whole new file or leaves the old one untouched."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from inferflux.files import atomic_write, is_abandoned, temp_owner, temp_path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_text_bytes_and_callback(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    assert atomic_write(target, "{}\n") == target  # the folder is created
    assert target.read_text() == "{}\n"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    atomic_write(target, lambda tmp: tmp.write_text("from a writer"))
    assert target.read_text() == "from a writer"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600: stores may be shared
    assert _names(target.parent) == ["a.json"]


def test_a_writer_that_raises_mid_write_leaves_the_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old content")
    seen: list[Path] = []

    def crash(tmp: Path) -> None:
        seen.append(tmp)
        with open(tmp, "wb") as handle:
            handle.write(b"half of the new")
        assert tmp.stat().st_size > 0 and tmp.parent == target.parent  # same folder: rename is atomic
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old content"
    assert not seen[0].exists() and _names(tmp_path) == ["model.gguf"]


def test_interrupt_leaves_no_file_where_there_was_none(tmp_path: Path) -> None:
    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 100)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", interrupted)
    assert _names(tmp_path) == []


def test_temp_names_carry_the_writers_pid(tmp_path: Path) -> None:
    with temp_path(tmp_path, suffix=".gguf") as tmp:
        assert temp_owner(tmp.name) == os.getpid() and tmp.name.endswith(".gguf")
        assert not is_abandoned(tmp)  # ours, being written
    assert not tmp.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".tmp-{int(dead.stdout)}-abc"
    orphan.write_bytes(b"left by a killed pull")
    assert is_abandoned(orphan)
    assert temp_owner("sha256-0123") is None and not is_abandoned(tmp_path / "sha256-0123")
