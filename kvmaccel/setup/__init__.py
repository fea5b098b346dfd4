"""The set-up layer: what changes or inspects the host's configuration, never on a start path.

The libvirt hook's script (:mod:`.install`), the emulator front and its enable/disable edit
of domain XML (:mod:`.front`), the front under QEMU's own name (:mod:`.divert`), the keeper
as a service (:mod:`.keeper`: daemon, pidfile, unit), and ``kvmaccel doctor``
(:mod:`.doctor`).  No start path imports it: ``tests/test_layout.py`` checks that.

May import: kvmaccel, kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model,
  kvmaccel.host, kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.serve,
  kvmaccel.libvirt.
Must not import: kvmaccel.hook, kvmaccel.launch, kvmaccel.bench, kvmaccel.cli.
"""
