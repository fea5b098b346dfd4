"""The measurement layer: benchmarks, thread tuning, the libvirt test driver.

Population speed and its disturbance (:mod:`.populate`), time to a running QEMU
(:mod:`.run`), ``virsh start`` with and without the hook (:mod:`.start`), the measurement
behind ``kvmaccel tune`` (:mod:`.tune`), and the libvirt helpers tests and benchmarks share
(:mod:`.virsh`).  Nothing below imports it.

May import: kvmaccel.errors, kvmaccel.paths, kvmaccel.safefs, kvmaccel.model, kvmaccel.host,
  kvmaccel.plan, kvmaccel.engine, kvmaccel.pool, kvmaccel.serve, kvmaccel.libvirt,
  kvmaccel.setup.
Must not import: kvmaccel.launch, kvmaccel.cli, kvmaccel.hook.
"""
