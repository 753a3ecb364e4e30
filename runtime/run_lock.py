"""One training run per output folder: an advisory lock that dies with its process."""
from __future__ import annotations

import os
import socket
import time

from runtime.errors import InputError, OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded against sharing a folder
    fcntl = None

LOCK_NAME = ".lock"


class RunLock:
    """Exclusive flock on <folder>/.lock holding 'pid host start-time'; the kernel drops it when the run dies.

    The file itself stays: deleting it on release would let a waiting run lock an unlinked file
    while a third one locks a new file of the same name.
    """

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd: int | None = None
        if fcntl is None:
            return
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise InputError(f"{self.path}: the run's lock file cannot be opened ({err.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 512).decode("utf-8", "replace").split()
            self.release()
            pid, host, started = (holder + ["?"] * 3)[:3]  # '?' while the holder is still writing its line
            raise InputError(f"{folder}: another training run is using this folder (pid {pid} on {host}, "
                             f"started {started}); wait for it to end or choose another --model_name / "
                             "--logger_name") from None
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        except OSError as err:  # a full disk: one line before any work
            self.release()
            raise OutputError(f"{self.path}: the run's lock file cannot be written ({err.strerror})") from None

    def release(self) -> None:
        """Give the folder free (closing the descriptor drops the flock)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
