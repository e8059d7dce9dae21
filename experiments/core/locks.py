"""An exclusive lock on a file, shared by the processes of one machine or filesystem."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path, *, wait: bool = True):
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block and yield the open
    file (binary, unbuffered). Best effort: where there is no lock to take (not POSIX, the file
    cannot be opened, a filesystem that refuses locks) the block runs unlocked and gets ``None``.
    With ``wait=False`` a lock another process holds raises ``BlockingIOError`` at entry."""
    with contextlib.ExitStack() as stack:
        try:
            import fcntl

            f = stack.enter_context(Path(path).open("a+b", buffering=0))
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise
        except (ImportError, OSError):  # not POSIX, no file, or a filesystem without locks
            f = None
        yield f
