"""Writing outputs so that nothing is lost: a crash never leaves a half-written output nor destroys an old one.

Files (:func:`atomic_file`): the writer fills a temporary file in the same folder (a unique hidden name that keeps
the extension, so writers that choose a format by extension still work), which is flushed to disk (``fsync``) and
renamed over the target with ``os.replace``, an atomic rename on POSIX and Windows. A killed writer leaves the
old file as it was and at most a ``.NAME.tmp-*`` file next to it.

Directories (:func:`directory_lock`, :func:`swap_in`, :func:`recover`): a directory is built completely under a
unique temporary sibling ``.NAME.tmp-*`` and then swapped in by two renames, ``NAME -> .NAME.old-*`` and
``.NAME.tmp-* -> NAME``. A crash between the two leaves ``NAME`` missing and its previous version in
``.NAME.old-*``: :func:`recover` (run by every later write to ``NAME`` and by loading it) renames it back, and
removes leftovers of interrupted writes. Writers of one ``NAME`` hold an exclusive lock (``.NAME.lock``, an
``flock`` the kernel releases when its process dies), so two writers never use the same names at once; a second
writer is refused with a clear message rather than made to wait. Only a directory the caller recognises
(``replaceable``) is ever replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
from typing import Callable, Iterator


def temp_sibling(path: str, kind: str = "tmp") -> str:
    """A fresh unique name ``.NAME.<kind>-XXXXXXXX<ext>`` in ``path``'s folder (nothing is created)."""
    folder, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1]
    return os.path.join(folder, f".{name}.{kind}-{os.urandom(4).hex()}{ext}")


def fsync_path(path: str) -> None:
    """Flush a file's or a folder's entries to disk (folders: so that a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_file(path: str, what: str = "--out") -> str:
    """``path`` as an absolute file path that can be written, or a one-line error naming ``what``: its folder
    must exist and it must not be a directory or a dangling symbolic link."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a directory; give a file name")
    if os.path.islink(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} is a symbolic link to a missing file ({os.readlink(path)}); "
                                f"remove it or give another name")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{what} {path}: the folder {folder} is not writable")
    return path


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path`` to write; on success it replaces ``path`` (fsync, then
    ``os.replace``), on any error or interrupt it is removed and ``path`` is untouched. A symbolic link at
    ``path`` is followed: its target is replaced."""
    target = os.path.realpath(check_output_file(path))
    tmp = temp_sibling(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(target))


# ---- directories ------------------------------------------------------------------------------------------------
class BusyError(OSError):
    """Another process is writing the same output."""


@contextlib.contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """Exclusive lock on writing ``directory`` (the file ``.NAME.lock`` next to it, removed on release).

    Raises :class:`BusyError` at once when another process holds it.
    """
    lock_path = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise BusyError(f"{directory} is being written by another process (it holds {lock_path}); "
                                f"wait for it to finish") from None
            raise
        try:  # the file may have been removed by its previous holder between our open and flock: lock again
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)
        os.close(fd)


def leftovers(directory: str, kind: str) -> list[str]:
    """The ``.NAME.<kind>-*`` siblings of ``directory`` (``kind``: ``tmp`` or ``old``), oldest first."""
    folder, name = os.path.split(directory)
    found = glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.{kind}-*"))
    return sorted(found, key=os.path.getmtime)


def recover(directory: str, replaceable: Callable[[str], bool]) -> list[str]:
    """Finish or undo an interrupted swap of ``directory``; call it holding :func:`directory_lock`.

    If ``directory`` is missing and a previous version ``.NAME.old-*`` that ``replaceable`` accepts exists, it
    is renamed back (the newest). Then every ``.NAME.tmp-*`` and ``.NAME.old-*`` left by an interrupted write is
    removed. Returns a list of what was done, one line each.
    """
    done = []
    if not os.path.lexists(directory):
        olds = [p for p in leftovers(directory, "old") if replaceable(p)]
        if olds:
            os.replace(olds[-1], directory)
            done.append(f"restored {directory} from {olds[-1]} (a swap was interrupted)")
    for path in leftovers(directory, "tmp") + leftovers(directory, "old"):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        done.append(f"removed {path} (left by an interrupted write)")
    return done


def swap_in(staging: str, directory: str, replaceable: Callable[[str], bool], what: str) -> None:
    """Make the complete directory ``staging`` the new ``directory``; call it holding :func:`directory_lock`.

    An existing ``directory`` is replaced only if ``replaceable(directory)`` (else ``FileExistsError`` naming
    ``what`` it must be); the previous version is removed only after the new one is in place.
    """
    for root, _, names in os.walk(staging):  # everything on disk before it becomes visible
        for n in names:
            fsync_path(os.path.join(root, n))
        fsync_path(root)
    if not os.path.lexists(directory):
        os.replace(staging, directory)
        fsync_path(os.path.dirname(directory))
        return
    if os.path.islink(directory) or not os.path.isdir(directory) or not replaceable(directory):
        raise FileExistsError(f"{directory} exists and is not {what}; refusing to replace it (nothing was "
                              f"deleted; choose another --out)")
    old = temp_sibling(directory, "old")
    os.replace(directory, old)
    os.replace(staging, directory)  # a crash between these two renames is undone by recover()
    fsync_path(os.path.dirname(directory))
    shutil.rmtree(old, ignore_errors=True)
