"""Every file the project writes goes through here: atomic, with the user's umask, no temporary left behind.

Also: the UTF-8 reader shared by captions, vocabularies and manifests, and the early writability check.
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import BinaryIO, Callable

from runtime.errors import InputError, OutputError

TEMP_PREFIX = ".tmp-"
_OWNED_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")  # .tmp-<pid>-...: the writer's process id


def user_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete `.tmp-<pid>-*` files in folder whose writing process is gone (a killed save); returns them."""
    removed = []
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return removed
    for name in names:
        owner = _OWNED_TEMP.match(name)
        if owner and int(owner.group(1)) != os.getpid() and not _process_alive(int(owner.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass  # someone else removed it, or it is not ours to remove
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], suffix: str = "") -> None:
    """Write path through a temporary file in the same folder, then rename it into place.

    A failure (a full disk, a signal) leaves the previous file as it was and no temporary file; an OSError
    becomes one OutputError line naming the file. The new file gets the user's umask, not mkstemp's 0600.
    """
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=folder)
    except OSError as err:
        raise OutputError(f"{path}: cannot be written ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~user_umask())
        os.replace(tmp, path)
    except BaseException as err:
        os.unlink(tmp)
        if isinstance(err, OSError):
            raise OutputError(f"{path}: cannot be written ({err.strerror or err}); "
                              "the previous file, if any, is unchanged") from None
        raise


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """atomic_write of a bytes payload."""
    atomic_write(path, lambda f: f.write(payload))


def check_writable(folder: str, what: str = "output directory") -> None:
    """Prove a file can be made in folder, or in its nearest existing parent, before any long work.

    Nothing is created: a later failure leaves no empty folder behind.
    """
    existing = os.path.abspath(folder or ".")
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{folder}: {what} cannot be written ({existing} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-probe", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise InputError(f"{folder}: {what} cannot be written ({err.strerror or err})") from None


def check_output_file(path: str, flag: str) -> None:
    """An output file's folder is writable and the path is not an existing folder."""
    if os.path.isdir(path):
        raise InputError(f"{path}: {flag} names a folder, a file name is needed")
    check_writable(os.path.dirname(path) or ".", f"folder of {flag}")


def read_utf8(path: str, what: str = "file") -> str:
    """Text of a UTF-8 file (a leading BOM dropped); bad bytes are one line naming the byte offset and line."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}: not valid UTF-8 ({err.reason}: byte 0x{data[err.start]:02x} at byte offset "
                         f"{err.start}, line {line})") from None
