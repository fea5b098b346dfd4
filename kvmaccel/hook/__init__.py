"""The libvirt hook's entry point under its name before :mod:`kvmaccel.libvirt` (compatibility).

A hook script written by ``kvmaccel hook install`` before then runs
``from kvmaccel.hook.entry import main``; :mod:`.entry` keeps it working, warm path
included, until ``kvmaccel hook install`` writes ``from kvmaccel.libvirt.entry import main``.
Nothing in kvmaccel imports it.  To be removed in kvmaccel 0.3.

May import: kvmaccel.libvirt.
Must not import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model,
  kvmaccel.host, kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.serve,
  kvmaccel.setup, kvmaccel.launch, kvmaccel.bench, kvmaccel.cli.
"""
