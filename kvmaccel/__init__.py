"""kvmaccel: populate large KVM guest memory in parallel, NUMA-aware, before QEMU starts."""

__version__ = "0.1.0"
