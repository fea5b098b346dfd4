"""The model layer: text in, typed values out.

Domain XML -> a read-only model (:mod:`.domain`, reading with :mod:`.domxml`), libvirt's
qemu.conf (:mod:`.qemuconf`), sizes and CPU lists (:mod:`.units`).  No policy: nothing here
decides a path, a size to populate or a thread count, reads the host or touches memory.

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs.
Must not import: kvmaccel.host, kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.hook,
  kvmaccel.launch, kvmaccel.bench, kvmaccel.cli.
"""
