#!/usr/bin/env bash
# Install what kvmaccel's tests need, start it, run the tests, put the machine back.
#
#   scripts/test.sh [pytest args...]
#
# Needs root (huge pages, hugetlbfs, libvirtd) on Debian 12.  What it changes and restores:
# Debian packages (installed, left installed), .venv/ in the checkout, a Debian kernel unpacked
# into /var/cache/kvmaccel-test/kernel (kept, reused), vm.nr_hugepages,
# a hugetlbfs mount on /dev/hugepages, /dev/kvm's group and mode, virtlogd and libvirtd
# (started only if not running, stopped again).  The libvirt tests (tests/test_hook_integration.py)
# rewrite /etc/libvirt/qemu.conf, install hooks in /etc/libvirt/hooks/qemu.d/, restart libvirtd
# and define guests named kvmaccel-small-*; they undo that themselves, and this script puts
# qemu.conf, the hooks directory, /var/log/kvmaccel, /run/kvmaccel (where hooks run by
# libvirt keep state), the libvirt lock file and those guests back once more on exit.
# The front's tests (tests/test_hook_front_integration.py) also install the emulator front
# as /usr/bin/qemu-system-x86_64-kvmaccel and reserve 1G huge pages; both are put back here
# too (the front removed if it was not there before, the 1G page count as it was).
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD

APT_PACKAGES=(libvirt-daemon-system qemu-system-x86 libvirt-dev pkg-config python3-venv
              kmod busybox-static  # these two: the two-node NUMA guest (tests/numa)
              python3-libvirt python3-click python3-psutil)  # scripts/install.sh's test
HUGEPAGES_2M=${KVMACCEL_TEST_HUGEPAGES:-1536}   # 3 GiB of 2M pages for the tests

