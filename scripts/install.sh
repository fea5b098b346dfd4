#!/bin/sh
# Install kvmaccel from this checkout on Debian 12, upgrade it, or remove it.
#
#   scripts/install.sh              install or upgrade (as root)
#   scripts/install.sh --uninstall  remove everything the install made
#
# Options (the defaults are for a real host; the tests give temporary ones):
#   --prefix DIR       the environment kvmaccel lives in            (/opt/kvmaccel)
#   --bin-dir DIR      where the `kvmaccel` symlink goes             (/usr/local/bin)
#   --libvirt-dir DIR  where libvirt's hooks are ("" for no hook)    (/etc/libvirt)
#   --no-apt           do not install Debian packages (fail if one is missing)
#
# Why a venv of Debian's own /usr/bin/python3 with --system-site-packages, and not a .deb or
# `pip install`: Debian 12's python3 is externally managed (PEP 668), so `pip install .` into
# it fails; Debian ships python3-libvirt (9.0, matching its libvirtd), python3-click and
# python3-psutil, so nothing has to be compiled (libvirt-python from PyPI needs gcc and
# libvirt-dev) or fetched from PyPI; and kvmaccel gets a directory of its own that
# `--uninstall` removes whole.  kvmaccel itself is pure Python with no build step: the package
# is copied into the venv (no pip, no network).  A .deb would need packaging tools and a build,
# and would tie a checkout's every change to a package version.
#
# What it makes, and `--uninstall` removes: PREFIX (the venv, kvmaccel in it, PREFIX/INSTALL
# recording what was made), BIN_DIR/kvmaccel (a symlink to PREFIX/bin/kvmaccel), and the
# libvirt hook (LIBVIRT_DIR/hooks/qemu.d/kvmaccel, run by PREFIX/bin/python).  An emulator
# front already installed (`kvmaccel front install`, the operator's step) is rewritten by this
# kvmaccel and removed by `--uninstall`; none is installed otherwise.  An upgrade (running it again) replaces PREFIX's kvmaccel and rewrites the
# hook with the config it had; the config (/etc/kvmaccel) and the warm pool (files on the
# hugetlbfs and tmpfs mounts, states in /run/kvmaccel) are never touched, by upgrade or
# uninstall.  Empty the pool first with `kvmaccel pool drain` if you remove kvmaccel for good.
set -eu

prefix=/opt/kvmaccel
bin_dir=/usr/local/bin
libvirt_dir=/etc/libvirt
apt=1
action=install
PYTHON=/usr/bin/python3          # Debian's: the one python3-libvirt is built for
APT_PACKAGES="python3-venv python3-libvirt python3-click python3-psutil"

log() { printf 'install.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --libvirt-dir) libvirt_dir=$2; shift 2 ;;
    --no-apt) apt=0; shift ;;
    --uninstall) action=uninstall; shift ;;
    -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$prefix" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
case "$prefix" in /|/usr|/usr/local|/opt) die "--prefix $prefix would be removed by --uninstall; choose a directory of kvmaccel's own" ;; esac
src=$(cd "$(dirname "$0")/.." && pwd)
kv="$prefix/bin/kvmaccel"
marker="$prefix/INSTALL"

uninstall() {
  [ -e "$marker" ] || { log "nothing installed in $prefix (no $marker)"; return 0; }
  if [ -x "$kv" ]; then
    if [ "$(sed -n 's/^front=//p' "$marker")" = 1 ]; then
      "$kv" front uninstall || log "front uninstall failed"
    fi
    hook_dir=$(sed -n 's/^libvirt_dir=//p' "$marker")
    if [ -n "$hook_dir" ]; then
      "$kv" hook uninstall --libvirt-dir "$hook_dir" || log "hook uninstall failed"
    fi
  fi
  link=$(sed -n 's/^link=//p' "$marker")
  if [ -n "$link" ] && [ -L "$link" ] && [ "$(readlink "$link")" = "$kv" ]; then
    rm -f "$link"
  fi
  created_bin_dir=$(sed -n 's/^created_bin_dir=//p' "$marker")
  rm -rf "$prefix"
  [ -n "$created_bin_dir" ] && rmdir "$created_bin_dir" 2>/dev/null || :
  log "removed $prefix${link:+ and $link}; config in /etc/kvmaccel and pool files were left as they are"
}

