"""kvmaccel: populate large KVM guest memory in parallel, NUMA-aware, before QEMU starts.

One package per layer; the data flows one way (domain XML + host facts -> plan -> engine ->
files and report), and so do the imports.  From the bottom up:

* :mod:`kvmaccel.model`: domain XML, qemu.conf, units -> typed values;
* :mod:`kvmaccel.host`: facts from ``/sys`` and ``/proc``, and the ctypes system calls;
* :mod:`kvmaccel.plan`: model + host + limits -> a plan, with reasons; the config file;
* :mod:`kvmaccel.engine`: the populate engine, host-wide slots, backing files;
* :mod:`kvmaccel.pool`: the warm pool's files and states; fill, scrub, drain;
* :mod:`kvmaccel.hook` and :mod:`kvmaccel.launch`: side by side, the libvirt hook, and
  ``run``/``prealloc``/``status`` around a QEMU;
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
kvmaccel.hook_fast may import: kvmaccel.hook.

(``kvmaccel`` is this file, which holds ``__version__``.  ``kvmaccel.hook_fast`` is the
hook's entry point under its old name, for hook scripts installed before this layout; see its
docstring.)
"""

__version__ = "0.1.0"
