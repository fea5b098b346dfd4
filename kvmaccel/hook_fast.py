"""The hook's entry point under its oldest name (``kvmaccel.hook_fast``).

A hook script written by ``kvmaccel hook install`` before the layout by layers runs
``from kvmaccel.hook_fast import main``.  This module keeps such a script working, warm path
included, until ``kvmaccel hook install`` is run again and writes
``from kvmaccel.libvirt.entry import main``.  Nothing in kvmaccel imports it.  To be removed
in kvmaccel 0.3.
"""

from .libvirt.entry import main

__all__ = ["main"]
