"""The hook's entry point under its name before the layout by layers (``kvmaccel.hook_fast``).

A hook script written by ``kvmaccel hook install`` before then runs
``from kvmaccel.hook_fast import main``.  This module keeps such a script working, warm path
included, until ``kvmaccel hook install`` is run again and writes
``from kvmaccel.hook.entry import main``.  Nothing in kvmaccel imports it.
"""

from .hook.entry import main

__all__ = ["main"]
