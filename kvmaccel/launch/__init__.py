"""The launch layer: kvmaccel around a QEMU it starts or inspects.

``kvmaccel run`` (:mod:`.run`: populate QEMU's shared backends, then exec it), its QEMU
argument parser (:mod:`.qemuargs`, :mod:`.objargs`), ``kvmaccel prealloc`` outside any hook
(:mod:`.prealloc`), and ``kvmaccel status`` of a running QEMU (:mod:`.status`).

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model, kvmaccel.host,
  kvmaccel.plan, kvmaccel.engine.
Must not import: kvmaccel.pool, kvmaccel.hook, kvmaccel.bench, kvmaccel.cli, kvmaccel.serve,
  kvmaccel.libvirt, kvmaccel.setup.
"""
