"""One writer per run directory or split: an exclusive lock for as long as a command writes it.

The lock is an `flock` on a hidden file beside the folder (`.NAME.lock`), so it survives the
folder being replaced (`--force`, a split written to a temporary folder and renamed) and
the kernel drops it when its process dies, however it dies: a stale lock recovers itself.
The file holds the writer's pid, which a refused second writer is told, and is removed when
the writer is done.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedct.errors import FedctError


def lock_path(folder: Path) -> Path:
    folder = Path(folder).absolute()
    return folder.with_name(f".{folder.name}.lock")


@contextmanager
def exclusive(folder: str | Path, what: str = "run directory") -> Iterator[Path]:
    """Hold `folder`'s lock while the block runs; a second writer gets a one-line error
    naming the holder's pid."""
    path = lock_path(Path(folder))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(path, folder, what)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield Path(folder)
    finally:
        path.unlink(missing_ok=True)  # while still held: no one can lock the old file after
        handle.close()  # closing the file releases the lock


def _acquire(path: Path, folder, what: str):
    """The locked file at `path`; retried when its holder removed it between our open and our
    lock (we would hold a file no one else sees)."""
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FedctError(f"{folder}: another fedct process (pid {holder}) is writing this "
                             f"{what}; wait for it to finish or stop it") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()
