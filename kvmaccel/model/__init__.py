"""The model layer: text in, typed values out.

Domain XML -> a read-only model (:mod:`.domain`, reading with :mod:`.domxml`), the one edit
kvmaccel makes to domain XML, its ``<emulator>`` (:mod:`.domedit`), libvirt's qemu.conf
(:mod:`.qemuconf`), sizes and CPU lists (:mod:`.units`), and reading the small text files
an operator names without hanging on a FIFO or ``/dev/zero`` (:mod:`.textfile`).  No
policy: nothing here decides a path, a size to populate or a thread count, reads the host or
touches memory.

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs.
Must not import: kvmaccel.host, kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.hook,
  kvmaccel.launch, kvmaccel.bench, kvmaccel.cli, kvmaccel.serve, kvmaccel.libvirt,
  kvmaccel.setup.
"""
