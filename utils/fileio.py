"""Writing result files safely: atomically, with the user's normal permissions, and without
leaving debris behind.

Every file the project writes into an output folder (checkpoints, config.yaml, metrics.json,
eval_cache.pth, the annotation cache) goes through ``atomic_write``: the bytes go to a temporary
file in the same folder, are flushed to disk, and the temporary file is renamed onto the target,
so that a crash leaves either the old file or the new one, never a half-written one.

Two details of ``tempfile.mkstemp`` are undone here:
- it creates the file with mode 0600 (owner only); results are given the mode any other file of
  the user gets (0666 minus the umask, usually 0644), as ``open(path, "w")`` would;
- a process killed between creating and renaming the file leaves it behind. Its name says what it
  is (``.<target>.<random>.tmp``): ``remove_stale_temp_files`` removes such files at the start of
  the next run in that folder.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Callable, List, Union

__all__ = ["atomic_write", "atomic_write_bytes", "default_file_mode", "remove_stale_temp_files",
           "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"
# ".<target name>.<8 random characters of mkstemp>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def default_file_mode() -> int:
    """The permission bits of a newly created file: 0666 minus the process's umask."""
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    try:  # make the rename durable
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], write: Callable, mode: str = "wb") -> str:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically. On failure the
    previous file (if any) is untouched and the temporary file is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)
    return path


def atomic_write_bytes(path, data: bytes) -> str:
    """``atomic_write`` of a bytes object."""
    return atomic_write(path, lambda f: f.write(data))


def remove_stale_temp_files(directory: Union[str, os.PathLike]) -> List[str]:
    """Remove the temporary files that an interrupted ``atomic_write`` left directly in
    ``directory``; returns their paths. Only names of the form ``.<name>.<random>.tmp`` are
    touched. Call it where no other process is writing into the folder (the start of a run that
    owns it)."""
    directory = os.fspath(directory)
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        path = os.path.join(directory, name)
        if _TEMP_NAME.match(name) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed
