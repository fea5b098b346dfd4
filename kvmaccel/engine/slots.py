"""Host-wide helper slots shared by every kvmaccel process.

The host-wide helper cap must hold when two guests start at once, each in its own hook
process.  Each helper holds one slot: an exclusive ``flock`` on ``<dir>/slot-<K>`` for
K < cap.  The kernel drops a lock when its holder dies, so a crashed run never leaks slots.
The directory is 0700 and the slot files 0600: a lock needs only an open file, so a slot
anyone could open is a slot anyone could hold, starving every run of helpers.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

from ..errors import HostError
from ..paths import run_dir
from ..safefs import open_own_file, private_dirs

log = logging.getLogger(__name__)


class HostSlots:
    """Up to ``cap`` slots under ``directory``; :meth:`acquire` takes what is free."""

    def __init__(self, cap: int, directory: str | None = None) -> None:
        self.cap = cap
        self.directory = directory or os.path.join(run_dir(), "slots")
        self._held: list[int] = []

    def acquire(self, wanted: int) -> int:
        """Take up to ``wanted`` free slots without waiting; return how many were taken."""
        if wanted <= 0:
            return 0
        try:
            private_dirs(self.directory)  # 0700: nobody else can open a slot and hold it
        except OSError as e:
            raise HostError(
                f"cannot create {self.directory}: {e.strerror}; run as root or set "
                "KVMACCEL_RUN_DIR to a writable directory"
            ) from e
        for index in range(self.cap):
            if len(self._held) >= wanted:
                break
            path = os.path.join(self.directory, f"slot-{index}")
            try:  # our own file in our own directory, or another user could hold the slot
                fd = open_own_file(path, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                raise HostError(f"cannot open {path}: {e.strerror}") from e
            try:
                os.fchmod(fd, 0o600)  # a slot others could open is a slot others could hold
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise HostError(f"cannot lock {path}: {e.strerror}") from e
            self._held.append(fd)
        return len(self._held)

    @property
    def held(self) -> int:
        return len(self._held)

    def release(self) -> None:
        for fd in self._held:
            os.close(fd)  # closing drops the flock
        self._held.clear()

    def __enter__(self) -> HostSlots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
