"""Writing files atomically: the one place InferFlux renames a finished temp file onto its name.

Every file the project publishes (store blobs and manifests, converted GGUF
files, benchmark models) is written here, because the rules are easy to get
subtly wrong at each call site:

- the temp file sits in the destination's folder, so the rename never crosses
  a filesystem and is atomic: a reader sees the old file or the new one, never
  half of either;
- its bytes are fsynced before the rename, so a crash right after it cannot
  leave a complete name pointing at an empty file;
- any error (a writer that raises, a hash that does not match, Ctrl-C) removes
  the temp file and leaves the old file as it was;
- the temp name carries the writer's pid (`.tmp-<pid>-...`), so a later process
  can tell an abandoned temp file (its writer is gone) from one being written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
# Temp files are created 0600; published files are readable like any file a user saves (shared stores).
FILE_MODE = 0o644
DIR_MODE = 0o755

Writer = Callable[[Path], None]


def atomic_write(path: str | Path, data: bytes | str | Writer, *, mode: int = FILE_MODE) -> Path:
    """Write `data` to `path` all at once: the old file stays intact unless the whole write succeeds.

    `data` is the content (str is written as UTF-8) or a callback that writes the
    temp file it is given (for writers that want a path, like `gguf.GGUFWriter`);
    if the callback raises, nothing is published and the exception propagates.
    """
    path = Path(path)
    with temp_path(path.parent, suffix=path.suffix) as tmp:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        publish(tmp, path, mode=mode)
    return path


def publish(tmp: str | Path, path: str | Path, *, mode: int = FILE_MODE) -> None:
    """fsync a finished temp file and rename it onto `path` (same folder); for destinations known only
    after the content is written (a blob named by the hash of what was just converted)."""
    tmp = Path(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def publish_folder(tmp: str | Path, path: str | Path) -> bool:
    """Rename a finished temp folder onto `path`; False when another process published it first
    (a folder cannot replace a non-empty one, and the other copy is as good)."""
    try:
        os.rename(tmp, path)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def temp_path(directory: str | Path, suffix: str = "", *, folder: bool = False) -> Iterator[Path]:
    """A new pid-named temp file (or folder) in `directory`, removed on exit unless it was published."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"{TMP_PREFIX}{os.getpid()}-"
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=prefix, suffix=suffix))
        os.chmod(tmp, DIR_MODE)
    else:
        fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    finally:
        remove_path(tmp)


def temp_owner(name: str) -> int | None:
    """The pid in a temp name made by `temp_path`, or None if `name` is not one."""
    if not name.startswith(TMP_PREFIX):
        return None
    pid = name[len(TMP_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def is_abandoned(path: Path) -> bool:
    """Whether `path` is a temp file or folder whose writer (another process) has exited."""
    pid = temp_owner(path.name)
    return pid is not None and pid != os.getpid() and not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts: it is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree; a path that is already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
