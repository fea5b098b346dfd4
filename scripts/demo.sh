#!/usr/bin/env bash
# kvmaccel's main job on a fresh Debian 12 host, in one command (as root):
#
#   scripts/demo.sh            # KVMACCEL_DEMO_SIZE=2G KVMACCEL_DEMO_RUNS=3 by default
#
# It starts one small real guest (diskless, firmware only, 2 vCPUs, memory on 2M huge pages)
# with `virsh start`, three ways, each a few times in rotated order, and prints the median
# start times side by side:
#   qemu-hugepages            <hugepages/>: QEMU preallocates with its default single thread
#   qemu-hugepages-2          the same with <allocation mode='immediate' threads='2'/>
#   kvmaccel-pool-hugetlbfs   a shared file guest; kvmaccel's hook links a clean, pre-zeroed
#                             file from its warm pool, so nothing is populated at start
# The measuring is `kvmaccel hook bench-start` (kvmaccel/bench/start.py): guest memory goes
# to a private hugetlbfs mounted for the run; qemu.conf and the hook are set per
# configuration and put back.
#
# What it needs and makes, and puts back on exit whatever happens:
# * Debian packages libvirt-daemon-system, qemu-system-x86 and scripts/install.sh's
#   (python3-venv python3-libvirt python3-click python3-psutil): installed if missing and
#   left installed (like scripts/test.sh);
# * kvmaccel, installed by scripts/install.sh into /opt/kvmaccel (or, when kvmaccel is
#   installed there already, into a temporary prefix, leaving that one alone): removed;
# * free 2M huge pages for the guest (vm.nr_hugepages raised if needed): the count restored;
# * /dev/kvm opened to the kvm group: its mode and group restored;
# * virtlogd and libvirtd started if not running: stopped again;
# * /var/log/kvmaccel (the hook's log and kvmaccel's records of the demo's starts): removed
#   if it was not there before.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022  # libvirtd, started here, inherits it (see kvmaccel/bench/virsh.py)

SIZE=${KVMACCEL_DEMO_SIZE:-2G}
RUNS=${KVMACCEL_DEMO_RUNS:-3}
APT_PACKAGES=(libvirt-daemon-system qemu-system-x86 python3-venv python3-libvirt
              python3-click python3-psutil)

log() { printf 'demo.sh: %s\n' "$*" >&2; }
if [ "$(id -u)" != 0 ]; then
  log "run as root: it reserves huge pages, starts libvirtd and guests"
  exit 2
fi
case "$SIZE" in
  *G) size_mib=$(( ${SIZE%G} * 1024 )) ;;
  *M) size_mib=${SIZE%M} ;;
  *) log "KVMACCEL_DEMO_SIZE=$SIZE: give a size such as 2G or 512M"; exit 2 ;;
esac

. scripts/lib.sh
apt_install_missing "${APT_PACKAGES[@]}"

# --- save the machine's state, restore it whatever happens ----------------------------------
saved_nr=$(cat /proc/sys/vm/nr_hugepages)
kvm_mode=""; kvm_group=""
started_virtlogd=0; started_libvirtd=0
prefix=/opt/kvmaccel; tmp_prefix=""; installed=0
had_log_dir=0; [ -d /var/log/kvmaccel ] && had_log_dir=1  # the hook's log and records
systemd=0; [ -d /run/systemd/system ] && command -v systemctl >/dev/null && systemd=1
restore() {
  rc=$?
  set +e
  if [ "$installed" = 1 ]; then
    scripts/install.sh --uninstall --prefix "$prefix" >/dev/null 2>&1
    [ -n "$tmp_prefix" ] && rm -rf "$tmp_prefix"
  fi
  if [ "$started_libvirtd" = 1 ]; then
    if [ "$systemd" = 1 ]; then systemctl stop libvirtd
    elif [ -f /run/libvirtd.pid ]; then
      kill "$(cat /run/libvirtd.pid)" 2>/dev/null
      for _ in $(seq 50); do [ -e /run/libvirtd.pid ] || break; sleep 0.1; done
    fi
  fi
  if [ "$started_virtlogd" = 1 ]; then
    if [ "$systemd" = 1 ]; then systemctl stop virtlogd
    elif [ -f /run/virtlogd.pid ]; then
      kill "$(cat /run/virtlogd.pid)" 2>/dev/null
      for _ in $(seq 50); do pgrep -x virtlogd >/dev/null || break; sleep 0.1; done
    fi
  fi
  [ -n "$kvm_mode" ] && chmod "$kvm_mode" /dev/kvm && chgrp "$kvm_group" /dev/kvm
  [ "$had_log_dir" = 0 ] && rm -rf /var/log/kvmaccel
  echo "$saved_nr" > /proc/sys/vm/nr_hugepages
  log "machine restored (nr_hugepages=$saved_nr$([ "$installed" = 1 ] && echo ", kvmaccel removed"))"
  exit $rc
}
trap restore EXIT
trap 'exit 130' INT TERM

# --- kvmaccel, by its install command -------------------------------------------------------
if [ -e "$prefix/INSTALL" ]; then
  tmp_prefix=$(mktemp -d /run/kvmaccel-demo.XXXXXX)
  prefix=$tmp_prefix/kvmaccel
  log "kvmaccel is installed in /opt/kvmaccel already: using a temporary install in $prefix"
  installed=1
  scripts/install.sh --prefix "$prefix" --bin-dir "" --libvirt-dir "" --no-apt
else
  installed=1
  scripts/install.sh --libvirt-dir ""   # the hook comes and goes with each configuration
fi
kv=$prefix/bin/kvmaccel

# --- huge pages, /dev/kvm, the daemons ------------------------------------------------------
need=$(( size_mib / 2 + 16 ))
free=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)
if [ "$free" -lt "$need" ]; then
  echo $(( saved_nr + need - free )) > /proc/sys/vm/nr_hugepages
  free=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)
  [ "$free" -ge "$need" ] || { log "could reserve only $free of $need free 2M pages"; exit 1; }
fi
if [ -e /dev/kvm ]; then
  kvm_mode=$(stat -c %a /dev/kvm); kvm_group=$(stat -c %G /dev/kvm)
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
# A daemon that another script has just stopped can still be exiting: wait for it to go
# (its socket goes first), then start our own.
wait_gone() { for _ in $(seq 100); do pgrep -x "$1" >/dev/null || return 0; sleep 0.1; done; }
if [ ! -S /run/libvirt/virtlogd-sock ]; then wait_gone virtlogd; fi
if ! pgrep -x virtlogd >/dev/null; then
  if [ "$systemd" = 1 ]; then systemctl start virtlogd; else virtlogd -d; fi
  started_virtlogd=1
fi
for _ in $(seq 50); do [ -S /run/libvirt/virtlogd-sock ] && break; sleep 0.1; done
if [ ! -S /run/libvirt/libvirt-sock ]; then wait_gone libvirtd; fi
if ! pgrep -x libvirtd >/dev/null; then
  if [ "$systemd" = 1 ]; then systemctl start libvirtd; else libvirtd -d; fi
  started_libvirtd=1
fi
for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.1; done

# --- the three starts -----------------------------------------------------------------------
log "timing virsh start of a $SIZE guest three ways, $RUNS times each (about a minute)"
"$kv" hook bench-start --size "$SIZE" --runs "$RUNS" --threads 2 --pool-sizes "" \
  --only qemu-hugepages,qemu-hugepages-2,kvmaccel-pool-hugetlbfs
