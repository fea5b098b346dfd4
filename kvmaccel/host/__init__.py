"""The host layer: what the machine is, read from ``/sys`` and ``/proc``.

Facts read under an injectable root (:mod:`.facts`: nodes, CPUs, huge page pools, mounts, power,
and :func:`.facts.mount_of`, the mount that holds a path; :mod:`.emulator`: whether an emulator
is kvmaccel's front; :mod:`.owner`: user and group names or numbers as ids, the way libvirt
reads qemu.conf; :mod:`.capacity`: the one check of what memory a set of (node, page size) needs
against what is free), and the system calls Python lacks, through ctypes (:mod:`.sysmem`:
``madvise``, ``mbind``, ``memfd``). The only code that reads sysfs; it decides nothing.

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model.
Must not import: kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.hook, kvmaccel.launch,
  kvmaccel.bench, kvmaccel.cli, kvmaccel.serve, kvmaccel.libvirt, kvmaccel.setup.
"""