log() { printf 'test.sh: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "run as root: the tests reserve huge pages, mount hugetlbfs and start libvirtd"
  exit 2
fi

. scripts/lib.sh
apt_install_missing "${APT_PACKAGES[@]}"

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[libvirt,dev,numa-test]'
# Debian's own kernel for the two-node NUMA guest, unpacked into a cache kept between runs.
KVMACCEL_NUMA_KERNEL=$(scripts/numa-kernel.sh) ||
  { log "no kernel for the NUMA guest: tests/numa will fail"; KVMACCEL_NUMA_KERNEL=/nonexistent; }
export KVMACCEL_NUMA_KERNEL

# --- save the machine's state, restore it whatever happens ----------------------------------
saved_nr=$(cat /proc/sys/vm/nr_hugepages)
NR_1G=/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages
saved_nr_1g=$(cat "$NR_1G" 2>/dev/null || echo "")  # the front's tests reserve 1G pages
FRONT=/usr/bin/qemu-system-x86_64-kvmaccel  # the front's tests install it, then remove it
mounted_huge=0
kvm_mode=""; kvm_group=""
started_virtlogd=0; started_libvirtd=0
state=$(mktemp -d /tmp/kvmaccel-test-state.XXXXXX)
QEMU_CONF=/etc/libvirt/qemu.conf
cp -p "$QEMU_CONF" "$state/qemu.conf" 2>/dev/null || : > "$state/no-qemu.conf"
[ -d /etc/libvirt/hooks ] && cp -a /etc/libvirt/hooks "$state/hooks" || : > "$state/no-hooks"
[ -d /var/log/kvmaccel ] || : > "$state/no-log-dir"
[ -e /run/kvmaccel ] || : > "$state/no-run-dir"  # where hooks run by libvirt keep state
[ -e /run/kvmaccel-libvirt.lock ] || : > "$state/no-libvirt-lock"
[ -e "$FRONT" ] || : > "$state/no-front"
test_guests() { sed -n 's:.*<name>\(.*\)</name>.*:\1:p' vm-fixtures/small-*.xml; }
restore_libvirt() {
  local changed=0
  if pgrep -x libvirtd >/dev/null; then
    for g in $(test_guests); do
      virsh -q -c qemu:///system destroy "$g" >/dev/null 2>&1
      virsh -q -c qemu:///system undefine "$g" >/dev/null 2>&1
    done
  fi
  if [ -f "$state/qemu.conf" ] && ! cmp -s "$state/qemu.conf" "$QEMU_CONF"; then
    cp -p "$state/qemu.conf" "$QEMU_CONF"; changed=1
  fi
  rm -rf /etc/libvirt/hooks
  [ -d "$state/hooks" ] && cp -a "$state/hooks" /etc/libvirt/hooks
  [ -f "$state/no-log-dir" ] && rm -rf /var/log/kvmaccel
  if [ "$changed" = 1 ] && [ "$started_libvirtd" = 0 ] && [ -f /run/libvirtd.pid ]; then
    log "qemu.conf restored: restarting the libvirtd that was running before"
    kill "$(cat /run/libvirtd.pid)"; sleep 2; libvirtd -d
  fi
}
restore() {
  rc=$?
  set +e
  restore_libvirt
  if [ "$started_libvirtd" = 1 ] && [ -f /run/libvirtd.pid ]; then
    kill "$(cat /run/libvirtd.pid)" 2>/dev/null
    for _ in $(seq 50); do [ -e /run/libvirtd.pid ] || break; sleep 0.1; done
  fi
  if [ "$started_virtlogd" = 1 ] && [ -f /run/virtlogd.pid ]; then
    kill "$(cat /run/virtlogd.pid)" 2>/dev/null
  fi
  [ -n "$kvm_mode" ] && chmod "$kvm_mode" /dev/kvm && chgrp "$kvm_group" /dev/kvm
  find /dev/hugepages -maxdepth 1 \( -name 'kvmaccel-*' -o -name 'kvtest-hog-*' \) -delete 2>/dev/null
  if [ "$mounted_huge" = 1 ]; then umount /dev/hugepages; fi
  echo "$saved_nr" > /proc/sys/vm/nr_hugepages
  [ -n "$saved_nr_1g" ] && echo "$saved_nr_1g" > "$NR_1G"
  [ -f "$state/no-front" ] && rm -f "$FRONT"
  [ -f "$state/no-run-dir" ] && rm -rf /run/kvmaccel
  [ -f "$state/no-libvirt-lock" ] && rm -f /run/kvmaccel-libvirt.lock
  rm -rf "${KVMACCEL_RUN_DIR:-/nonexistent}" "$state"
  log "machine restored (nr_hugepages=$saved_nr)"
  exit $rc
}
trap restore EXIT
trap 'exit 130' INT TERM

if ! grep -qs ' /dev/hugepages hugetlbfs ' /proc/mounts; then
  mkdir -p /dev/hugepages
  mount -t hugetlbfs -o pagesize=2M none /dev/hugepages
  mounted_huge=1
fi
if [ "$saved_nr" -lt "$HUGEPAGES_2M" ]; then
  echo "$HUGEPAGES_2M" > /proc/sys/vm/nr_hugepages
fi
got=$(cat /proc/sys/vm/nr_hugepages)
[ "$got" -ge "$HUGEPAGES_2M" ] || { log "could only reserve $got of $HUGEPAGES_2M huge pages"; exit 1; }

if [ -e /dev/kvm ]; then
  kvm_mode=$(stat -c %a /dev/kvm); kvm_group=$(stat -c %G /dev/kvm)
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
if ! pgrep -x virtlogd >/dev/null; then virtlogd -d; started_virtlogd=1; fi
if ! pgrep -x libvirtd >/dev/null; then libvirtd -d; started_libvirtd=1; fi
for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.1; done

export KVMACCEL_RUN_DIR=$(mktemp -d /run/kvmaccel-test.XXXXXX)
export KVMACCEL_REQUIRE_ENV=1
log "ruff"
.venv/bin/ruff check kvmaccel tests hooks
log "pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
exit $rc
