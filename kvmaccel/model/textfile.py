"""Reading the small text files an operator names (domain XML, kvmaccel.toml, qemu.conf).

A name given by mistake must not hang the command or exhaust memory: a FIFO blocks an
``open()`` until a writer comes, and ``/dev/zero`` never ends.  So the file is opened with
``O_NONBLOCK`` (a FIFO then opens at once), checked to be a regular file on the descriptor,
and read up to a bound (``/dev/null`` reads as empty).  ``-`` is not special here (see the
CLI for stdin).
"""

from __future__ import annotations

import errno
import os
import stat

MAX_TEXT_BYTES = 16 << 20
"""The largest file read (a domain XML is some KiB, a config file less)."""


def read_regular(path: str, limit_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of the regular file ``path``.  Raises :class:`OSError` (``strerror`` says
    what is wrong): ``ENOENT`` and the like from ``open``, ``EINVAL`` "not a regular file"
    for a directory, FIFO, socket or device, ``EFBIG`` for a file above ``limit_bytes``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "Is a directory", path)
        if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3:
            return b""  # /dev/null: the usual "an empty file"
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", path)
        chunks = []
        left = limit_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit_bytes:
            raise OSError(errno.EFBIG, f"larger than {limit_bytes >> 20} MiB, too large for "
                          "a text file kvmaccel reads", path)
        return data
    finally:
        os.close(fd)
