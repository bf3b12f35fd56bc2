"""The one way the pack writes a file or a folder: under a temporary name in the same folder, then one rename.

Every file the pack writes (LoRAs, embeddings, checkpoints, training checkpoints, caches, class images, saved
images, the built-in models, thumbnails) goes through :func:`atomic_write`, so these rules hold everywhere:

* **Atomic.** ``write_fn`` fills ``.<name>.tmp-<pid>-<random>`` beside the target (same file system, so the rename
  is atomic); it is fsynced, then renamed into place and the folder fsynced. A crash, an error or a cancel leaves
  the old file (or nothing) and never a half-written one; the temporary is removed on every exception.
  :func:`temp_prefix` is that name's start: stale temporaries of killed processes are found by it.
* **Normal permissions.** The file gets the mode a plain ``open()`` would give it, ``0o666 & ~umask`` (0644 under
  the usual umask 022), whatever the writer did (``tempfile.mkstemp`` makes owner-only 0600 files).
* **Never overwritten silently.** ``overwrite=False`` publishes without replacing: an existing target raises
  :class:`FileExistsError` (or, with ``next_name``, the next free name is tried) - decided at the rename itself
  (a hard link, which fails if the name exists), so two writers racing for one name both keep their file.
* **A full disk is a user error.** ``ENOSPC``/``EDQUOT`` (also wrapped by torch.save's ``RuntimeError``, or a
  native writer's "os error 28") becomes a :class:`FinetuneError` naming the folder and the fix; the old file is
  kept and no partial file is left.
* **One writer per run.** In data-parallel training only one process writes files: :func:`set_write_gate`
  installs that check (the training's process group does), and the other processes skip the write.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import FinetuneError

__all__ = ["atomic_write", "temp_prefix", "file_mode", "disk_full_error", "is_disk_full", "set_write_gate",
           "writes_allowed"]

_write_gate: Callable[[], bool] | None = None


def set_write_gate(gate: Callable[[], bool] | None) -> None:
    """Install the process-wide "may this process write files?" check (None: always). Data-parallel training
    installs one that is True on rank 0 only; :func:`atomic_write` then returns at once on the other ranks."""
    global _write_gate
    _write_gate = gate


def writes_allowed() -> bool:
    return _write_gate is None or bool(_write_gate())


def temp_prefix(path: str | os.PathLike) -> str:
    """The start of every temporary name :func:`atomic_write` uses for ``path``: ``.<name>.tmp-`` (then
    ``<pid>-<random>``)."""
    return f".{Path(path).name}.tmp-"


def _decorated(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: ``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask can only be read by setting it: set the strictest value for that instant, so a file another
    # thread creates meanwhile is more private, never less.
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def file_mode() -> int:
    """The mode a new file gets from a plain ``open()``: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # directories on Windows, some network file systems
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()
    except OSError:  # pragma: no cover - best effort cleanup
        pass


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any], *, folder: bool = False,
                 overwrite: bool = True, next_name: Callable[[Path], Path] | None = None,
                 every_process: bool = False) -> Path:
    """Run ``write_fn(temp_path)`` and move the result to ``path`` in one rename; returns the final path.

    Args:
        path: the target; its folder is created if missing.
        write_fn: writes the file (or, with ``folder``, fills the folder) at the temporary path it is given.
        folder: the temporary is a directory; an existing folder at ``path`` is replaced whole, never merged into
            (moved aside, the new one renamed in, then the old one deleted; put back if the rename fails).
        overwrite: False: never replace an existing ``path``; the write is kept under ``next_name(path)`` (tried
            until a name is free) or, without ``next_name``, :class:`FileExistsError` is raised.
        next_name: the name to try after ``path`` was taken (only with ``overwrite=False``).
        every_process: write in every process of a data-parallel run, not only the writing one (for a local file
            each process reads back itself, e.g. generated class images).
    Raises:
        FinetuneError: the disk (or quota) is full; the old file is unchanged and no partial file is left.
        Any other exception of ``write_fn`` (also cancel) after removing the temporary.
    In data-parallel training only one process writes (:func:`set_write_gate`); the others return ``path`` at once.
    """
    path = Path(path)
    if not (every_process or writes_allowed()):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _decorated(path, "tmp")
    try:
        if folder:
            tmp.mkdir()
        write_fn(tmp)
        if folder:
            if not tmp.is_dir():
                raise RuntimeError(f"the writer left no folder at {tmp}")
            for sub in sorted(tmp.rglob("*")):
                if sub.is_file():
                    _fsync_path(sub)
        else:
            if not tmp.is_file():
                raise RuntimeError(f"the writer left no file at {tmp}")
            os.chmod(tmp, file_mode())
            _fsync_path(tmp)
        while True:
            try:
                _publish(tmp, path, folder=folder, overwrite=overwrite)
                break
            except FileExistsError:
                if overwrite or next_name is None:
                    raise
                path = Path(next_name(path))
        _fsync_path(path.parent)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full_error(path) from exc
        raise
    return path


def _publish(tmp: Path, path: Path, *, folder: bool, overwrite: bool) -> None:
    if folder:
        if overwrite:
            _replace_folder(tmp, path)
        elif os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        else:
            os.rename(tmp, path)
        return
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the name exists: no check-then-rename race
    except FileExistsError:
        raise
    except (OSError, NotImplementedError, AttributeError):  # a file system without hard links (FAT, some shares)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.rename(tmp, path)  # Windows refuses to replace; POSIX: the small race of a check-then-rename
        return
    tmp.unlink()


def _replace_folder(tmp: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    old = _decorated(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    _remove(old)


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# safetensors (Rust) and other native writers report the OS error only in their message (Linux errno 28 ENOSPC,
# 122 EDQUOT; Windows 112 ERROR_DISK_FULL).
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded|storagefull|os error (28|112|122)\b"
                             r"|there is not enough space on the disk", re.IGNORECASE)


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` or an exception it wraps (``__cause__`` / ``__context__``) says the disk is full.

    An ``OSError`` is judged by its errno alone; other exceptions (native writers) by their message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            if exc.errno in _DISK_FULL_ERRNOS:
                return True
        elif _DISK_FULL_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str | os.PathLike, *, node: str | None = None, fix: str | None = None) -> FinetuneError:
    """The error for a write to ``path`` that failed because its disk is full (the old file is kept)."""
    path = Path(path)
    folder = path.parent
    free = ""
    try:
        free = f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free now)"
    except OSError:
        pass
    return FinetuneError(f"the disk is full: '{path.name}' could not be written in {folder}{free}; any previous "
                         f"file of that name is unchanged and no partial file was left", node=node,
                         fix=fix or f"free space on the disk that holds {folder}, or save to a folder on another "
                                    "disk (another models/output folder, e.g. in extra_model_paths.yaml)")
