"""kvmaccel: populate large KVM guest memory in parallel, NUMA-aware, before QEMU starts.

One package per layer; the data flows one way (domain XML + host facts -> plan -> engine ->
files and report), and so do the imports.  From the bottom up:

* :mod:`kvmaccel.model`: domain XML, qemu.conf, units -> typed values;
* :mod:`kvmaccel.host`: facts from ``/sys`` and ``/proc``, and the ctypes system calls;
* :mod:`kvmaccel.plan`: model + host + limits -> a plan, with reasons; the config file;
* :mod:`kvmaccel.engine`: the populate engine, host-wide slots, backing files;
* :mod:`kvmaccel.pool`: the warm pool's files and states; fill, scrub, drain;
* :mod:`kvmaccel.serve`: a guest's memory served at its start and taken back at its stop,
  for any front (no libvirt, no XML);
* :mod:`kvmaccel.libvirt` and :mod:`kvmaccel.launch`: side by side, the libvirt hook (an
  adapter on :mod:`kvmaccel.serve`), and ``run``/``prealloc``/``status`` around a QEMU;
* :mod:`kvmaccel.setup`: host set-up (hook script, front, divert, keeper service, doctor),
  never imported on a start path;
* :mod:`kvmaccel.bench`: benchmarks, tuning, the libvirt test driver;
* :mod:`kvmaccel.cli`: the thin click layer.

Each layer's ``__init__.py`` says what it may import and what it must not, in lines that
``tests/test_layout.py`` reads and checks every import against.  The top level holds only
what every layer shares, and the two entry points.  Their rules:

kvmaccel may import: nothing.
kvmaccel.errors may import: nothing.
kvmaccel.paths may import: nothing.
kvmaccel.safefs may import: kvmaccel.errors.
kvmaccel.__main__ may import: kvmaccel.cli.
kvmaccel.hook_fast may import: kvmaccel.libvirt.

(``kvmaccel`` is this file, which holds ``__version__``.  ``kvmaccel.hook_fast`` and
:mod:`kvmaccel.hook` are the hook's entry point under its two old names, for hook scripts
installed before this layout; see their docstrings.)

Words kept to one meaning: a *backend* is QEMU's memory object, its *backing* the open file
or memfd kvmaccel populates; ``mem_path`` is what QEMU is told, ``file_path`` what kvmaccel
populates (they differ through the front); to *populate* is to fault in and zero before QEMU
runs, QEMU's own *prealloc* does the same inside QEMU, a *scrub* zeroes a pool file a guest
gave back; a start *takes* a clean pool file or *adopts* a fresh one into the pool, the stop
*returns* it (dirty, to be scrubbed), and a *drain* gives unused pool files back to the host.
"""

__version__ = "0.1.0"
