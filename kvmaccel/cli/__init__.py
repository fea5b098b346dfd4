"""The command-line layer: thin click commands that parse, call a layer, and print.

:mod:`.main` is the ``kvmaccel`` group, and maps every :class:`~kvmaccel.errors.KvmaccelError`
to one line and an exit code; each other module holds one command group.  Nothing but
``kvmaccel.__main__`` imports it.

May import: kvmaccel, kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model,
  kvmaccel.host, kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.launch, kvmaccel.bench,
  kvmaccel.serve, kvmaccel.libvirt, kvmaccel.setup.
Must not import: kvmaccel.hook.
"""