if [ "$action" = uninstall ]; then uninstall; exit 0; fi

# --- Debian packages ------------------------------------------------------------------------
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  [ "$apt" = 1 ] || die "missing Debian packages:$missing (apt-get install$missing)"
  [ "$(id -u)" = 0 ] || die "installing$missing needs root"
  log "installing$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
"$PYTHON" -c 'import libvirt, click, psutil' 2>/dev/null ||
  die "$PYTHON cannot import libvirt, click and psutil; install$APT_PACKAGES"

# --- the environment ------------------------------------------------------------------------
if [ -e "$prefix" ] && [ ! -e "$marker" ]; then
  die "$prefix exists and is not a kvmaccel install (no $marker); choose another --prefix"
fi
upgrade=0
[ -e "$marker" ] && upgrade=1
umask 022  # the hook runs as root, but `kvmaccel --version` for anyone is fine
if [ ! -x "$prefix/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages --without-pip "$prefix"
fi
[ -e "$marker" ] || : > "$marker"  # ours from now on: a failed install can be run again
site=$("$prefix/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
case "$site" in "$prefix"/*) ;; *) die "the venv's site-packages $site is not under $prefix" ;; esac
mkdir -p "$site"
rm -rf "$site/kvmaccel.new"
cp -R "$src/kvmaccel" "$site/kvmaccel.new"
find "$site/kvmaccel.new" -name __pycache__ -prune -exec rm -rf {} +
"$prefix/bin/python" -m compileall -q "$site/kvmaccel.new" >/dev/null
rm -rf "$site/kvmaccel.old"
[ -d "$site/kvmaccel" ] && mv "$site/kvmaccel" "$site/kvmaccel.old"
mv "$site/kvmaccel.new" "$site/kvmaccel"
rm -rf "$site/kvmaccel.old"
cat > "$kv.tmp" <<EOF
#!$prefix/bin/python
import sys
from kvmaccel.cli.main import main
sys.exit(main())
EOF
chmod 0755 "$kv.tmp"
mv "$kv.tmp" "$kv"
version=$("$kv" --version) || die "$kv --version failed"

# --- PATH, hook, front ----------------------------------------------------------------------
link=""
created_bin_dir=$(sed -n 's/^created_bin_dir=//p' "$marker" 2>/dev/null || :)
if [ -n "$bin_dir" ]; then
  [ -d "$bin_dir" ] || { mkdir -p "$bin_dir"; created_bin_dir=$bin_dir; }
  link="$bin_dir/kvmaccel"
  if [ -e "$link" ] && ! { [ -L "$link" ] && [ "$(readlink "$link")" = "$kv" ]; }; then
    die "$link exists and is not kvmaccel's symlink; move it away and run again"
  fi
  ln -sfn "$kv" "$link"
fi
if [ -n "$libvirt_dir" ] && [ -d "$libvirt_dir" ]; then
  # Keep the config an earlier hook was installed with.
  config=$("$prefix/bin/python" -c 'import json, sys
from kvmaccel.setup.install import MARKER, hook_path
try:
    with open(hook_path(sys.argv[1]), encoding="utf-8") as f:
        f.readline(); line = f.readline()
    info = json.loads(line[len(MARKER):]) if line.startswith(MARKER) else {}
except (OSError, ValueError):
    info = {}
print(info.get("config") or "")' "$libvirt_dir")
  "$kv" hook install --libvirt-dir "$libvirt_dir" --python "$prefix/bin/python" \
    ${config:+--config "$config"}
else
  libvirt_dir=""
fi
# The front is the operator's to install (kvmaccel front install); one already installed is
# rewritten by this kvmaccel, and then removed again by --uninstall.
front=0
if "$kv" front --help >/dev/null 2>&1 && "$kv" front status 2>/dev/null | grep -q "kvmaccel's front"; then
  "$kv" front install && front=1
fi
{
  echo "version=$version"
  echo "source=$src"
  echo "link=$link"
  echo "created_bin_dir=$created_bin_dir"
  echo "libvirt_dir=$libvirt_dir"
  echo "front=$front"
} > "$marker"
log "$([ "$upgrade" = 1 ] && echo upgraded || echo installed) $version in $prefix${link:+, $link}${libvirt_dir:+, hook in $libvirt_dir/hooks/qemu.d}"
log "next: kvmaccel doctor"
