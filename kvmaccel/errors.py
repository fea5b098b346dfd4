"""The one exception hierarchy of kvmaccel.

Every error a user can cause or meet is a :class:`KvmaccelError`; its ``str()`` is a single line
that names what is wrong and what to do.  Entry points (the CLI, the hook) map these to exit
codes in one place; library code raises and never returns sentinel values.
"""

from __future__ import annotations


class KvmaccelError(Exception):
    """Base class.  ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(KvmaccelError):
    """A value given by the user (option, size, nodeset) is malformed or out of range."""

    exit_code = 2


class HostError(KvmaccelError):
    """A fact about the host could not be read, or the host lacks something needed."""


class ProcessGoneError(HostError):
    """The process asked about no longer exists (it exited and was reaped, or never was):
    its ``/proc/<pid>`` entry is gone.  ``pid`` names it.  A zombie still exists: its
    ``stat`` reads, in state ``Z``."""

    def __init__(self, message: str, *, pid: int | str) -> None:
        super().__init__(message)
        self.pid = pid


class CapacityError(KvmaccelError):
    """Not enough free memory or huge pages for the request.

    Fields: ``node_id`` (None for host-wide), ``page_size_kib``, ``needed_bytes``,
    ``available_bytes``.
    """

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        node_id: int | None = None,
        page_size_kib: int | None = None,
        needed_bytes: int = 0,
        available_bytes: int = 0,
    ) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.page_size_kib = page_size_kib
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class BackingError(KvmaccelError):
    """A backing file or memfd cannot be created, opened, sized or removed.  ``path`` names it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnsafePathError(KvmaccelError):
    """A directory or file is not what kvmaccel may safely act on as root (a symlink,
    another user's, writable by others).  ``path`` names it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class TargetError(BackingError, UsageError):
    """The path given cannot hold guest memory as asked (not on hugetlbfs or tmpfs, a size
    that is not a whole number of its pages): bad input, exit 2."""


class PopulateError(KvmaccelError):
    """Population failed part-way (for example the kernel refused a page)."""


class CancelledError(KvmaccelError):
    """The run was cancelled (SIGINT/SIGTERM or a caller's cancel event)."""

    exit_code = 130


class DomainError(KvmaccelError):
    """The domain XML is malformed or inconsistent.  ``element`` and ``line`` locate it."""

    exit_code = 2

    def __init__(self, message: str, *, element: str | None = None, line: int | None = None):
        super().__init__(message)
        self.element = element
        self.line = line


class PlanError(KvmaccelError):
    """The domain cannot be planned on this host (for example a nodeset names missing nodes)."""

    exit_code = 2


class ConfigError(KvmaccelError):
    """The kvmaccel configuration file is malformed."""

    exit_code = 2


class HookError(KvmaccelError):
    """The libvirt hook cannot be installed or removed (a foreign file, a missing directory)."""


class NotPopulatedError(KvmaccelError):
    """The plan left some memory backend out (``prealloc``); the rest was populated.

    ``backends`` holds ``(backend_id, reason)`` for each backend left out.
    """

    exit_code = 4

    def __init__(self, message: str, *, backends: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.backends = backends


class VirshError(KvmaccelError):
    """A virsh call or the local libvirt daemon failed (benchmark and tests only).  ``stderr``
    holds virsh's own message."""

    def __init__(self, message: str, *, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr
