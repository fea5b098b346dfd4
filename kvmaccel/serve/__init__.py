"""The serving layer: a guest's memory, served at its start and taken back at its stop.

Front-neutral: nothing here knows libvirt, its hook or domain XML.  An adapter (the libvirt
hook, :mod:`kvmaccel.libvirt`) builds a :class:`~kvmaccel.serve.job.StartJob`
(:mod:`.job`) and hands it to :func:`~kvmaccel.serve.start.serve` (:mod:`.start`: pool files
linked, the rest created, populated or filled beside QEMU's preallocation); the stop takes back
what the start made (:mod:`.stop`).  Beneath them: what the pool serves at a start and gets
back at a stop (:mod:`.pool`), the room left after it (:mod:`.room`), the warm start's light
take of a recipe (:mod:`.take`), the filler (:mod:`.overlap`, :mod:`.filler`), the
directories kvmaccel makes for a guest (:mod:`.memdir`), and the guest's state between its
start and its stop (:mod:`.state`).

May import: kvmaccel, kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model,
  kvmaccel.host, kvmaccel.plan, kvmaccel.engine, kvmaccel.pool.
Must not import: kvmaccel.libvirt, kvmaccel.hook, kvmaccel.setup, kvmaccel.launch,
  kvmaccel.bench, kvmaccel.cli.
"""
