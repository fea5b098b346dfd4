"""The libvirt hook layer: what kvmaccel does at each step of a guest's life.

The entry point libvirt's script runs (:mod:`.entry`), which tries the warm path
(:mod:`.warm`) and imports the full hook (:mod:`.full`, :mod:`.ops`, :mod:`.pool`) only when
it declines; what both paths share (:mod:`.state`); the filler's stop at ``started``
(:mod:`.filler`); installing the script (:mod:`.install`).  Inside the layer, imports go one
way too: entry -> filler -> warm -> state, and full -> ops -> warm.

May import: kvmaccel, kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model,
  kvmaccel.host, kvmaccel.plan, kvmaccel.engine, kvmaccel.pool.
Must not import: kvmaccel.launch, kvmaccel.bench, kvmaccel.cli.
"""
