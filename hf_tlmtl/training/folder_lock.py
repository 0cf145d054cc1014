"""One run per output folder: :func:`lock_output_dir` refuses a second run that would write into the same folder.

Two runs started together into one ``output_dir`` used to both finish and both say where their model is, while
only one model survived. The first run now holds an exclusive ``flock`` on a lock file for the folder, kept in
the system's temporary directory (nothing is written next to the user's files); the second run stops with a line
naming the first one's process. The operating system drops the lock when its process ends, however it ends, so
a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO

from .cli import UsageError

LOCK_DIR = Path(tempfile.gettempdir()) / "hf_tlmtl-locks"
"""Where the lock files live: one per output folder, named by a hash of its absolute path."""

_HELD: dict[str, IO[str]] = {}


def lock_path(output_dir: str | os.PathLike) -> Path:
    """The lock file of ``output_dir`` (resolved, so two spellings of one folder share it).

    Example:
        >>> lock_path("/tmp/a/../run") == lock_path("/tmp/run")
        True
    """
    key = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:24]
    return LOCK_DIR / f"{key}.lock"


def lock_output_dir(output_dir: str | os.PathLike) -> Path:
    """Hold the lock of ``output_dir`` until this process ends (again in the same process: nothing more to do).

    Raises :class:`~hf_tlmtl.training.cli.UsageError` when another process holds it, naming that process.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> lock_output_dir(out) == lock_output_dir(out) == lock_path(out)
        True
    """
    path = lock_path(output_dir)
    if str(path) in _HELD:
        return path
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open for the process's life: the open file is the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(
            f"output_dir {str(output_dir)!r} is in use by another run ({holder}); wait for it to finish, or pass "
            "another --output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, writing {Path(output_dir).resolve()}")
    handle.flush()
    _HELD[str(path)] = handle
    return path


def unlock_output_dir(output_dir: str | os.PathLike) -> None:
    """Let go of the lock of ``output_dir`` before the process ends (tests, notebooks running several runs)."""
    handle = _HELD.pop(str(lock_path(output_dir)), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
