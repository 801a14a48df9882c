"""Bytes on disk: validated paths, atomic durable writes, free-space checks.

A file path is built only from validated UIDs, so nothing a peer sends can
steer a write outside the storage root. Writes go to a temporary file in the
destination folder, are fsynced, atomically renamed and the folder is fsynced:
after :func:`atomic_write` returns, the file survives a crash or power loss.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from dicomnode.errors import InvalidInstanceError

# PS3.5 9.1: components of digits separated by '.', at most 64 characters.
# Leading zeros inside a component are invalid in the standard but emitted by
# some legacy devices; they cannot affect path safety, so they are tolerated.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

TMP_SUFFIX = ".tmp"
INSTANCE_SUFFIX = ".dcm"
#: Folder (under ``storage.path``) of stored files that could not be read, with the reason.
QUARANTINE_DIR = "quarantine"
REASON_SUFFIX = ".reason.txt"


def is_valid_uid(value: object) -> bool:
    """True if ``value`` is a DICOM UID usable in a path (digits and dots, <= 64 chars)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def check_uid(name: str, value: object) -> str:
    """Return ``value`` if it is a valid UID, else raise naming the attribute."""
    if value is None or value == "":
        raise InvalidInstanceError(f"{name} is missing")
    if not is_valid_uid(value):
        raise InvalidInstanceError(f"{name} {str(value)[:80]!r} is not a valid DICOM UID")
    return str(value)


def instance_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
    """Relative path of an instance file: ``<study>/<series>/<sop>.dcm`` (UIDs validated)."""
    return Path(
        check_uid("StudyInstanceUID", study_uid),
        check_uid("SeriesInstanceUID", series_uid),
        check_uid("SOPInstanceUID", sop_instance_uid) + INSTANCE_SUFFIX,
    )


def output_relpath(job_id: int, sop_instance_uid: str) -> Path:
    """Relative path of an object the node produced for a job."""
    return Path("outputs", f"job-{int(job_id)}", check_uid("SOPInstanceUID", sop_instance_uid)
                + INSTANCE_SUFFIX)


_known_dirs: set[str] = set()
_known_dirs_lock = threading.Lock()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, *, fsync: bool = True) -> None:
    """Create folder ``path`` (and parents); fsync each new folder's parent so the entry is durable.

    Folders made (or found) here are remembered so that the common case costs
    one ``stat``; a remembered folder that is gone (an operator removed it) is
    forgotten and created again. Raises :class:`NotADirectoryError` naming the
    path when a non-folder is in the way.
    """
    key = str(path)
    if key in _known_dirs:
        if os.path.isdir(key):
            return
        with _known_dirs_lock:
            _known_dirs.discard(key)
    missing: list[Path] = []
    p = Path(path)
    while not p.is_dir():
        if p.exists() or p.is_symlink():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder (cannot store under it)",
                                     str(p))
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            # Made concurrently by another writer: fine if it is a folder.
            if not d.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder (cannot store under it)",
                                         str(d)) from None
        if fsync:
            fsync_dir(d.parent)
    with _known_dirs_lock:
        _known_dirs.add(key)


def write_temp(path: Path, chunks: bytes | Sequence[bytes | bytearray], *,
               fsync: bool = True) -> tuple[Path, int]:
    """First half of :func:`atomic_write`: write ``chunks`` to a temporary file beside
    ``path`` (not yet fsynced); return ``(temporary path, size)``.

    The temporary file is ``<path>.<pid>.<thread>.tmp`` in the same folder, so
    that concurrent writers of the same instance never share one and start-up
    reconciliation can delete leftovers (they never got a success status).
    """
    path = Path(path)
    ensure_dir(path.parent, fsync=fsync)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    if isinstance(chunks, bytes):
        chunks = (chunks,)
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    except FileNotFoundError:
        # The folder was removed behind our back (operator clean-up): forget it, recreate.
        with _known_dirs_lock:
            _known_dirs.discard(str(path.parent))
        ensure_dir(path.parent, fsync=fsync)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        for c in chunks:
            view = memoryview(c)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                size += n
    except BaseException:
        os.close(fd)
        remove_quietly(tmp)
        raise
    os.close(fd)
    return tmp, size


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        # The data and what reading it back needs (size, blocks); a new file's
        # mtime is not worth a second journal write (fdatasync(2)).
        _fdatasync(fd)
    finally:
        os.close(fd)


