#!/usr/bin/env bash
# Fetch Debian's own kernel for the two-node NUMA guest (tests/numa) and print its image's path.
#
#   scripts/numa-kernel.sh [CACHE_DIR]     (default: /var/cache/kvmaccel-test/kernel)
#
# The kernel is the one linux-image-amd64 depends on today, fetched with `apt-get download`
# and unpacked with `dpkg-deb -x` into CACHE_DIR/<package>_<version>/: nothing is installed,
# /boot and /lib/modules are not touched.  The unpacked tree (image and modules: the guest
# loads 9p and virtio modules from it) is reused by later runs.  When apt cannot be reached,
# the newest tree already in the cache is used.  Not linux-image-cloud-amd64: it lacks 9p.
set -euo pipefail
cache=${1:-/var/cache/kvmaccel-test/kernel}
log() { printf 'numa-kernel.sh: %s\n' "$*" >&2; }

newest_cached() {
  ls -d "$cache"/linux-image-*/ 2>/dev/null | sort -V | tail -n 1
}
image_in() { ls "$1"/boot/vmlinuz-* 2>/dev/null | head -n 1; }

pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
      sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1 || true)
version=""
[ -n "$pkg" ] && version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
if [ -n "$pkg" ] && [ -n "$version" ] && [ "$version" != "(none)" ]; then
  tree="$cache/${pkg}_${version}"
  if [ ! -f "$tree/.complete" ]; then
    log "fetching $pkg $version into $tree"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # _apt cannot write into a root-only temporary directory; apt then downloads as root and
    # says so: that warning is expected.
    # A stale package list names a version the mirror no longer has: update once, retry.
    (cd "$work" && apt-get download -q "$pkg=$version" >/dev/null 2>&1) ||
      { apt-get update -qq >/dev/null 2>&1 &&
        pkg=$(apt-cache depends linux-image-amd64 |
              sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1) &&
        version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p') &&
        tree="$cache/${pkg}_${version}" &&
        (cd "$work" && apt-get download -q "$pkg=$version" >/dev/null 2>&1); } ||
      { log "apt-get download $pkg failed"; tree=""; }
    if [ -n "$tree" ]; then
      rm -rf "$tree"; mkdir -p "$tree"
      dpkg-deb -x "$work"/"$pkg"_*.deb "$tree"
      : > "$tree/.complete"
    fi
  fi
else
  log "apt does not know linux-image-amd64's kernel (run apt-get update?)"
  tree=""
fi
if [ -z "$tree" ] || [ ! -f "$tree/.complete" ]; then
  tree=$(newest_cached)
  tree=${tree%/}
  [ -n "$tree" ] && [ -f "$tree/.complete" ] || { log "no kernel in $cache"; exit 1; }
  log "using the cached $tree"
fi
image=$(image_in "$tree")
[ -n "$image" ] || { log "no vmlinuz in $tree"; exit 1; }
echo "$image"
