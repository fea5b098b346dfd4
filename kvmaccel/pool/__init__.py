"""The warm pool layer: pre-populated, pre-zeroed files and their states.

The files and their crash-safe states, and handing one out (:mod:`.files`, which a warm
hook start imports alone: it must stay light), filling, adopting, scrubbing and draining on
top of the engine (:mod:`.manage`), which pools exist (:mod:`.discovery`: a squatted one is
skipped), keeping them filled for the guests defined (:mod:`.keep`, ``kvmaccel pool keep``;
its service is :mod:`kvmaccel.setup.keeper`), and their figures (:mod:`.metrics`,
``kvmaccel metrics``).

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model, kvmaccel.host,
  kvmaccel.plan, kvmaccel.engine.
Must not import: kvmaccel.hook, kvmaccel.launch, kvmaccel.bench, kvmaccel.cli, kvmaccel.serve,
  kvmaccel.libvirt, kvmaccel.setup.
"""
