"""The host layer: what the machine is, read from ``/sys`` and ``/proc``.

Facts read under an injectable root (:mod:`.facts`: nodes, CPUs, huge page pools, mounts,
power, and :func:`.facts.mount_of`, the mount that holds a path; :mod:`.emulator`: whether an
emulator is kvmaccel's front; :mod:`.owner`: user and group names or numbers as ids, the way
libvirt reads qemu.conf; :mod:`.capacity`: the one check of what memory a set of (node, page
size) needs against what is free), processes as ``/proc/<pid>`` shows them (:mod:`.proc`:
stat and start time, command line, threads, maps, smaps, numa_maps, descriptors, who holds a
file; :class:`~kvmaccel.errors.ProcessGoneError` once a process is gone), kvmaccel's own
processes (:mod:`.process`: detaching a child, lowering and lending priority), and the
system calls Python lacks, through ctypes (:mod:`.sysmem`: ``madvise``, ``mbind``,
``memfd``, the thread's name).  The only code that reads sysfs and a process's ``/proc``
entry; it decides nothing.

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model.
Must not import: kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.hook, kvmaccel.launch,
  kvmaccel.bench, kvmaccel.cli, kvmaccel.serve, kvmaccel.libvirt, kvmaccel.setup.
"""
