"""``kvmaccel.hook.entry.main``, for hook scripts installed before :mod:`kvmaccel.libvirt`."""

from ..libvirt.entry import main

__all__ = ["main"]
