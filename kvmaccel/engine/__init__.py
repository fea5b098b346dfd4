"""The engine layer: the only code that maps memory and starts helper threads.

The populate engine (:mod:`.populate`: chunks, per-node queues, helpers pinned and niced,
priority lent at the end), the host-wide helper slots shared by every kvmaccel process
(:mod:`.slots`), the backing files and memfds it populates, their records and the capacity
check (:mod:`.backing`), where a populated file's pages are (:mod:`.placement`), which
memory a run populated (:mod:`.report`), kvmaccel's own cpu cgroup (:mod:`.cgroup`), and
the record file of starts, stops, fills and scrubs (:mod:`.records`).  It carries out a
plan; it does not make one.

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model, kvmaccel.host,
  kvmaccel.plan.
Must not import: kvmaccel.pool, kvmaccel.hook, kvmaccel.launch, kvmaccel.bench, kvmaccel.cli,
  kvmaccel.serve, kvmaccel.libvirt, kvmaccel.setup.
"""
