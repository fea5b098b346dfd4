"""The planning layer: model + host facts + limits -> a plan, with its reasons.

Pure functions (:mod:`.planner`: which files libvirt will hand QEMU and what to do with
each, after libvirt's own naming and path rules in :mod:`.libvirt`, as JSON in
:mod:`.planjson`; :mod:`.limits`: helper threads per node, chunks; :mod:`.energy` and
:mod:`.tuning`'s curves and knees: how many threads, and why), and what reads their inputs,
named here because it is not pure: the operator's settings (:mod:`.config`, kvmaccel's TOML
file, expressed in the planner's own types: :class:`Limits`, the energy settings), the
tuning state file (:mod:`.tuning`'s ``load_tuning``; ``save_tuning`` writes it, the one file
this layer writes, through :mod:`kvmaccel.safefs`) and the energy facts (:mod:`.policy`).
:mod:`.forhost` reads those inputs for this host (qemu.conf, the config's limits, tuning,
energy, whether the emulator is the front) the one way every caller plans a domain.  Nothing
here maps memory or starts threads.

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model, kvmaccel.host.
Must not import: kvmaccel.engine, kvmaccel.pool, kvmaccel.hook, kvmaccel.launch, kvmaccel.bench,
  kvmaccel.cli, kvmaccel.serve, kvmaccel.libvirt, kvmaccel.setup.
"""
