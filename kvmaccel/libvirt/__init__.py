"""The libvirt adapter: libvirt's qemu hook contract, on top of :mod:`kvmaccel.serve`.

The entry point libvirt's script runs (:mod:`.entry`), which tries the warm path
(:mod:`.warm`) and imports the full hook (:mod:`.full`, :mod:`.ops`) only when it declines;
what both share (:mod:`.state`: the config snapshot, logging without the logging module);
``started begin``, where the filler stops for good (:mod:`.started`).  Only this package knows
the hook's operations, its arguments and the domain XML on its stdin.  Inside it, imports go
one way: entry -> started -> warm -> state, and full -> ops -> warm.

May import: kvmaccel, kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model,
  kvmaccel.host, kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.serve.
Must not import: kvmaccel.hook, kvmaccel.setup, kvmaccel.launch, kvmaccel.bench,
  kvmaccel.cli.
"""