_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def commit_temp(tmp: Path, path: Path, *, fsync: bool = True) -> None:
    """Second half of :func:`atomic_write`: flush the temporary file, rename it over
    ``path`` and fsync the folder so that the new entry survives a power loss.

    The data is flushed *before* the rename, so that the final name never
    points at incomplete bytes, even after a crash.

    Sharing the folder fsync between concurrent writers (group commit) was
    measured and dropped: on ext4 concurrent fsyncs already share journal
    commits, only ~10 % of folder fsyncs coalesced and the serialised rounds
    made three writers ~8 % slower (docs/benchmarks.md).
    """
    try:
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if fsync:
        fsync_dir(Path(path).parent)


def atomic_write(path: Path, chunks: bytes | Sequence[bytes | bytearray], *,
                 fsync: bool = True) -> int:
    """Write ``chunks`` to ``path`` atomically and durably; return the size written."""
    tmp, size = write_temp(Path(path), chunks, fsync=fsync)
    commit_temp(tmp, Path(path), fsync=fsync)
    return size


def free_mb(path: Path) -> float:
    """Free space in MiB on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / (1024 * 1024)


def disk_usage(path: Path) -> tuple[int, int, int]:
    """``(total, used, free)`` bytes of the file system holding ``path`` (or its nearest
    existing parent), as ``shutil.disk_usage`` gives them."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    total, used, free = shutil.disk_usage(p)
    return total, used, free


def list_instance_files(root: Path) -> list[Path]:
    """The received instance files (``*.dcm``) under ``root``, outputs excluded;
    read-only (temporary files of C-STOREs in progress are left alone)."""
    found: list[Path] = []
    outputs_dir = root / "outputs"
    skipped = (outputs_dir, root / QUARANTINE_DIR)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d in skipped:
            dirnames[:] = []
            continue
        found.extend(d / n for n in filenames if n.endswith(INSTANCE_SUFFIX))
    return found


def scan_instances(root: Path) -> tuple[list[Path], int]:
    """Walk ``root`` for reconciliation: the instance files (``*.dcm``) in it, leftover
    temporary files removed (their C-STORE never got a success status).

    Returns ``(instance files, temporary files removed)``. The objects the node
    produced (``outputs/job-*``) and the quarantine are not walked.
    """
    found: list[Path] = []
    temp_removed = 0
    outputs_dir = root / "outputs"
    quarantine_dir = root / QUARANTINE_DIR
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d == quarantine_dir:
            dirnames[:] = []
            continue
        if d == outputs_dir:
            dirnames[:] = []
        for name in filenames:
            p = d / name
            if name.endswith(TMP_SUFFIX):
                remove_quietly(p)
                temp_removed += 1
            elif name.endswith(INSTANCE_SUFFIX) and d != outputs_dir:
                found.append(p)
    return found, temp_removed


def quarantine_relpath(rel: str | Path) -> Path:
    """Where the stored file ``rel`` goes in the quarantine (same relative layout)."""
    return Path(QUARANTINE_DIR, rel)


def quarantine(root: Path, rel: str | Path, reason: str) -> Path:
    """Move the stored file ``root/rel`` to ``root/quarantine/rel`` and write the reason
    beside it (``<file>.reason.txt``); return the new path. A file already gone is
    quarantined as its reason alone."""
    src = root / rel
    dest = root / quarantine_relpath(rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    note = dest.with_name(dest.name + REASON_SUFFIX)
    atomic_write(note, reason.rstrip("\n").encode("utf-8") + b"\n")
    try:
        os.replace(src, dest)
    except FileNotFoundError:
        pass
    else:
        fsync_dir(dest.parent)
        fsync_dir(src.parent)
    return dest


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
